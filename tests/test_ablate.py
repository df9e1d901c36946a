"""`sdrt ablate`: the built-in paper grid end to end on the tiny backbone, reuse, resume and bad input."""

import json

import pytest

from sdrt_cli.ablate import builtin_grids, load_grid
from sdrt_cli.stages import stage_option_params

SMALL = [
    "--datasets", "synthetic-charts",
    "--set", "traces.backbone=llava-next-tiny", "--set", "traces.limit=2", "--set", "traces.split=train",
    "--set", "traces.max_new_tokens_step1=3", "--set", "traces.max_new_tokens_step2=2", "--set", "traces.pos=2",
    "--set", "distill.epochs=1", "--set", "ensemble.steps=5", "--set", "ensemble.holdout=0",
    "--set", "eval.split=validation", "--set", "eval.limit=1", "--set", "eval.max_new_tokens=2",
]


def test_every_shipped_grid_validates_against_the_real_commands():
    names = {stage: set(params) for stage, params in stage_option_params().items()}
    for name in builtin_grids():
        grid = load_grid(name, names)
        assert grid.ablations
    paper = load_grid("paper", names)
    assert [a.name for a in paper.ablations] == ["skip_connection", "loss", "adapter", "members"]
    assert paper.ablations[-1].values == [1, 2, 4, 8]
    # the paper's settings: traces (and so training) on train, scores on validation, Eq. 6 raw mse
    assert paper.defaults["traces"]["split"] == "train" and paper.defaults["eval"]["split"] == "validation"
    assert paper.defaults["distill"]["mse_scale"] == "raw"


@pytest.mark.slow
def test_paper_grid_runs_reuses_stages_and_resumes(cli, tmp_path):
    out = tmp_path / "ablate"
    first = cli("ablate", "--grid", "paper", *SMALL, "--out", out)
    assert first.exit_code == 0, first.output[-3000:]
    stages = sorted(p.name for p in (out / "stages").iterdir())
    # traces once; distill: default, skip off, mse, kl, and Table 5's one-adapter reft and lora (no
    # skip); ensembles: K=1,2,4,8 on the default adapters + K=4 on skip off, mse and kl + K=1 on the
    # one-adapter reft (none for lora); Table 5's full-method row reuses the default run
    assert sum(s.startswith("traces-") for s in stages) == 1
    assert sum(s.startswith("distill-") for s in stages) == 6
    assert sum(s.startswith("ensemble-") for s in stages) == 8
    for table in ("skip_connection", "loss", "adapter", "members"):
        rows = json.loads((out / "tables" / f"{table}.json").read_text())["rows"]
        assert all(row["synthetic-charts"] is not None for row in rows)
        assert (out / "tables" / f"{table}.md").exists() and (out / "tables" / f"{table}.csv").exists()
    assert (out / "plots" / "members.png").stat().st_size > 1000
    adapter_rows = json.loads((out / "tables" / "adapter.json").read_text())["rows"]
    assert [row["Adapter"] for row in adapter_rows] == ["Intervention", "LoRA", "Full method (K = 4, skip)"]
    # like with like: both compared rows are one first-prompt adapter without the skip connection
    distilled = [json.loads((out / "stages" / s / ".done").read_text())["options"] for s in stages if s.startswith("distill-")]
    one_adapter = [o for o in distilled if o.get("prompts") == "1"]
    assert sorted(o["adapter"] for o in one_adapter) == ["lora", "reft"] and all(not o.get("skip") for o in one_adapter)
    full_method = adapter_rows[2]["synthetic-charts"]
    k4 = json.loads((out / "tables" / "members.json").read_text())["rows"][2]
    assert k4["K"] == "4" and full_method == k4["synthetic-charts"]  # the same default run
    assert "mse is the paper's Eq. 6 (raw" in (out / "tables" / "loss.md").read_text()
    assert "Intervention and LoRA rows" in (out / "tables" / "adapter.md").read_text()
    page = (out / "report.html").read_text()
    assert "Table 4" in page and page.count('href="stages/eval-') == sum(s.startswith("eval-") for s in stages)
    shown = json.loads(cli("show", out, "--json").out)
    assert (shown["kind"], shown["status"]) == ("ablate", "complete") and set(shown["metrics"]) == {"skip_connection", "loss", "adapter", "members"}

    # interrupt: one eval stage lost its marker -> only that stage runs again
    lost = next(p for p in (out / "stages").iterdir() if p.name.startswith("eval-"))
    (lost / ".done").unlink()
    again = cli("ablate", "--grid", "paper", *SMALL, "--out", out)
    assert again.exit_code == 0, again.output[-3000:]
    assert again.err.count("ran (") == 1 and f"eval stage {lost.name}" in again.err.split("ran (")[1]


def test_bad_grids_and_overrides_fail_in_one_sentence(cli, tmp_path):
    result = cli("ablate", "--grid", "papr", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "Did you mean 'paper'?" in result.err
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ndatasets = ["synthetic-charts"]\n[[ablations]]\nname = "a"\nstage = "distill"\noption = "lossy"\nvalues = [1]\n')
    result = cli("ablate", "--grid", bad, "--out", tmp_path / "o")
    assert result.exit_code == 1 and f"grid file {bad}: ablations[0].option 'lossy' is not an option of `sdrt distill`" in result.err
    result = cli("ablate", "--grid", "paper", "--set", "traces.limit", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "is not STAGE.OPTION=VALUE" in result.err
    result = cli("ablate", "--grid", "paper", "--set", "train.limit=3", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "'train' is not a stage" in result.err
    assert not (tmp_path / "o" / "stages").exists()
