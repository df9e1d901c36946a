"""What a `sdrt traces` run will cost before it runs: records, rows, bytes on disk and time.

A record of R rows stores, per row, the hidden states of L layers (H values each, in the store's
dtype), the top-k ids (int32) and log-probs (float32) and the tail mass (float32)::

    tensor bytes = R * (L * H * dtype_bytes + 8 * top_k + 4),   R = P + len(y2) - 1 <= pos + max_new_tokens_step2 - 1

plus one jsonl line (texts and token ids) per record and a few small files per shard.

Without generating anything the answer length is unknown, so :func:`plan` bounds it by the step-2
budget and the jsonl line by the budgets (the ``upper`` estimate, what the free-space check uses).
A short calibration run (:func:`calibrate`: the first batch, traced and encoded exactly as the
store would, nothing written) gives the expected rows and line length and the time per example.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sdrt_cli.errors import SdrtError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# per shard beyond its records: the safetensors header and the shard's line in the progress log
# and in the manifest (measured on stores of the tiny backbone: ~450 + ~250 + ~350 bytes)
SHARD_OVERHEAD_BYTES = 1100
# per store: run.json and the manifest's fingerprint
STORE_OVERHEAD_BYTES = 5000
# a jsonl line when nothing was generated yet: the rendered prompts, and per generated token its id
# (at most ", 999999") and its text (a few bytes; 16 is generous)
TEXT_ALLOWANCE_BYTES = 4096
TEXT_BYTES_PER_TOKEN = 24


@dataclass
class Calibration:
    examples: int
    records: int
    seconds: float
    mean_rows: float
    mean_line_bytes: float
    shard_overhead: float  # safetensors header bytes of the calibration shard


@dataclass
class TracePlan:
    examples: int
    prompts: int
    records: int
    row_bytes: int
    max_rows: int
    rows: float  # expected rows per record (calibrated) or max_rows
    shards: int
    bytes: int  # expected bytes on disk
    upper_bytes: int  # with every answer at its budget
    seconds: float | None
    calibration: Calibration | None

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["calibration"] = None if self.calibration is None else dict(self.calibration.__dict__)
        return out


def row_bytes(num_layers: int, hidden_size: int, dtype: str, top_k: int) -> int:
    return num_layers * hidden_size * DTYPE_BYTES[dtype] + 8 * top_k + 4


def calibrate(engine, items: Sequence[tuple[int, Any]]) -> Calibration:
    """Trace ``items`` (one batch) without writing; measure time, rows and encoded sizes."""
    from sdrt_cli.trace_store import encode_shard

    began = time.perf_counter()
    records = engine.run(list(items))
    seconds = time.perf_counter() - began
    tensor_file, text_file = encode_shard(records)
    tensor_payload = sum(
        r.hidden.numel() * r.hidden.element_size() + r.topk_ids.numel() * 4 + r.topk_logprobs.numel() * 4 + r.tail_mass.numel() * 4 for r in records
    )
    return Calibration(
        examples=len(items),
        records=len(records),
        seconds=seconds,
        mean_rows=sum(r.hidden.shape[0] for r in records) / len(records),
        mean_line_bytes=len(text_file.encode("utf-8")) / len(records),
        shard_overhead=len(tensor_file) - tensor_payload,
    )


def plan(
    examples: int,
    prompts: int,
    settings,
    hidden_size: int,
    batch_size: int,
    world_size: int = 1,
    calibration: Calibration | None = None,
) -> TracePlan:
    """Records, rows, bytes and time for ``examples`` still to trace (``settings``: TraceSettings)."""
    records = examples * prompts
    per_row = row_bytes(len(settings.layers), hidden_size, settings.dtype, settings.top_k)
    max_rows = settings.pos + settings.max_new_tokens_step2 - 1
    # every rank writes its own shards of at most batch_size examples
    shards = sum(math.ceil(len(range(rank, examples, world_size)) / batch_size) for rank in range(world_size))
    upper_line = TEXT_ALLOWANCE_BYTES + TEXT_BYTES_PER_TOKEN * (settings.max_new_tokens_step1 + settings.max_new_tokens_step2)
    upper = records * (max_rows * per_row + upper_line) + shards * SHARD_OVERHEAD_BYTES + STORE_OVERHEAD_BYTES
    if calibration is None:
        return TracePlan(examples, prompts, records, per_row, max_rows, float(max_rows), shards, upper, upper, None, None)
    expected = records * (calibration.mean_rows * per_row + calibration.mean_line_bytes) + shards * SHARD_OVERHEAD_BYTES + STORE_OVERHEAD_BYTES
    seconds = calibration.seconds / calibration.examples * examples / world_size
    return TracePlan(examples, prompts, records, per_row, max_rows, calibration.mean_rows, shards, int(expected), upper, seconds, calibration)


def free_bytes(path: Path) -> tuple[Path, int]:
    """Free space of the file system that holds ``path`` (or would, once created)."""
    probe = Path(path).resolve()
    while not probe.exists():
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def check_space(out: Path, needed: int) -> None:
    from sdrt_cli.show import human_bytes

    where, free = free_bytes(out)
    if free < needed:
        raise SdrtError(
            f"{where} has {human_bytes(free)} free but the trace store may need up to {human_bytes(needed)} "
            "(every answer at its --max-new-tokens-step2 budget); free some space, lower --limit or the budgets, or pass --no-space-check"
        )


def plan_table(p: TracePlan, out: Path):
    from rich.table import Table

    from sdrt_cli.show import human_bytes

    table = Table(title=f"sdrt traces --plan: {out}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("examples to trace", f"{p.examples:,}")
    table.add_row("prompts", str(p.prompts))
    table.add_row("records (examples × prompts)", f"{p.records:,}")
    table.add_row("bytes per row", f"{p.row_bytes:,}")
    table.add_row("rows per record", f"{p.rows:.1f} expected, at most {p.max_rows}")
    table.add_row("rows", f"{p.records * p.rows:,.0f}")
    table.add_row("bytes on disk (expected)", human_bytes(p.bytes) + ("" if p.calibration else " (no calibration: the upper bound)"))
    table.add_row("bytes on disk (upper bound)", human_bytes(p.upper_bytes))
    where, free = free_bytes(out)
    table.add_row(f"free on {where}", human_bytes(free))
    if p.seconds is not None and p.calibration is not None:
        table.add_row("time (estimate)", _duration(p.seconds) + f"  (calibrated on {p.calibration.examples} examples, {p.calibration.seconds:.1f} s)")
    return table


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
