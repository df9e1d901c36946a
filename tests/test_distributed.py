"""Process-group setup: backend per device, configurable collective timeout, and every collective
sdrt uses under a real torchrun with 2 gloo processes."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from sdrt_cli import distributed
from sdrt_cli.errors import SdrtError

PROBE = Path(__file__).with_name("distributed_probe.py")


def test_backend_reduces_cpu_tensors_over_gloo_even_when_cuda_is_present():
    assert distributed.process_group_backend(cuda_available=True) == "cpu:gloo,cuda:nccl"
    assert distributed.process_group_backend(cuda_available=False) == "gloo"


def test_a_cpu_device_binds_no_gpu():
    assert distributed.rank_cuda_device("cpu") is None


def test_timeout_defaults_to_hours_and_reads_the_environment():
    assert distributed.collective_timeout({}) == timedelta(hours=6)
    assert distributed.collective_timeout({"SDRT_DIST_TIMEOUT_MIN": "90"}) == timedelta(minutes=90)
    assert distributed.collective_timeout({"SDRT_DIST_TIMEOUT_MIN": "0.5"}) == timedelta(seconds=30)


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_timeout_is_one_sentence_naming_the_variable(value):
    with pytest.raises(SdrtError, match=rf"^SDRT_DIST_TIMEOUT_MIN='{value}' is not a positive number of minutes$"):
        distributed.collective_timeout({"SDRT_DIST_TIMEOUT_MIN": value})


def _torchrun_probe(sleep: float, timeout_min: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_SLEEP": str(sleep)}
    env.pop("SDRT_DIST_TIMEOUT_MIN", None)
    if timeout_min is not None:
        env["SDRT_DIST_TIMEOUT_MIN"] = timeout_min
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(PROBE)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_collectives_wait_for_a_straggler_up_to_the_configured_timeout():
    # a 6 s straggler is waited for under the default timeout...
    waited = _torchrun_probe(sleep=6, timeout_min=None)
    assert waited.returncode == 0, waited.stderr[-3000:]
    assert "rank 0 passed" in waited.stdout and "rank 1 passed" in waited.stdout
    # ...and the barrier gives up on it after SDRT_DIST_TIMEOUT_MIN (here 3 s)
    gave_up = _torchrun_probe(sleep=6, timeout_min="0.05")
    assert gave_up.returncode != 0
    assert "rank 0 passed" not in gave_up.stdout
    assert "timed out" in gave_up.stderr.lower() or "timeout" in gave_up.stderr.lower(), gave_up.stderr[-3000:]
