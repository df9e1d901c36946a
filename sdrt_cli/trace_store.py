"""The trace store: a run directory that later stages read, safe to interrupt and resume.

Layout::

    manifest.json                 identity + settings (the fingerprint), status, shard checksums
    run.json                      resolved command config, versions, seed, git revision
    shards/r000-000000.safetensors  tensors of a batch of records, rows concatenated
    shards/r000-000000.jsonl        one line per record: texts, token ids, confidence, teacher score, row range
    shards/r000-000000.students.jsonl  one line per example: the plain student's answer and score
                                    (only with the student baseline; stores made without it still load)
    progress/r000.jsonl             one line per committed shard of rank 0 (name, sha256, examples)

Every file is written to a temporary name and renamed, so a killed process leaves either a whole
shard or none.  A shard counts as done only once its line is in the rank's progress log; resuming
reads all progress logs, verifies checksums, and skips the examples they list.  Rank 0 finalises
the manifest with every shard's checksum once all ranks are done.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from sdrt_cli.backbone import BackboneRecord
from sdrt_cli.config import describe_differences
from sdrt_cli.errors import SdrtError
from sdrt_cli.formats import TRACE_FORMAT_VERSION, TRACE_MANIFEST, TraceManifest
from sdrt_cli.io import append_jsonl, atomic_write_bytes, atomic_write_text, read_jsonl, sha256_file
from sdrt_cli.traces import StudentAnswer, TraceRecord

FORMAT_VERSION = TRACE_FORMAT_VERSION
MANIFEST = TRACE_MANIFEST
STUDENTS = "students.jsonl"  # the per-example file's suffix, and its key in a shard's checksums


@dataclass
class ShardEntry:
    name: str
    sha256: dict[str, str]
    examples: list[int]
    records: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _read_progress(path: Path) -> list[ShardEntry]:
    entries = []
    for number, line in enumerate(read_jsonl(path), 1):  # a line cut short by a kill was never committed
        try:
            entries.append(ShardEntry(**line))
        except TypeError:
            raise SdrtError(f"progress log {path} is corrupt at line {number}; run with --overwrite to start the store again") from None
    return entries


def _comparable(fingerprint: Any) -> Any:
    """A fingerprint as extending a store compares it: the backbone by its identity, not by the
    factory options that rebuild it (stores written before options were recorded have none)."""
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("backbone"), dict):
        return fingerprint
    return {**fingerprint, "backbone": {k: v for k, v in fingerprint["backbone"].items() if k != "options"}}


class TraceWriter:
    """Writes one rank's shards into a store directory and knows which examples are already done."""

    def __init__(self, root: Path, fingerprint: dict[str, Any], rank: int = 0, overwrite: bool = False, is_main: bool = True):
        self.root = Path(root)
        self.rank = rank
        self.fingerprint = fingerprint
        self.committed: set[int] = set()
        if is_main:
            self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        manifest_path = self.root / MANIFEST
        if overwrite and self.root.exists():
            for sub in ("shards", "progress"):
                shutil.rmtree(self.root / sub, ignore_errors=True)
            manifest_path.unlink(missing_ok=True)
        if manifest_path.exists():
            existing = TraceManifest.load(self.root)
            if _comparable(existing.fingerprint) != _comparable(self.fingerprint):
                raise SdrtError(
                    f"{self.root} holds traces made with a different configuration ({describe_differences(existing.fingerprint, self.fingerprint, 'store')}); "
                    "use another --out or --overwrite to discard it"
                )
        elif self.root.exists() and any(p.name in ("shards", "progress") for p in self.root.iterdir()):
            raise SdrtError(f"{self.root} has trace shards but no {MANIFEST}; use --overwrite to discard them")
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        (self.root / "progress").mkdir(parents=True, exist_ok=True)
        if not manifest_path.exists():
            TraceManifest(status="running", fingerprint=self.fingerprint).save(self.root)
        else:
            manifest = TraceManifest.load(self.root)
            if manifest.status != "running":
                manifest.status = "running"  # extending a finished store (e.g. a larger --limit)
                manifest.save(self.root)

    @property
    def progress_path(self) -> Path:
        return self.root / "progress" / f"r{self.rank:03d}.jsonl"

    def done_examples(self) -> set[int]:
        """Examples any rank has committed, after checking each committed shard is intact."""
        done: set[int] = set()
        for entry in all_progress(self.root):
            verify_shard(self.root, entry)
            _refuse_repeats(self.root, entry, done)
            done.update(entry.examples)
        self.committed = set(done)
        return done

    def write(self, records: Sequence[TraceRecord]) -> ShardEntry:
        check_finite(records)
        again = sorted({r.example_index for r in records} & self.committed)
        if again:  # a resume never appends a record the store already holds
            raise SdrtError(f"trace store {self.root} already holds example {again[0]}; refusing to write it twice")
        seq = len(_read_progress(self.progress_path)) if self.progress_path.exists() else 0
        name = f"r{self.rank:03d}-{seq:06d}"
        tensor_file, text_file = encode_shard(records)
        st_path = self.root / "shards" / f"{name}.safetensors"
        js_path = self.root / "shards" / f"{name}.jsonl"
        atomic_write_bytes(st_path, tensor_file)
        atomic_write_text(js_path, text_file)
        checksums = {"safetensors": sha256_file(st_path), "jsonl": sha256_file(js_path)}
        size = st_path.stat().st_size + js_path.stat().st_size
        students = encode_students(records)
        if students is not None:
            students_path = self.root / "shards" / f"{name}.{STUDENTS}"
            atomic_write_text(students_path, students)
            checksums[STUDENTS] = sha256_file(students_path)
            size += students_path.stat().st_size
        entry = ShardEntry(
            name=name,
            sha256=checksums,
            examples=sorted({r.example_index for r in records}),
            records=len(records),
            bytes=size,
        )
        # committing = one appended, fsynced line; a kill before it leaves an orphan shard that the
        # next run overwrites under the same name
        append_jsonl(self.progress_path, entry.to_json())
        self.committed.update(entry.examples)
        return entry


