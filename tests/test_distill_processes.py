"""`sdrt distill` across processes: SIGKILL then --resume equals an uninterrupted run; torchrun with 2
ranks (gloo) equals one process with the same global batch.

The store is traced with the sharpened tiny backbone (``sharp_backbone``), so the KL the runs train
on and are compared by is far above float noise: a rank's lost gradient or a resume that replays a
step moves it by much more than the tolerances.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sharp_backbone import SCRIPT as SHARP_SCRIPT

TRACE_ARGS = [
    "traces", "--backbone", "llava-next-tiny-sharp", "--dataset", "synthetic-charts", "--prompts", "2", "--limit", "4",
    "--max-new-tokens-step1", "4", "--max-new-tokens-step2", "4", "--pos", "3", "--store-dtype", "fp32",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill-proc") / "store"
    subprocess.run([sys.executable, SHARP_SCRIPT, *TRACE_ARGS, "--out", str(out)], check=True, capture_output=True, env=ENV)
    return out


def sdrt(*args) -> list[str]:
    return [sys.executable, SHARP_SCRIPT, *map(str, args)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {f"{p}/{k}": v for p in manifest["prompts"] for k, v in load_file(str(out / manifest["adapters"][p] / "adapter.safetensors")).items()}


def assert_same_run(a: Path, b: Path, rtol: float, atol: float, kl_atol: float | None = None, weight_atol: float | None = None) -> None:
    ma, mb = metrics(a), metrics(b)
    assert [(m["kind"], m["step"]) for m in ma] == [(m["kind"], m["step"]) for m in mb]
    for la, lb in zip(ma, mb):
        if la["kind"] == "train":
            assert la["examples"] == lb["examples"] and la["lr"] == lb["lr"]
            assert lb["losses"] == pytest.approx(la["losses"], rel=rtol, abs=atol)
        if la["kind"] == "val":
            assert lb["val_mse"] == pytest.approx(la["val_mse"], rel=rtol, abs=atol)
            assert lb["val_kl"] == pytest.approx(la["val_kl"], rel=rtol, abs=kl_atol if kl_atol is not None else atol)
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=rtol, atol=weight_atol if weight_atol is not None else atol)


def assert_kl_is_signal(out: Path) -> None:
    """The compared KL is far from float noise (~1e-7 of it) and training moves it far beyond the
    tolerances the runs are compared with."""
    val = [m["val_kl"] for m in metrics(out) if m["kind"] == "val"]
    train = [m["parts"] for m in metrics(out) if m["kind"] == "train"]
    assert min(val) > 1e-3, val
    assert abs(val[-1] - val[0]) > 0.05 * val[0], val
    assert all(parts[p]["kl"] > 1e-4 for parts in train for p in parts), train


@pytest.mark.slow
def test_sigkill_then_resume_continues_exactly(store_dir, tmp_path):
    args = ["distill", "--traces", store_dir, "--epochs", "2", "--batch-size", "1", "--save-every", "1", "--val-fraction", "0.25", "--rank", "2"]
    clean = tmp_path / "clean"
    subprocess.run(sdrt(*args, "--out", clean), check=True, capture_output=True, env=ENV)
    assert [m["step"] for m in metrics(clean) if m["kind"] == "train"] == [1, 2, 3, 4, 5, 6]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(sdrt(*args, "--out", killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["checkpoint"] >= "step-00000002":
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the kill should land mid-run"
    stopped_at = int(json.loads(pointer.read_text())["checkpoint"].split("-")[1])
    assert 2 <= stopped_at < 6

    # without --resume the directory is protected; with it the run continues from the checkpoint
    refused = subprocess.run(sdrt(*args, "--out", killed), capture_output=True, text=True, env=ENV)
    assert refused.returncode == 1 and "pass --resume" in refused.stderr
    subprocess.run(sdrt(*args, "--out", killed, "--resume"), check=True, capture_output=True, env=ENV)
    assert [m["step"] for m in metrics(killed) if m["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # nothing repeated or lost
    assert_same_run(clean, killed, rtol=1e-6, atol=1e-12)
    assert_kl_is_signal(clean)
    again = subprocess.run(sdrt(*args, "--out", killed, "--resume"), capture_output=True, text=True, env=ENV)
    assert again.returncode == 0 and "already complete" in again.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_equal_one_process(store_dir, tmp_path):
    # trained on the KL alone, with a learning rate that moves it well beyond the tolerances below
    args = ["distill", "--traces", store_dir, "--loss", "kl", "--epochs", "2", "--batch-size", "2", "--val-fraction", "0.25", "--rank", "2", "--lr", "1e-2"]
    single = tmp_path / "single"
    subprocess.run(sdrt(*args, "--out", single), check=True, capture_output=True, env=ENV)
    double = tmp_path / "double"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SHARP_SCRIPT, *map(str, args), "--out", str(double)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # 3 training examples in global batches of 2: one step gives each rank one example, the next
    # gives rank 1 none; the summed gradients still equal the single process's
    assert [len(m["examples"]) for m in metrics(double) if m["kind"] == "train"] == [2, 1, 2, 1]
    # adapter weights are ~1e-2..1e-1; AdamW divides by sqrt(v), so on an element whose gradient is
    # small it turns float-level gradient differences into differences of up to a few 1e-7
    assert_same_run(single, double, rtol=1e-4, atol=1e-10, weight_atol=1e-6)
    assert_kl_is_signal(single)
    manifest = json.loads((double / "manifest.json").read_text())
    assert manifest["training"]["world_size"] == 2
    assert result.stdout.count("Trained 2 reft adapter(s)") == 1  # only rank 0 reports


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_resume_gives_each_rank_its_own_rng_state_back(tmp_path):
    """LoRA dropout draws from each rank's generators: a 2-rank run killed mid-way and resumed equals
    the uninterrupted one only if every rank gets its own RNG state back (not rank 0's)."""
    args = [
        "distill", "--loss", "ce", "--adapter", "lora", "--lora-dropout", "0.5", "--dataset", "synthetic-charts", "--limit", "4",
        "--layers", "-2,-1", "--backbone", "llava-next-tiny", "--epochs", "4", "--batch-size", "2", "--save-every", "1",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sdrt_cli", *args]
    clean = tmp_path / "clean"
    result = subprocess.run([*torchrun, "--out", str(clean)], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((clean / "checkpoints" / "latest.json").read_text())["checkpoint"]
    states = load_file(str(clean / "checkpoints" / final / "trainer.safetensors"))
    assert not torch.equal(states["rng.cpu.0"], states["rng.cpu.1"])  # seeded seed + rank

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*torchrun, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["checkpoint"] >= "step-00000003":
            break
        time.sleep(0.02)
    for worker in _children(proc.pid):  # torchrun starts each worker in a session of its own
        os.kill(worker, signal.SIGKILL)
    proc.kill()
    proc.wait()
    time.sleep(1)
    assert not (killed / "manifest.json").exists(), "the kill should land mid-run"
    resumed = subprocess.run([*torchrun, "--out", str(killed), "--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in metrics(killed) if m["kind"] == "train"] == list(range(1, 9))
    assert_same_run(clean, killed, rtol=1e-6, atol=1e-12)
