"""The checker `bench/gpu_smoke.sh` runs: finite tensors, agreement with the reference, tolerances."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("gpu_smoke_check", BENCH / "gpu_smoke_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A pipeline folder with a real trace store and eval predictions."""
    from sdrt_cli.cli import main

    root = tmp_path_factory.mktemp("smoke") / "cpu-fp32"
    args = [
        "traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--limit", "2", "--prompts", "1",
        "--max-new-tokens-step1", "2", "--max-new-tokens-step2", "2", "--store-dtype", "fp32", "--out", str(root / "traces"),
    ]
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code
    write_predictions(root, {"a": ("12", 1.0), "b": ("7", 0.0)})
    (root / "timings.jsonl").write_text(json.dumps({"stage": "traces", "seconds": 2.0, "examples": 2, "processes": 1, "peak_gpu_mib": None}) + "\n")
    return root


def write_predictions(root: Path, answers: dict[str, tuple[str, float]]) -> None:
    folder = root / "eval" / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": key, "output": output, "score": score}) for key, (output, score) in answers.items()]
    (folder / "prompt.jsonl").write_text("\n".join(lines) + "\n")


def test_an_identical_run_passes_and_reports_throughput(checker, reference):
    out = reference.parent
    shutil.copytree(reference, out / "same", dirs_exist_ok=True)
    report, failures = checker.check(out, "cpu-fp32", [("same", "fp32")])
    assert failures == []
    result = report["pipelines"]["same"]
    assert result["traces"]["token_agreement"] == 1.0 and result["traces"]["hidden_relative"] == 0.0
    assert result["eval"]["prompt"]["answer_agreement"] == 1.0
    assert result["throughput"][0]["examples_per_s"] == 1.0


def test_a_nan_in_a_stored_tensor_is_named(checker, reference, capsys):
    out = reference.parent
    shutil.copytree(reference, out / "nan", dirs_exist_ok=True)
    weights = {"A": torch.zeros(2, 3), "B": torch.tensor([1.0, float("inf")]), "steps": torch.tensor([3])}
    (out / "nan" / "adapters" / "p").mkdir(parents=True)
    save_file(weights, out / "nan" / "adapters" / "p" / "adapter.safetensors")
    assert checker.main([str(out), "--reference", "cpu-fp32", "--compare", "nan:bf16"]) == 1
    assert "nan: non-finite adapters/p/adapter.safetensors: B" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["failures"] == ["nan: non-finite adapters/p/adapter.safetensors: B"]


def test_a_corrupt_store_is_a_failure_that_says_why(checker, reference):
    out = reference.parent
    shutil.copytree(reference, out / "corrupt", dirs_exist_ok=True)
    shard = sorted((out / "corrupt" / "traces" / "shards").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, shard)
    _, failures = checker.check(out, "cpu-fp32", [("corrupt", "fp32")])
    assert len(failures) == 1 and "is corrupt or truncated" in failures[0]


def test_answer_agreement_and_score_consistency_follow_the_precision(checker, reference):
    out = reference.parent
    shutil.copytree(reference, out / "drift", dirs_exist_ok=True)
    write_predictions(out / "drift", {"a": ("13", 0.0), "b": ("7", 0.0)})  # one answer of two differs
    report, failures = checker.check(out, "cpu-fp32", [("drift", "fp32")])
    assert report["pipelines"]["drift"]["eval"]["prompt"]["answer_agreement"] == 0.5
    assert failures == ["drift: eval prompt: 50% of answers equal the reference's (at least 90%)"]
    _, failures = checker.check(out, "cpu-fp32", [("drift", "bf16")])
    assert failures == []  # bf16 reports agreement, it does not enforce it
    write_predictions(out / "drift", {"a": ("12", 0.0), "b": ("7", 0.0)})  # same answers, another score
    _, failures = checker.check(out, "cpu-fp32", [("drift", "bf16")])
    assert failures == ["drift: eval prompt: the score moved by more than the share of differing answers"]


def test_a_missing_pipeline_and_an_unknown_precision_are_failures(checker, reference):
    _, failures = checker.check(reference.parent, "cpu-fp32", [("absent", "fp32"), ("cpu-fp32", "fp8")])
    assert any("absent does not exist" in f for f in failures)
    assert any("fp8: the precision is not one of fp32, bf16" in f for f in failures)
