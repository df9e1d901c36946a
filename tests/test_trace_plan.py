"""`sdrt traces --plan` and the free-space check: estimates against real stores on the tiny backbone."""

from __future__ import annotations

import re

import pytest

UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
BASE = ["traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--limit", "5", "--batch-size", "2",
        "--max-new-tokens-step1", "6"]


def stored_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def plan_value(output: str, row: str) -> float:
    match = re.search(re.escape(row) + r"\s*│\s*([0-9.]+) (B|KB|MB|GB|TB)", output)
    assert match, output
    return float(match.group(1)) * UNITS[match.group(2)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        ["--prompts", "2", "--pos", "3", "--max-new-tokens-step2", "5", "--store-dtype", "fp32"],
        ["--prompts", "3", "--pos", "2", "--max-new-tokens-step2", "8", "--store-dtype", "bf16", "--layers", "-1", "--top-k", "5"],
    ],
    ids=["fp32-3-layers", "bf16-1-layer"],
)
def test_plan_predicts_the_real_store_size_within_ten_percent(cli, tmp_path, settings):
    out = tmp_path / "store"
    planned = cli(*BASE, *settings, "--out", out, "--plan")
    assert planned.exit_code == 0, planned.output
    assert not out.exists()  # planning writes nothing
    assert "records (examples × prompts)" in planned.out and "time (estimate)" in planned.out
    expected = plan_value(planned.out, "bytes on disk (expected)")
    upper = plan_value(planned.out, "bytes on disk (upper bound)")

    ran = cli(*BASE, *settings, "--out", out)
    assert ran.exit_code == 0, ran.output
    real = stored_bytes(out)
    assert abs(expected - real) / real < 0.10, (expected, real)
    assert upper >= real * 0.999  # the bound the free-space check uses never undercounts


def test_traces_refuse_to_start_when_the_disk_is_too_small(cli, tmp_path):
    out = tmp_path / "store"
    # a 10^9-token answer budget: the store may need far more than any disk holds
    result = cli(*BASE, "--prompts", "2", "--max-new-tokens-step2", "1000000000", "--out", out)
    assert result.exit_code == 1
    flat = " ".join(result.err.split())  # one sentence (Rich may wrap it)
    assert flat.startswith("Error:") and flat.count("Error:") == 1
    assert re.search(r"has [0-9.]+ [KMGT]?B free but the trace store may need up to [0-9.]+ TB", flat), flat
    assert "--no-space-check" in flat
    assert not out.exists()  # refused before anything was written
