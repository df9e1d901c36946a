"""Running `sdrt` in subprocesses, SIGKILLing them at chosen points, and comparing run directories
exactly (bytes of stores and adapters; everything in manifests and metrics but timings)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

# one thread: a killed-and-resumed run repeats exactly the float operations of an uninterrupted one
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TRACE_ARGS = [
    "traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--prompts", "2",
    "--max-new-tokens-step1", "4", "--max-new-tokens-step2", "4", "--pos", "3", "--store-dtype", "fp32",
]
# what differs between two runs of the same work: wall-clock times, cache hit counts, this run's own work
RUN_SPECIFIC = {"seconds", "cpu_seconds", "steps_per_s", "cache", "timing", "lm_token_forwards_this_run_rank0", "created", "argv"}


def sdrt(*args) -> list[str]:
    return [sys.executable, "-m", "sdrt_cli", *map(str, args)]


def run(*args) -> subprocess.CompletedProcess:
    result = subprocess.run(sdrt(*args), capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_when(args, ready: Callable[[], bool], timeout: float = 600) -> bool:
    """Start ``sdrt ARGS``, SIGKILL it as soon as ``ready()``; False if it finished first."""
    proc = subprocess.Popen(sdrt(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    return alive


def kill_after(args, seconds: float) -> bool:
    started = time.time()
    return kill_when(args, lambda: time.time() - started >= seconds)


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def strip_run_specific(value):
    if isinstance(value, dict):
        return {k: strip_run_specific(v) for k, v in value.items() if k not in RUN_SPECIFIC}
    if isinstance(value, list):
        return [strip_run_specific(v) for v in value]
    return value


def read_json(path: Path, root: Path | None = None):
    """The JSON at ``path`` without run-specific fields, ``root`` (the run's own directory, recorded
    in manifests as the path of an input) replaced by a placeholder."""
    text = Path(path).read_text()
    if root is not None:
        text = text.replace(str(Path(root).resolve()), "<root>").replace(str(root), "<root>")
    return strip_run_specific(json.loads(text))


def read_jsonl(path: Path) -> list:
    return [strip_run_specific(json.loads(line)) for line in Path(path).read_text().splitlines()]


def assert_same_bytes(a: Path, b: Path, pattern: str) -> None:
    fa, fb = sorted(p.relative_to(a) for p in a.glob(pattern)), sorted(p.relative_to(b) for p in b.glob(pattern))
    assert fa == fb and fa, f"{pattern}: {fa} vs {fb}"
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{b / rel} differs from {a / rel}"


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{b}: tensor {key} differs"


def assert_same_store(a: Path, b: Path) -> None:
    """Two trace stores hold the same records, bit for bit, in the same shards."""
    assert read_json(a / "manifest.json") == read_json(b / "manifest.json")
    assert_same_bytes(a, b, "shards/*")  # hidden files too: no temporary file of a killed write is left
    assert_same_bytes(a, b, "progress/*")


def assert_same_adapters(a: Path, b: Path, roots: tuple[Path, Path] = (None, None)) -> None:
    """Two `sdrt distill` outputs: identical adapter tensors, manifest and metrics (timings aside);
    ``roots``: the two runs' top directories, where their inputs' recorded paths differ."""
    assert read_json(a / "manifest.json", roots[0]) == read_json(b / "manifest.json", roots[1])
    assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")
    for tensors in sorted(a.glob("adapters/*/adapter.safetensors")):
        assert_same_tensors(tensors, b / tensors.relative_to(a))
    assert (b / "adapters").is_dir() and len(list(b.glob("adapters/*"))) == len(list(a.glob("adapters/*")))


def assert_same_ensemble(a: Path, b: Path, roots: tuple[Path, Path] = (None, None)) -> None:
    assert read_json(a / "adapter.json", roots[0]) == read_json(b / "adapter.json", roots[1])
    assert_same_tensors(a / "adapter.safetensors", b / "adapter.safetensors")


def assert_same_eval(a: Path, b: Path, roots: tuple[Path, Path] = (None, None)) -> None:
    assert read_json(a / "results.json", roots[0]) == read_json(b / "results.json", roots[1])
    assert_same_bytes(a, b, "predictions/*.jsonl")


def kill_repeatedly(args, progress, total: int, seed: int) -> int:
    """SIGKILL ``sdrt ARGS`` after a seeded number of new progress units (plus a seeded delay, so the
    kill also lands mid-write), again and again until it would finish; returns how many kills landed."""
    rng = random.Random(seed)
    kills = 0
    while progress() < total - 1:
        target = min(total - 1, progress() + rng.randint(1, 2))
        if not kill_when(args, _after(progress, target, rng.uniform(0.0, 0.5))):
            break  # it finished before the kill: nothing left to interrupt
        kills += 1
    return kills


def _after(progress, target: int, delay: float):
    """True from ``delay`` seconds after ``progress()`` first reached ``target``."""
    reached: list[float] = []

    def ready() -> bool:
        if not reached and progress() >= target:
            reached.append(time.time())
        return bool(reached) and time.time() - reached[0] >= delay

    return ready


def timed(*args) -> float:
    started = time.time()
    run(*args)
    return time.time() - started
