"""Split discipline through the CLI: runs record the examples they learned from, `sdrt eval` refuses
to score lora/sdrt on them (or, with --allow-train-overlap, says so in every results file), and
`sdrt ablate` refuses a grid scored on its traces split."""

from __future__ import annotations

import json
import shutil

import pytest

from sdrt_cli.ablate import load_grid, plan_runs
from sdrt_cli.errors import SdrtError
from sdrt_cli.stages import stage_option_params
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

EVAL = ["eval", "--backbone", "llava-next-tiny", "--max-new-tokens", "1", "--dataset", "synthetic-charts"]


def refused(result, out):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.err.strip().splitlines()) == 1
    assert not out.exists()
    return result.err


@pytest.mark.slow
def test_distill_and_ensemble_record_the_examples_they_learned_from(cli, traces_dir, tmp_path):
    adapters = tmp_path / "adapters"
    steps = ["--max-steps", "1", "--batch-size", "2"]
    assert cli("distill", "--traces", traces_dir, "--out", adapters, "--limit", "2", *steps).exit_code == 0
    manifest = json.loads((adapters / "manifest.json").read_text())
    # --limit 2: only the store's first two examples trained the adapters
    assert manifest["trained_on"] == {
        "dataset": "synthetic-charts", "split": "train", "data_dir": None,
        "example_ids": ["synthetic-charts/train/0", "synthetic-charts/train/1"],
    }
    assert cli("ensemble", "--adapters", adapters, "--traces", traces_dir, "--steps", "2").exit_code == 0
    ensemble = json.loads((adapters / "ensembles" / "k2" / "adapter.json").read_text())
    # the predictor learned from the whole store (3 examples)
    assert ensemble["trained_on"]["example_ids"] == [f"synthetic-charts/train/{i}" for i in range(3)]
    assert cli("ensemble", "--adapters", adapters, "--uniform").exit_code == 0
    assert json.loads((adapters / "ensembles" / "uniform-k2" / "adapter.json").read_text())["trained_on"] is None

    gold = tmp_path / "gold"
    result = cli(
        "distill", "--loss", "ce", "--adapter", "lora", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts",
        "--split", "train", "--limit", "2", "--layers", "-1", "--rank", "2", "--out", gold, *steps,
    )
    assert result.exit_code == 0, result.output
    assert json.loads((gold / "manifest.json").read_text())["trained_on"]["example_ids"] == ["synthetic-charts/train/0", "synthetic-charts/train/1"]


def test_eval_refuses_sdrt_on_the_adapters_training_examples(cli, adapters_dir, tmp_path):
    out = tmp_path / "eval"
    err = refused(cli(*EVAL, "--split", "train", "--limit", "2", "--method", "prompt,sdrt", "--adapters", adapters_dir, "--ensemble", "uniform-k2", "--out", out), out)
    assert f"adapters run {adapters_dir} was trained on 2 of the 2 'synthetic-charts' 'train' examples being scored" in err
    assert "--allow-train-overlap" in err


