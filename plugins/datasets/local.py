"""What the benchmark plugins share: finding the data (a directory, a file, or a Hugging Face
cache snapshot, never a download), reading parquet and JSON with one-sentence errors, and
decoding images lazily.

A plugin subclasses :class:`LocalDataset`, inspects its layout in ``_prepare`` (so a wrong
layout, a missing column or an unknown split fails at construction, before any work), and
yields lightweight :class:`Record` objects from ``_records``.  A record carries image
*references* (bytes or a path); images are decoded only when an :class:`Example` is built, one
example at a time, so a 5,000-image split never sits in memory.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sdrt_cli.data import Dataset, Example
from sdrt_cli.errors import SdrtError

# rows per parquet read: big enough to amortise, small enough that a batch of document images
# (a few MB each) stays far below memory limits
PARQUET_BATCH_ROWS = 16


# ---------------------------------------------------------------- images


@dataclass
class ImageRef:
    """An image not decoded yet: encoded bytes (from parquet) or a file path (from JSON layouts)."""

    payload: bytes | Path
    where: str  # how an error names it, e.g. "image of row 4 in /data/validation-0.parquet"

    def open(self) -> Image.Image:
        try:
            data = self.payload.read_bytes() if isinstance(self.payload, Path) else self.payload
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now, so a truncated file fails here and names itself
        except FileNotFoundError:
            raise SdrtError(f"{self.where} does not exist (looked for {self.payload})") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise SdrtError(f"{self.where} cannot be decoded as an image ({exc})") from None
        return image if image.mode == "RGB" else image.convert("RGB")


def parquet_image(value: Any, path: Path, row: int, column: str = "image") -> ImageRef:
    """An image cell written by Hugging Face ``datasets`` (``{"bytes": ..., "path": ...}``)."""
    where = f"{column!r} of row {row} in {path}"
    if value is None:
        raise SdrtError(f"{where} is empty")
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return ImageRef(bytes(data), where)
        stored_path = value.get("path")
        if stored_path and Path(stored_path).is_file():
            return ImageRef(Path(stored_path), where)
        raise SdrtError(f"{where} has no image bytes and no readable path ({stored_path!r})")
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(bytes(value), where)
    raise SdrtError(f"{where} is not an image cell (found {type(value).__name__})")


# ---------------------------------------------------------------- files


class ParquetTable:
    """One parquet file: its columns, row count, and rows read in small batches."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise SdrtError(f"{path} is not a readable parquet file ({exc})") from None
        self.columns: list[str] = list(self._file.schema_arrow.names)
        self.num_rows: int = self._file.metadata.num_rows

    def require(self, columns: Iterable[str], purpose: str) -> None:
        for column in columns:
            if column not in self.columns:
                raise SdrtError(
                    f"{self.path} has no column {column!r}, which {purpose} needs (its columns: {', '.join(self.columns)})"
                )

    def rows(self, columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
        present = [c for c in columns if c in self.columns]
        row = 0
        try:
            for batch in self._file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=present):
                for values in batch.to_pylist():
                    yield row, values
                    row += 1
        except (OSError, pa.ArrowException) as exc:
            raise SdrtError(f"{self.path} cannot be read past row {row} ({exc})") from None


def load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SdrtError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SdrtError(f"{path} cannot be read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SdrtError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def json_field(record: Any, key: str, path: Path, index: int) -> Any:
    if not isinstance(record, dict):
        raise SdrtError(f"record {index} of {path} is not a JSON object")
    if key not in record:
        raise SdrtError(f"record {index} of {path} has no {key!r} field")
    return record[key]


def split_parquets(directory: Path) -> dict[str, list[Path]]:
    """Parquet files of a Hub dataset folder by split: ``{split}-00000-of-00002.parquet`` (as
    pushed by ``datasets``) or ``{split}/0000.parquet`` (the Hub's parquet conversion)."""
    found: dict[str, list[Path]] = {}
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("*.parquet")):
        split = re.split(r"[-.]", path.name, maxsplit=1)[0]
        found.setdefault(split, []).append(path)
    for path in sorted(directory.glob("*/*.parquet")):
        found.setdefault(path.parent.name, []).append(path)
    return found


# ---------------------------------------------------------------- the Hugging Face cache


