"""SIGKILL at seeded points (or seeded random times) of `sdrt traces` and `sdrt distill`, then the same
command again, equals an uninterrupted run bit for bit.  (Apart from the other kill tests so that the
suite's workers share them.)"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from fault_helpers import TRACE_ARGS, assert_same_adapters, assert_same_store, kill_after, kill_repeatedly, lines, run

slow = pytest.mark.slow


# each seed kills the command at several points; two seeds (and the random-time test) keep the suite short
@slow
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=slow)])
def test_traces_killed_at_seeded_points_then_rerun_equals_an_uninterrupted_store(tmp_path, seed):
    args = [*TRACE_ARGS, "--limit", "4", "--batch-size", "1"]
    clean = tmp_path / "clean"
    run(*args, "--out", clean)
    out = tmp_path / "killed"
    kills = kill_repeatedly([*args, "--out", out], lambda: lines(out / "progress" / "r000.jsonl"), 4, seed)
    assert kills >= 1
    run(*args, "--out", out)
    assert_same_store(clean, out)


@slow
def test_traces_killed_at_a_seeded_random_time_then_rerun_equals_an_uninterrupted_store(tmp_path):
    args = [*TRACE_ARGS, "--limit", "3", "--batch-size", "1"]
    clean = tmp_path / "clean"
    started = time.time()
    run(*args, "--out", clean)
    duration = time.time() - started
    out = tmp_path / "killed"
    rng = random.Random(7)
    for _ in range(2):  # anywhere: during imports, model load, generation, a shard's write or commit
        kill_after([*args, "--out", out], rng.uniform(0.2, 0.9) * duration)
    run(*args, "--out", out)
    assert_same_store(clean, out)


def checkpoint_step(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"].split("-")[1])
    except (OSError, ValueError, KeyError):
        return 0


@slow
@pytest.mark.parametrize("seed", [0])
def test_distill_killed_at_seeded_points_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_trace_store, seed):
    args = ["distill", "--traces", tiny_trace_store, "--epochs", "2", "--batch-size", "1", "--save-every", "1", "--val-fraction", "0.25", "--rank", "2", "--resume"]
    clean = tmp_path / "clean"
    run(*args, "--out", clean)
    out = tmp_path / "killed"
    assert kill_repeatedly([*args, "--out", out], lambda: checkpoint_step(out), 6, seed) >= 1
    run(*args, "--out", out)
    assert_same_adapters(clean, out)
