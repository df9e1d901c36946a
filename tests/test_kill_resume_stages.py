"""SIGKILL at seeded times of `sdrt ensemble`, `sdrt eval` and `sdrt ablate`, then the same command again,
equals an uninterrupted run bit for bit."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from fault_helpers import (
    assert_same_adapters,
    assert_same_ensemble,
    assert_same_eval,
    assert_same_store,
    kill_after,
    kill_repeatedly,
    read_json,
    run,
    timed,
)

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_trace_store) -> Path:
    out = tmp_path_factory.mktemp("faults-adapters") / "adapters"
    run("distill", "--traces", tiny_trace_store, "--epochs", "1", "--batch-size", "2", "--rank", "2", "--out", out)
    return out


@slow
def test_ensemble_with_kl_epochs_killed_at_seeded_times_then_rerun_is_identical(tmp_path, tiny_trace_store, adapters_dir):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    shutil.copytree(adapters_dir, clean)
    shutil.copytree(adapters_dir, killed)
    args = ["ensemble", "--traces", tiny_trace_store, "--steps", "20", "--holdout", "0.25", "--kl-epochs", "2", "--kl-batch-size", "2"]
    duration = timed(*args, "--adapters", clean)
    rng = random.Random(3)
    for _ in range(2):
        kill_after([*args, "--adapters", killed], rng.uniform(0.3, 0.95) * duration)
    run(*args, "--adapters", killed)
    assert_same_ensemble(clean / "ensembles" / "k2", killed / "ensembles" / "k2")
    assert read_json(killed / "ensembles" / "k2" / "adapter.json")["training"]["report"]["kl_finetune"]["epochs"] == 2


@slow
def test_eval_killed_at_seeded_times_then_rerun_is_identical(tmp_path):
    args = ["eval", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--limit", "3", "--batch-size", "1",
            "--method", "prompt,cot", "--max-new-tokens", "3", "--max-new-tokens-step1", "3"]
    clean, out = tmp_path / "clean", tmp_path / "killed"
    duration = timed(*args, "--out", clean)
    rng = random.Random(5)
    for _ in range(2):
        kill_after([*args, "--out", out], rng.uniform(0.3, 0.99) * duration)
    run(*args, "--out", out)
    assert_same_eval(clean, out)


GRID = """
name = "faults"
datasets = ["synthetic-charts"]
[defaults.traces]
backbone = "llava-next-tiny"
split = "train"
limit = 3
prompts = "2"
pos = 2
max_new_tokens_step1 = 3
max_new_tokens_step2 = 2
batch_size = 1
store_dtype = "fp32"
[defaults.distill]
epochs = 1
batch_size = 1
save_every = 1
[defaults.ensemble]
steps = 5
holdout = 0
[defaults.eval]
split = "validation"
limit = 2
max_new_tokens = 2
[[ablations]]
name = "loss"
title = "loss"
stage = "distill"
option = "loss"
values = ["mse", "mse+kl"]
"""


@slow
def test_ablate_killed_at_seeded_stages_then_rerun_is_identical(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    args = ["ablate", "--grid", grid]
    clean, out = tmp_path / "clean", tmp_path / "killed"
    run(*args, "--out", clean)
    stages = len(list(clean.glob("stages/*/.done")))
    assert stages == 7  # traces once, then distill, ensemble and eval per loss

    def done() -> int:
        return len(list(out.glob("stages/*/.done")))

    assert kill_repeatedly([*args, "--out", out], done, stages, seed=11) >= 1
    run(*args, "--out", out)
    assert read_json(clean / "tables" / "loss.json") == read_json(out / "tables" / "loss.json")
    for stage in sorted(clean.glob("stages/*")):
        twin = out / stage.relative_to(clean)
        if (stage / "results.json").exists():
            assert_same_eval(stage, twin, (clean, out))
        elif (stage / "metrics.jsonl").exists():
            assert_same_adapters(stage, twin, (clean, out))
            for ensemble in sorted(stage.glob("ensembles/*")):
                assert_same_ensemble(ensemble, twin / ensemble.relative_to(stage), (clean, out))
        elif (stage / "progress").exists():
            assert_same_store(stage, twin)
