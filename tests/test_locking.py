"""One writer per run directory: the lock itself, a dead holder's lock taken over, and two concurrent
`sdrt traces` / `sdrt distill` on one directory (the second refuses, the first ends as a lone run)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fault_helpers import ENV, TRACE_ARGS, assert_same_adapters, assert_same_store, sdrt
from sdrt_cli.errors import SdrtError
from sdrt_cli.locking import LOCK_FILE, RunDirectoryBusy, run_lock

HOLD = """
import sys, time
from sdrt_cli.locking import run_lock
with run_lock(sys.argv[1], "traces"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_in_another_process(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = hold_in_another_process(out)
    try:
        with pytest.raises(RunDirectoryBusy) as refused:
            with run_lock(out, "distill"):
                pass
        message = str(refused.value)
        assert message.startswith(f"{out} is being written by pid {holder.pid} on host {socket.gethostname()}, started ")
        assert "running `sdrt traces`" in message and message.count(". ") == 0  # one sentence
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holders_lock_is_taken_over_with_a_sentence(tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_in_another_process(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # what the dead holder left
    half_written = out / "shards" / ".r000-000003.safetensors.x1y2.tmp"  # a write the kill cut short
    other_run = out / "stages" / "traces-abc"  # a nested run directory sweeps its own
    for path in (half_written, other_run / ".manifest.json.z9.tmp", other_run / LOCK_FILE):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    with run_lock(out, "traces"):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert not half_written.exists() and (other_run / ".manifest.json.z9.tmp").exists()
    err = capsys.readouterr().err
    assert f"Taking over the lock of {out}: its holder (pid {holder.pid} on host" in err and "is gone without releasing it" in err


def test_the_lock_is_reentrant_nests_and_leaves_nothing_behind(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    with run_lock(existing, "ablate"):
        with run_lock(existing, "ablate"):  # the same directory again in the same process
            with run_lock(existing / "stages" / "abc", "traces"):  # a stage directory inside it
                assert (existing / "stages" / "abc" / LOCK_FILE).exists()
            assert (existing / LOCK_FILE).exists()
        assert (existing / LOCK_FILE).exists()  # still held by the outer block
    assert list(existing.iterdir()) == [existing / "stages"]  # the stage wrote nothing: its lock file went
    # a directory the lock created and nothing was written to is removed again
    fresh = tmp_path / "fresh"
    with run_lock(fresh, "eval"):
        assert fresh.is_dir()
    assert not fresh.exists()
    with run_lock(None, "eval"):  # no --out: the command's own refusal names it
        pass


def test_out_that_is_a_file_is_one_sentence(cli, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    for command in (TRACE_ARGS, ["eval", "--method", "prompt", "--dataset", "synthetic-charts"], ["ablate"]):
        result = cli(*command, "--out", target)
        assert result.exit_code == 1 and f"output directory {target} is an existing file; choose a directory path" in result.err
        assert "Traceback" not in result.output
    assert target.read_text() == "keep me"


def test_a_lock_on_a_read_only_directory_is_one_sentence(tmp_path, monkeypatch):
    import errno

    import sdrt_cli.locking as locking

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(locking, "open", refuse, raising=False)
    with pytest.raises(SdrtError, match=f"cannot write {tmp_path / LOCK_FILE}: the file system is read-only; choose a writable output directory"):
        with run_lock(tmp_path, "traces"):
            pass


def _wait_for_holder(out: Path, proc: subprocess.Popen) -> int:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            return json.loads((out / LOCK_FILE).read_text())["pid"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    raise AssertionError("the first command never took the lock")


@pytest.mark.slow
def test_two_concurrent_traces_the_second_refuses_the_first_ends_as_a_lone_run(cli, tmp_path):
    args = [*TRACE_ARGS, "--limit", "3", "--batch-size", "1"]
    lone = tmp_path / "lone"
    subprocess.run(sdrt(*args, "--out", lone), check=True, capture_output=True, env=ENV)
    out = tmp_path / "shared"
    first = subprocess.Popen(sdrt(*args, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    pid = _wait_for_holder(out, first)
    second = cli(*args, "--out", out)
    assert first.poll() is None, "the first run should still be running"
    assert second.exit_code == 1
    assert f"{out} is being written by pid {pid} on host {socket.gethostname()}" in second.err and "running `sdrt traces`" in second.err
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert_same_store(lone, out)
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_two_concurrent_distills_the_second_refuses_the_first_ends_as_a_lone_run(cli, tmp_path, tiny_trace_store):
    args = ["distill", "--traces", tiny_trace_store, "--epochs", "2", "--batch-size", "1", "--rank", "2"]
    lone = tmp_path / "lone"
    subprocess.run(sdrt(*args, "--out", lone), check=True, capture_output=True, env=ENV)
    out = tmp_path / "shared"
    first = subprocess.Popen(sdrt(*args, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    pid = _wait_for_holder(out, first)
    for extra in ([], ["--resume"], ["--overwrite"]):  # not even --overwrite may pull the directory from under it
        second = cli(*args, "--out", out, *extra)
        assert second.exit_code == 1 and f"{out} is being written by pid {pid}" in second.err
    assert first.poll() is None, "the first run should still be running"
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert_same_adapters(lone, out)


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_every_rank_learns_the_refusal(tmp_path):
    out = tmp_path / "run"
    holder = hold_in_another_process(out)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sdrt_cli",
               *TRACE_ARGS, "--limit", "2", "--out", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    # rank 0 tried the lock; rank 1 did not wait on it but raised the same sentence
    assert result.stderr.count(f"{out} is being written by pid {holder.pid}") == 2, result.stderr[-3000:]
    assert "RunDirectoryBusy" not in result.stderr  # a sentence on each rank, not our traceback (torchrun adds its own report)
