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
    # MmDC's Table 4 (tau, with its "1" run as 1.01: no instruction difficult) and Figure 4
    mmdc = load_grid("mmdc", names)
    assert [(a.name, a.stage, a.option, a.values) for a in mmdc.ablations] == [
        ("threshold", "calibrate", "tau", [0.0, 0.33, 0.67, 1.01]), ("iterations", "calibrate", "iterations", [1, 2, 3]),
        ("alignment", "calibrate", "align", [False, True]),
    ]
    assert mmdc.defaults["traces"]["split"] == "train" and mmdc.defaults["calibrate"]["eval_split"] == "validation"


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


# the mmdc grid on the tiny backbone: the tau rows run one iteration; the iterations rows 1..3
MMDC_SMALL = [
    "--grid", "mmdc", "--datasets", "synthetic-charts",
    "--set", "traces.backbone=llava-next-tiny", "--set", "traces.limit=2", "--set", "traces.prompts=2",
    "--set", "traces.max_new_tokens_step1=2", "--set", "traces.max_new_tokens_step2=2", "--set", "traces.pos=3",
    "--set", "distill.epochs=1", "--set", "ensemble.steps=2",
    "--set", "calibrate.iterations=1", "--set", "calibrate.assessor=metric", "--set", "calibrate.eval_split=test",
    "--set", "calibrate.eval_limit=1", "--set", "calibrate.max_new_tokens=2", "--set", "calibrate.max_new_tokens_step1=2",
    "--set", "calibrate.augment_max_new_tokens=6",
]


@pytest.mark.slow
def test_mmdc_grid_runs_calibrations_and_reads_every_iteration_from_one(cli, tmp_path):
    from sdrt_cli.formats import EvalResults

    out = tmp_path / "ablate"
    first = cli("ablate", *MMDC_SMALL, "--out", out)
    assert first.exit_code == 0, first.output[-3000:]
    calibrations = sorted(p for p in (out / "stages").iterdir())
    # one calibration per tau; the iterations rows continue the tau = 0.33 one (1 -> 3 iterations), which
    # is also the row without alignment; the row with it is one more calibration
    options = {p: json.loads((p / ".done").read_text())["options"] for p in calibrations}
    assert sorted((o["tau"], o["iterations"], o.get("align", False)) for o in options.values()) == [
        (0.0, 1, False), (0.33, 1, True), (0.33, 3, False), (0.67, 1, False), (1.01, 1, False),
    ]
    assert all(p.name.startswith("calibrate-") for p in calibrations)
    shared = next(p for p, o in options.items() if o["tau"] == 0.33 and not o.get("align"))
    # the grid's traces, distill and ensemble options reached the calibration's own stages
    assert json.loads((shared / "iter-1" / "traces" / "manifest.json").read_text())["num_examples"] == 2
    assert "distill.epochs=1" in options[shared]["set_"] and options[shared]["backbone"] == "llava-next-tiny"

    def score(directory, n):
        return round(100 * EvalResults.load(directory / f"iter-{n}" / "heldout").score("sdrt"), 1)

    iterations = json.loads((out / "tables" / "iterations.json").read_text())["rows"]
    assert [(r["Iterations"], r["synthetic-charts"]) for r in iterations] == [(str(n), score(shared, n)) for n in (1, 2, 3)]
    threshold = json.loads((out / "tables" / "threshold.json").read_text())["rows"]
    by_tau = {o["tau"]: p for p, o in options.items() if not o.get("align")}
    labels = (("0 (no easy)", 0.0), ("0.33", 0.33), ("0.67", 0.67), ("1 (no difficult)", 1.01))
    assert [(r["tau"], r["synthetic-charts"]) for r in threshold] == [(label, score(by_tau[tau], 1)) for label, tau in labels]
    assert (out / "plots" / "iterations.png").stat().st_size > 1000
    aligned = next(p for p, o in options.items() if o.get("align"))
    assert (aligned / "stages" / "align.done").exists()
    alignment = json.loads((out / "tables" / "alignment.json").read_text())["rows"]
    assert [(r["Alignment"], r["synthetic-charts"]) for r in alignment] == [("w/o alignment", score(shared, 1)), ("with alignment", score(aligned, 1))]

    # the tiny student scores 0 everywhere: mark each held-out eval with its own score to see which
    # one each row reads; the same command again reuses every calibration and rewrites the tables
    marks = {(p, n): 0.01 * (10 * i + n) for i, p in enumerate(calibrations) for n in (1, 2, 3) if (p / f"iter-{n}" / "heldout").is_dir()}
    for (p, n), mark in marks.items():
        results = json.loads((p / f"iter-{n}" / "heldout" / "results.json").read_text())
        results["methods"]["sdrt"]["overall"] = mark
        (p / f"iter-{n}" / "heldout" / "results.json").write_text(json.dumps(results))
    again = cli("ablate", *MMDC_SMALL, "--out", out)
    assert again.exit_code == 0 and "ran (" not in again.err
    iterations = json.loads((out / "tables" / "iterations.json").read_text())["rows"]
    assert [r["synthetic-charts"] for r in iterations] == [round(100 * marks[shared, n], 1) for n in (1, 2, 3)]
    threshold = json.loads((out / "tables" / "threshold.json").read_text())["rows"]
    assert [r["synthetic-charts"] for r in threshold] == [round(100 * marks[by_tau[tau], 1], 1) for _, tau in labels]


@pytest.mark.parametrize(
    "extra, message",
    [
        # the overlap guard: a calibration is scored on a split it never started from
        (["--set", "calibrate.eval_split=train"], "grid 'mmdc' would score 'synthetic-charts' on split 'train', the split its calibration starts from"),
        (["--set", "calibrate.split=test", "--set", "calibrate.eval_split=test"], "on split 'test', the split its calibration starts from"),
        (["--set", "traces.overwrite=true"], "traces.overwrite cannot be set for ablation 'threshold': it runs `sdrt calibrate`"),
    ],
)
def test_calibrate_entries_refuse_a_bad_plan_before_writing(cli, tmp_path, extra, message):
    out = tmp_path / "ablate"
    result = cli("ablate", "--grid", "mmdc", "--datasets", "synthetic-charts", *extra, "--out", out)
    assert result.exit_code == 1 and message in result.err, result.err
    assert not (out / "stages").exists()


def test_a_calibrate_entry_without_a_heldout_split_is_refused(cli, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('name = "g"\ndatasets = ["synthetic-charts"]\n[[ablations]]\nname = "tau"\nstage = "calibrate"\noption = "tau"\nvalues = [0.0, 0.33]\n')
    result = cli("ablate", "--grid", grid, "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert "grid 'g': ablation 'tau' is scored by the held-out accuracy `sdrt calibrate` measures on calibrate.eval_split, which is not set" in result.err