def check_finite(records: Sequence[TraceRecord]) -> None:
    """Refuse a record with NaN or infinite states (a GPU attention kernel can produce them); naming
    it keeps a corrupt store from reaching distill, whose loss would only say "non-finite"."""
    for r in records:
        for name in ("hidden", "topk_logprobs", "tail_mass"):
            if not bool(torch.isfinite(getattr(r, name)).all()):
                raise SdrtError(
                    f"the trace of example {r.example_id!r} (index {r.example_index}) for prompt {r.prompt_id!r} has non-finite "
                    f"{name} values, so its batch was not stored"
                )


def _pack(records: Sequence[TraceRecord]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    lines, start = [], 0
    for r in records:
        count = r.hidden.shape[0]
        lines.append({**r.text_fields(), "row_start": start, "row_count": count})
        start += count
    tensors = {
        "hidden": torch.cat([r.hidden for r in records]).contiguous(),
        "topk_ids": torch.cat([r.topk_ids for r in records]).contiguous(),
        "topk_logprobs": torch.cat([r.topk_logprobs for r in records]).contiguous(),
        "tail_mass": torch.cat([r.tail_mass for r in records]).contiguous(),
    }
    return tensors, lines


def encode_shard(records: Sequence[TraceRecord]) -> tuple[bytes, str]:
    """The two files of a shard: the safetensors bytes and the jsonl text."""
    tensors, lines = _pack(records)
    return safetensors_save(tensors), "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


def encode_students(records: Sequence[TraceRecord]) -> str | None:
    """One line per example of the records' plain student answers; None when they carry none."""
    lines, seen = [], set()
    for r in records:
        if r.student is not None and r.example_index not in seen:
            seen.add(r.example_index)
            lines.append(json.dumps(r.student.to_json(), ensure_ascii=False) + "\n")
    return "".join(lines) if lines else None


def _refuse_repeats(root: Path, entry: ShardEntry, seen: set[int]) -> None:
    repeated = sorted(set(entry.examples) & seen)
    if repeated:
        raise SdrtError(
            f"trace shard {Path(root) / 'shards' / entry.name} repeats example {repeated[0]} of an earlier shard "
            "(two writers on one store?); run with --overwrite to start the store again"
        )


def all_progress(root: Path) -> list[ShardEntry]:
    entries: list[ShardEntry] = []
    progress = Path(root) / "progress"
    if progress.exists():
        for path in sorted(progress.glob("r*.jsonl")):
            entries.extend(_read_progress(path))
    return entries


def verify_shard(root: Path, entry: ShardEntry) -> None:
    for kind, expected in entry.sha256.items():
        path = Path(root) / "shards" / f"{entry.name}.{kind}"
        if not path.exists():
            raise SdrtError(f"trace shard {path} is missing; run with --overwrite to discard the store")
        if sha256_file(path) != expected:
            raise SdrtError(f"trace shard {path} is corrupt or truncated (checksum mismatch); run with --overwrite to discard the store")


def is_complete(root: Path | str) -> bool:
    """Whether ``root`` holds a finished trace store (a partial one resumes; a missing one starts)."""
    try:
        return json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8")).get("status") == "complete"
    except (OSError, ValueError):
        return False


def finalize(root: Path, extra: dict[str, Any] | None = None) -> TraceManifest:
    """Rank 0, after every rank finished: record every shard and its checksums in the manifest."""
    manifest = TraceManifest.load(root)
    entries = all_progress(root)
    seen: set[int] = set()
    for entry in entries:
        _refuse_repeats(root, entry, seen)
        seen.update(entry.examples)
    examples = sorted(seen)
    manifest.status = "complete"
    manifest.shards = [e.to_json() for e in entries]
    manifest.num_examples = len(examples)
    manifest.num_records = sum(e.records for e in entries)
    manifest.bytes = sum(e.bytes for e in entries)
    manifest.details.update(extra or {})
    manifest.save(root)
    return manifest


class TraceStore:
    """Read access to a finished store (what distill, ensemble and eval use)."""

    def __init__(self, root: Path | str, verify: bool = True):
        self.root = Path(root)
        self.manifest = TraceManifest.load(self.root)
        if self.manifest.status != "complete":
            raise SdrtError(f"trace store {self.root} is unfinished; re-run the same `sdrt traces` command to complete it")
        self.entries = [ShardEntry(**e) for e in self.manifest.shards]
        if verify:
            for entry in self.entries:
                verify_shard(self.root, entry)
        self._index: dict[tuple[int, str], tuple[str, dict[str, Any]]] = {}
        self._students: dict[int, StudentAnswer] = {}
        for entry in self.entries:
            if STUDENTS in entry.sha256:
                students_path = self.root / "shards" / f"{entry.name}.{STUDENTS}"
                for line in students_path.read_text(encoding="utf-8").splitlines():
                    student = StudentAnswer(**json.loads(line))
                    self._students[student.example_index] = student
            path = self.root / "shards" / f"{entry.name}.jsonl"
            lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            if len(lines) != entry.records or sorted({m["example_index"] for m in lines}) != sorted(entry.examples):
                raise SdrtError(
                    f"trace shard {path} holds {len(lines)} records but {MANIFEST} lists {entry.records} for examples {entry.examples}; "
                    "run `sdrt traces` with --overwrite to make the store again"
                )
            for meta in lines:
                key = (meta["example_index"], meta["prompt_id"])
                if key in self._index:
                    raise SdrtError(
                        f"trace shard {path} repeats the record of example {key[0]} and prompt {key[1]!r} already in shard "
                        f"{self._index[key][0]}; run `sdrt traces` with --overwrite to make the store again"
                    )
                self._index[key] = (entry.name, meta)
        if self.manifest.num_records != len(self._index):
            raise SdrtError(
                f"{self.root / MANIFEST} counts {self.manifest.num_records} records but its shards hold {len(self._index)}; "
                "run `sdrt traces` with --overwrite to make the store again"
            )

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest.fingerprint

    @property
    def prompt_ids(self) -> list[str]:
        return list(self.fingerprint["pack"]["prompts"])

    @property
    def example_indices(self) -> list[int]:
        return sorted({i for i, _ in self._index})

    @property
    def backbone(self) -> BackboneRecord:
        """The backbone the store was made with (how to rebuild it, and its identity)."""
        return BackboneRecord.from_json(self.fingerprint.get("backbone"), str(self.root / MANIFEST))

    def check_compatible(self, backbone: BackboneRecord | None = None, pack: Any = None) -> None:
        """Refuse a store made with another backbone, tokenizer or pack than the one in use."""
        if backbone is not None:
            self.backbone.check_matches(backbone, f"trace store {self.root} was made with")
        if pack is not None:
            stored = self.fingerprint["pack"]
            if stored["content_hash"] != pack.content_hash:
                raise SdrtError(f"trace store {self.root} was made with pack {stored['name']!r} hash {stored['content_hash'][:12]}, not {pack.name!r} hash {pack.content_hash[:12]}")

    def __len__(self) -> int:
        return len(self._index)

    def meta(self, example_index: int, prompt_id: str) -> dict[str, Any]:
        return self._index[(example_index, prompt_id)][1]

    def student(self, example_index: int) -> StudentAnswer | None:
        """The example's plain single-step answer, None when the store was made without the baseline."""
        return self._students.get(example_index)

    def record(self, example_index: int, prompt_id: str) -> TraceRecord:
        try:
            shard, meta = self._index[(example_index, prompt_id)]
        except KeyError:
            raise SdrtError(f"trace store {self.root} has no record for example {example_index} and prompt {prompt_id!r}") from None
        rows = slice(meta["row_start"], meta["row_start"] + meta["row_count"])
        with safe_open(str(self.root / "shards" / f"{shard}.safetensors"), framework="pt") as fh:
            tensors = {k: fh.get_slice(k)[rows] for k in ("hidden", "topk_ids", "topk_logprobs", "tail_mass")}
        fields = {k: meta[k] for k in meta if k not in ("row_start", "row_count")}
        return TraceRecord(**fields, **tensors, student=self.student(example_index))

    def records(self) -> Iterator[TraceRecord]:
        """Every record, ordered by example then by the pack's prompt order."""
        order = {p: i for i, p in enumerate(self.prompt_ids)}
        for key in sorted(self._index, key=lambda k: (k[0], order.get(k[1], len(order)))):
            yield self.record(*key)
