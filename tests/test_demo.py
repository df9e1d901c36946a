"""`sdrt demo`: the whole pipeline and its small ablation, at test size (the tiny backbone stands in
for llava-smollm2-demo, whose generation is tested in test_backbone_smollm2.py)."""

import json

import pytest


@pytest.mark.slow
def test_demo_runs_the_pipeline_prints_the_table_and_reuses_stages(cli, tmp_path):
    out = tmp_path / "demo"
    # a random backbone answers nothing right, so `correct` (demo.toml's rule) would leave no traces
    args = ["demo", "--backbone", "llava-next-tiny", "--select", "all", "--train-examples", "2", "--eval-examples", "1", "--epochs", "1", "--out", out]
    first = cli(*args)
    assert first.exit_code == 0, first.output[-3000:]
    assert "has no trained vision" in first.out
    assert "Prompting" in first.out and "Visual CoT prompting" in first.out and "SDRT" in first.out
    results = json.loads((out / "compare" / "results.json").read_text())
    assert set(results["methods"]) == {"prompt", "cot", "sdrt"}
    rows = json.loads((out / "tables" / "members.json").read_text())["rows"]
    assert [row["K"] for row in rows] == ["1", "2", "4"]
    assert (out / "plots" / "members.png").exists()
    assert json.loads((out / "run.json").read_text())["command"] == "demo"

    # the student-vs-teacher table: accuracy for all three, KL and agreement for the single-step ones
    assert "Does the single-step student move toward its two-step teacher?" in first.out
    teacher = json.loads((out / "compare" / "teacher.json").read_text())
    rows = teacher["rows"]
    assert teacher["examples"] == 1
    for method in ("prompt", "sdrt"):
        # (the tiny random backbone's distributions are near uniform: its KLs are float noise around 0)
        assert rows[method]["kl"]["value"] > -1e-5 and rows[method]["agreement"]["value"] in (0.0, 1.0)
    assert set(rows) == {"prompt", "cot", "sdrt"} and all(rows[m]["accuracy"]["examples"] == 1 for m in rows)
    # the table says which traces trained the adapters (--select, else demo.toml's) and how many per prompt
    assert "traces `--select all` keeps; records kept per prompt:" in (out / "compare" / "teacher.md").read_text()
    assert "--select all" in " ".join(first.out.split())
    # the held-out teachers are the eval examples, never the training ones
    from sdrt_cli.trace_store import TraceStore

    def example_ids(store):
        return {store.record(i, store.prompt_ids[0]).example_id for i in store.example_indices}

    trained = set().union(*(example_ids(TraceStore(path)) for path in (out / "stages").glob("traces-*")))
    measured = example_ids(TraceStore(out / "heldout-traces"))
    predicted = {json.loads(line)["id"] for line in (out / "compare" / "predictions" / "sdrt.jsonl").read_text().splitlines() if line.strip()}
    assert measured == predicted and all(i.startswith("synthetic-charts/validation/") for i in measured)
    assert trained and all(i.startswith("synthetic-charts/train/") for i in trained)
    # the run's report links the comparison's and every finished stage's report, all written
    assert f"Report: {out / 'report.html'}" in " ".join(first.out.split())
    page = (out / "report.html").read_text()
    assert 'href="compare/report.html' in page and (out / "compare" / "report.html").exists()
    assert "data:image/png;base64," in page  # the K plot, embedded
    for stage in (out / "stages").iterdir():
        if stage.name.startswith(("traces-", "eval-")):
            assert (stage / "report.html").exists() and f'href="stages/{stage.name}/report.html"' in page
    shown = cli("show", out, "--json")
    assert json.loads(shown.out)["kind"] == "demo" and json.loads(shown.out)["status"] == "complete"
    again = cli(*args)
    assert again.exit_code == 0
    assert "ran (" not in again.err  # every stage reused


def test_demo_refuses_in_one_sentence_when_its_selection_leaves_a_prompt_no_traces(cli, tmp_path):
    # demo.toml's rule is `correct`; the random tiny backbone answers nothing right
    out = tmp_path / "demo"
    result = cli("demo", "--backbone", "llava-next-tiny", "--train-examples", "2", "--eval-examples", "1", "--epochs", "1", "--out", out)
    assert result.exit_code != 0
    message = " ".join(result.err.split())
    assert "keeps 0 of its 2 training records under --select correct" in message and "choose a looser rule" in message
    assert "Traceback" not in result.output
    # the finished trace stage is kept: `--select all` resumes from it
    assert any((out / "stages").glob("traces-*"))
