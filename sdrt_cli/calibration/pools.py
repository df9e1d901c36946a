"""The run directory of `sdrt calibrate` and its pools: where each iteration's files live, the pool
files (JSONL, images referenced), the first pools from the source split, and a trace store seeded
with the records of instructions traced in the previous iteration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdrt_cli.options import parse_key_values

ENSEMBLE_NAME = "calibrate"
# options that change how a run computes but not what it computes: a resume may change them
NOT_RESULT_OPTIONS = ("out", "config", "device", "batch_size", "iterations")


class Run:
    """Paths and shared settings of one calibration run."""

    def __init__(self, opts: dict[str, Any], sets: dict[str, dict[str, Any]]):
        self.opts = opts
        self.sets = sets
        self.out = Path(opts["out"])
        self.source_options = parse_key_values(opts["dataset_option"])

    def iteration_dir(self, n: int) -> Path:
        return self.out / f"iter-{n}"

    def tuning(self, n: int) -> Path:
        return self.iteration_dir(n) / "tuning.jsonl"

    def cache(self, n: int) -> Path:
        return self.iteration_dir(n) / "cache.jsonl"

    def marker(self, n: int, stage: str) -> Path:
        """Stage ``stage`` of iteration ``n`` finished (n = 0: a stage before the first iteration)."""
        return (self.iteration_dir(n) if n else self.out) / "stages" / f"{stage}.done"

    @property
    def align_dir(self) -> Path:
        return self.out / "align"

    @property
    def projector(self) -> str | None:
        """The aligned projector every stage after the alignment loads (None without --align)."""
        return str(self.align_dir / "adapters" / "gold") if self.opts.get("align") else None

    def pool_options(self, pool: Path) -> list[str]:
        """``--dataset-option`` values that read ``pool`` as a dataset over the source."""
        options = [f"pool={pool}", f"source={self.opts['dataset']}", f"source_split={self.opts['split']}"]
        return options + list(self.opts["dataset_option"])

    def open_pool(self, pool: Path):
        from sdrt_cli.data import open_dataset

        return open_dataset("pool", data_dir=self.opts["data_dir"], seed=self.opts["seed"], **parse_key_values(self.pool_options(pool)))

    def open_model(self, backbone: str | None = None):
        """The teacher/student backbone (with the aligned projector after --align), or another role's
        (with its own default checkpoint)."""
        name = backbone or self.opts["backbone"]
        own = name == self.opts["backbone"]
        model, projector = (self.opts["model"], self.projector) if own else (None, None)
        from sdrt_cli.backbone import load_recorded_backbone

        return load_recorded_backbone(None, name, model, projector, device=self.opts["device"], dtype=self.opts["model_dtype"], seed=self.opts["seed"])

    def settings(self, max_new_tokens: int):
        from sdrt_cli.evaluate import GenerationSettings
        from sdrt_cli.generation import generation_batch_size

        return GenerationSettings(
            max_new_tokens=max_new_tokens, max_new_tokens_step1=self.opts["max_new_tokens_step1"],
            batch_size=generation_batch_size("eval", self.opts["batch_size"], self.opts["device"]),
        )


def recorded_configuration(opts: dict[str, Any]) -> dict[str, Any]:
    from sdrt_cli.runinfo import jsonable

    return jsonable({k: v for k, v in sorted(opts.items()) if k not in NOT_RESULT_OPTIONS})


def write_pool(path: Path, rows: list[dict[str, Any]]) -> None:
    from sdrt_cli.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def initial_pools(run: Run) -> None:
    """Both pools start as the source split's questions without their answers (MmDC's D_sin)."""
    if run.tuning(1).exists() and run.cache(1).exists():
        return
    opts = run.opts
    from sdrt_cli.data import open_dataset

    source = open_dataset(opts["dataset"], data_dir=opts["data_dir"], split=opts["split"], limit=opts["limit"], seed=opts["seed"], **run.source_options)
    rows = []
    for index, example in enumerate(source):
        rows.append({
            "id": example.id, "parent_id": None, "image": {"index": index, "id": example.id}, "question": example.question,
            "origin": "dataset", "iteration": 0, "status": "accepted", "reason": None,
            "scores": None, "difficulty": None, "label": None,
        })
    if not rows:
        from sdrt_cli.errors import SdrtError

        raise SdrtError(f"dataset {opts['dataset']!r} split {opts['split']!r} has no examples to start the pools from")
    write_pool(run.cache(1), rows)
    write_pool(run.tuning(1), rows)  # written last: both files present = the pools are there


def seed_store(previous: Path, store: Path, pool: Path, chunk: int = 8) -> int:
    """Copy into ``store`` the records of ``previous`` whose instructions are in ``pool`` (re-indexed
    to their rows there), so `sdrt traces` on the new pool traces only new instructions.  The copy
    carries the fingerprint `sdrt traces` gives the new pool (the previous one with the pool file
    changed); a copy interrupted half-way continues where it stopped.  Returns the examples copied."""
    import copy
    import dataclasses

    from sdrt_cli.calibration.pure import read_pool
    from sdrt_cli.trace_store import TraceStore, TraceWriter

    old = TraceStore(previous)
    fingerprint = copy.deepcopy(old.fingerprint)
    fingerprint["dataset"]["options"]["pool"] = str(pool)
    first_prompt = old.prompt_ids[0]
    by_id = {old.meta(index, first_prompt)["example_id"]: index for index in old.example_indices}
    wanted = [(row_index, by_id[row["id"]]) for row_index, row in enumerate(read_pool(pool)) if row["id"] in by_id]
    writer = TraceWriter(store, fingerprint, rank=0, is_main=True)
    done = writer.done_examples()
    todo = [(new, old_index) for new, old_index in wanted if new not in done]
    for start in range(0, len(todo), chunk):
        records = [
            dataclasses.replace(old.record(old_index, prompt), example_index=new)
            for new, old_index in todo[start : start + chunk]
            for prompt in old.prompt_ids
        ]
        writer.write(records)
    return len(todo)