def test_eval_refuses_sdrt_on_the_ensemble_predictors_training_examples(cli, adapters_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapters_dir, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["trained_on"]["example_ids"] = []  # adapters that learned from none of them
    (run / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "eval"
    err = refused(cli(*EVAL, "--split", "train", "--limit", "3", "--method", "sdrt", "--adapters", run, "--ensemble", "k2", "--out", out), out)
    assert f"ensemble 'k2' of {run} was trained on 3 of the 3 'synthetic-charts' 'train' examples being scored" in err


def test_eval_refuses_lora_on_its_training_examples_and_a_run_that_does_not_say(cli, lora_dir, tmp_path):
    out = tmp_path / "eval"
    err = refused(cli(*EVAL, "--split", "train", "--limit", "5", "--method", "lora", "--lora", lora_dir, "--out", out), out)
    assert f"LoRA run {lora_dir} was trained on 3 of the 5 'synthetic-charts' 'train' examples being scored" in err

    old = tmp_path / "old"
    shutil.copytree(lora_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["trained_on"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    err = refused(cli(*EVAL, "--limit", "1", "--method", "lora", "--lora", old, "--out", out), out)
    assert f"LoRA run {old} does not record the examples it was trained on" in err


@pytest.mark.slow
def test_allow_train_overlap_scores_but_every_results_file_carries_the_warning(cli, lora_dir, tmp_path):
    out = tmp_path / "eval"
    result = cli(*EVAL, "--split", "train", "--limit", "2", "--method", "prompt,lora", "--lora", lora_dir, "--allow-train-overlap", "--out", out)
    assert result.exit_code == 0, result.output
    warning = f"WARNING: not a valid evaluation (--allow-train-overlap): LoRA run {lora_dir} was trained on 2 of the 2 'synthetic-charts' 'train' examples being scored."
    assert json.loads((out / "results.json").read_text())["warning"] == warning
    assert f"**{warning}**" in (out / "results.md").read_text().splitlines()
    assert "not a valid evaluation" in result.err
    # disjoint examples: no warning at all
    clean = tmp_path / "clean"
    result = cli(*EVAL, "--split", "validation", "--limit", "1", "--method", "lora", "--lora", lora_dir, "--allow-train-overlap", "--out", clean)
    assert result.exit_code == 0, result.output
    assert "warning" not in json.loads((clean / "results.json").read_text())
    assert "WARNING" not in (clean / "results.md").read_text()


def test_ablate_refuses_a_grid_scored_on_its_traces_split(cli, tmp_path):
    out = tmp_path / "ablate"
    base = ["ablate", "--grid", "paper", "--datasets", "synthetic-charts", "--set", "traces.backbone=llava-next-tiny", "--out", out]
    err = refused(cli(*base, "--set", "traces.split=validation", "--set", "eval.split=validation"), out)
    assert "grid 'paper' would score 'synthetic-charts' on split 'validation', the split its traces were made from" in err
    assert "eval.allow_train_overlap = true" in err
    # no split named anywhere: both are the dataset's default split
    grid = tmp_path / "grid.toml"
    grid.write_text(
        'name = "nosplit"\ndatasets = ["synthetic-charts"]\n'
        '[[ablations]]\nname = "k"\nstage = "ensemble"\noption = "members"\nvalues = [1]\n'
    )
    err = refused(cli("ablate", "--grid", grid, "--out", out), out)
    assert "grid 'nosplit' would score 'synthetic-charts' on split 'validation'" in err


def test_a_grid_may_allow_the_overlap_explicitly_and_eval_then_warns():
    names = {stage: set(params) for stage, params in stage_option_params().items()}
    grid = load_grid("paper", names)
    with pytest.raises(SdrtError, match="the split its traces were made from"):
        plan_runs(grid, {"eval": {"split": "train"}})
    runs = plan_runs(grid, {"eval": {"split": "train", "allow_train_overlap": True}})
    assert all(run.options["eval"]["allow_train_overlap"] for run in runs)
    from sdrt_cli.ablate import to_argv

    argv = to_argv("eval", {"allow_train_overlap": True}, stage_option_params()["eval"])
    assert argv == ["eval", "--allow-train-overlap"]


def test_examples_match_by_dataset_split_and_id_only():
    from sdrt_cli.overlap import TrainedRun, check_train_overlap, trained_on

    data = SyntheticCharts(split="validation", limit=4)
    same_ids_other_split = TrainedRun("r", trained_on({"name": "synthetic-charts", "split": "train"}, [f"synthetic-charts/validation/{i}" for i in range(4)]))
    assert check_train_overlap(data, [same_ids_other_split], allow=False) is None
    elsewhere = TrainedRun("r", trained_on({"name": "synthetic-charts", "split": "validation", "data_dir": "/copy"}, ["synthetic-charts/validation/3", "x"]))
    with pytest.raises(SdrtError, match="r was trained on 1 of the 4 'synthetic-charts' 'validation' examples"):
        check_train_overlap(data, [elsewhere], allow=False)