def hub_cache_dir() -> Path:
    """Where ``huggingface_hub`` keeps downloads, read from the environment at call time."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env["HUGGINGFACE_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of a Hub dataset repo, or None; never touches the network.

    Read directly from the cache layout (``datasets--org--name/refs/main`` -> ``snapshots/<commit>``)
    rather than through ``snapshot_download``, which refuses snapshots downloaded with
    ``allow_patterns`` (e.g. only the validation files), a common way to fetch these datasets.
    """
    repo_dir = hub_cache_dir() / ("datasets--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    wanted = revision or "main"
    ref = repo_dir / "refs" / wanted
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        return snapshots / commit if (snapshots / commit).is_dir() else None
    if (snapshots / wanted).is_dir():
        return snapshots / wanted
    if revision is None:
        candidates = [p for p in snapshots.iterdir() if p.is_dir()]
        if candidates:
            return max(candidates, key=lambda p: p.stat().st_mtime)
    return None


# ---------------------------------------------------------------- the base class


@dataclass
class Record:
    """An example before its images are decoded."""

    id: str
    question: str
    answers: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    images: list[ImageRef] = field(default_factory=list)

    def materialise(self) -> Example:
        return Example(
            id=self.id,
            images=[ref.open() for ref in self.images],
            question=self.question,
            answers=list(self.answers),
            metadata=dict(self.metadata),
        )


class LocalDataset(Dataset):
    """A benchmark read from local files or the local Hugging Face cache.

    Options common to all: ``hub_id`` (a Hub dataset repo already in the local cache, read with
    offline semantics) and ``revision`` (a branch or commit of that repo, default main).
    Subclasses list further option names in ``extra_options``.
    """

    hub_ids: ClassVar[tuple[str, ...]] = ()  # repos looked up in the cache when nothing is given
    layouts: ClassVar[str] = ""  # the accepted layouts, in words, for error messages
    split_aliases: ClassVar[dict[str, str]] = {}
    extra_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, data_dir=None, split=None, limit=None, seed=0, **options: Any) -> None:
        allowed = ("hub_id", "revision", *self.extra_options)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise SdrtError(f"dataset {self.name!r} has no option {unknown[0]!r}; its options are: {', '.join(allowed)}")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise SdrtError(f"limit must be a non-negative integer, got {limit!r}")
        super().__init__(data_dir=data_dir, split=split, limit=limit, seed=seed, **options)
        self.requested_split = split
        self.split = self.split_aliases.get(self.split, self.split)
        self.hub_id: str | None = options.get("hub_id") or None
        self.revision: str | None = options.get("revision") or None
        self.root = self._locate()
        self._has_answers: bool | None = None
        self._prepare()

    # -- subclass hooks

    def _prepare(self) -> None:
        """Inspect the layout under ``self.root``; raise SdrtError for anything unusable."""

    def _records(self, with_images: bool) -> Iterator[Record]:
        """Every record of the split in canonical order; ``with_images=False`` may skip reading images."""
        raise NotImplementedError

    def _count(self) -> int:
        return sum(1 for _ in self._records(with_images=False))

    # -- finding the data

    def _locate(self) -> Path:
        if self.data_dir is not None:
            if not self.data_dir.exists():
                raise SdrtError(f"{self.name} data path {self.data_dir} does not exist")
            return self.data_dir
        if self.hub_id:
            snapshot = cached_snapshot(self.hub_id, self.revision)
            if snapshot is None:
                raise SdrtError(
                    f"{self.hub_id} is not in the local Hugging Face cache ({hub_cache_dir()}); nothing is downloaded at run time: "
                    f"fetch it once with `huggingface-cli download --repo-type dataset {self.hub_id}` or pass --data-dir"
                )
            return snapshot
        for hub_id in self.hub_ids:
            snapshot = cached_snapshot(hub_id, self.revision)
            if snapshot is not None:
                self.hub_id = hub_id
                return snapshot
        fetch = (
            f" or fetch {' or '.join(self.hub_ids)} once with `huggingface-cli download --repo-type dataset {self.hub_ids[0]}`"
            if self.hub_ids
            else ""
        )
        raise SdrtError(f"no {self.name} data given: pass --data-dir with {self.layouts}{fetch}")

    def _unknown_split(self, where: Path, available: Iterable[str]) -> SdrtError:
        listing = ", ".join(sorted(available)) or "none"
        return SdrtError(f"{where} has no {self.name} split {self.split!r} (splits found: {listing})")

    # -- the Dataset interface

    def _limited(self, records: Iterator[Record]) -> Iterator[Record]:
        return records if self.limit is None else itertools.islice(records, self.limit)

    def __iter__(self) -> Iterator[Example]:
        for record in self.references():
            yield record.materialise()

    def references(self) -> Iterator[Record]:
        return self._limited(self._records(with_images=True))

    def ids(self) -> Iterator[str]:
        for record in self._limited(self._records(with_images=False)):
            yield record.id

    def iter_shard(self, rank: int, world_size: int) -> Iterator[Example]:
        if world_size < 1 or not 0 <= rank < world_size:
            raise SdrtError(f"rank {rank} is outside a world of size {world_size}")
        for position, record in enumerate(self._limited(self._records(with_images=True))):
            if position % world_size == rank:
                yield record.materialise()

    def __len__(self) -> int:
        total = self._count()
        return total if self.limit is None else min(total, self.limit)

    @property
    def has_answers(self) -> bool:
        if self._has_answers is None:
            self._has_answers = any(record.answers for record in self._limited(self._records(with_images=False)))
        return self._has_answers

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info.update({"hub_id": self.hub_id, "revision": self.revision, "root": str(self.root)})
        return info
