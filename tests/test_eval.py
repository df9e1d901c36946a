"""`sdrt eval`: each method against a naive reference, the comparison report, the five benchmark
formats, hidden-answer splits, refusals, and torchrun (2 CPU processes = 1 process)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from fixtures_datasets import make_chartqa_official, make_figureqa, make_lmms_docvqa, make_mmmu, make_rrc_infovqa
from sdrt_cli.evaluate import (
    CotMethod,
    GenerationSettings,
    LoraMethod,
    PromptMethod,
    build_results,
    lora_checkpoint,
    results_markdown,
)
from sdrt_cli.metrics import get_metric
from sdrt_cli.packs import load_pack
from sdrt_cli.reference import naive_trace
from sdrt_cli.traces import TraceSettings, student_turns
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

TINY = ["--backbone", "llava-next-tiny", "--max-new-tokens", "4", "--max-new-tokens-step1", "5"]


@torch.no_grad()
def hf_generate(backbone, model, data, example, max_new_tokens):
    """transformers' own generate on the processor's inputs: the reference for single-step methods."""
    text = backbone.render_chat(student_turns(data, example))
    inputs = backbone.processor(text=text, images=[im.convert("RGB") for im in example.images], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=backbone.pad_token_id)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_prompt_method_equals_transformers_generate(tiny):
    data = SyntheticCharts(limit=2)
    examples = list(data)
    batched = PromptMethod().generate(tiny, data, examples, GenerationSettings(max_new_tokens=5, batch_size=2))
    for ex, got in zip(examples, batched):
        assert got.output_ids == hf_generate(tiny, tiny.model, data, ex, 5)
        assert got.prompt == data.format_question(ex)


@pytest.mark.slow
def test_cot_answer_is_step_two_of_the_naive_two_step_loop(tiny):
    data = SyntheticCharts(limit=2)
    examples = list(data)
    pack = load_pack("visual_reasoning")
    prompt = pack.get("plan-then-solve")
    got = CotMethod(pack, prompt).generate(tiny, data, examples, GenerationSettings(max_new_tokens=4, max_new_tokens_step1=5, batch_size=2))
    settings = TraceSettings(max_new_tokens_step1=5, max_new_tokens_step2=4, pos=1, layers=(-1,), dtype="fp32")
    for index, (ex, out) in enumerate(zip(examples, got)):
        (reference,) = naive_trace(tiny, data, index, ex, [prompt], settings)
        assert (out.output_ids, out.output, out.extra["y1"]) == (reference.y2_ids, reference.y2, reference.y1)
        assert out.extra["prompt_id"] == "plan-then-solve" and out.prompt == reference.step2_text


@pytest.mark.slow
def test_lora_method_equals_generate_on_the_peft_model_and_restores_the_backbone(tiny, lora_dir):
    from sdrt_plugins.adapters.lora import load_lora

    data = SyntheticCharts(limit=2)
    examples = list(data)
    settings = GenerationSettings(max_new_tokens=5, batch_size=2)
    before = [g.output_ids for g in PromptMethod().generate(tiny, data, examples, settings)]
    method = LoraMethod(lora_dir, lora_checkpoint(lora_dir, tiny, None))
    with method.active(tiny):
        with_lora = method.generate(tiny, data, examples, settings)
    reference_model = copy.deepcopy(tiny.model)
    peft_model = load_lora(lora_dir / "adapters" / "gold", reference_model, list(reference_model.model.language_model.layers))
    for ex, got in zip(examples, with_lora):
        assert got.output_ids == hf_generate(tiny, peft_model, data, ex, 5)
    assert [g.output_ids for g in with_lora] != before
    after = [g.output_ids for g in PromptMethod().generate(tiny, data, examples, settings)]
    assert after == before


def test_report_is_table_one_layout_with_category_breakdowns():
    class Data:
        name, split, metric = "docvqa", "validation", "anls"

    class Named:
        def __init__(self, name):
            self.name, self.label = name, {"prompt": "Prompting", "sdrt": "SDRT (weighted adapter ensemble)"}[name]

        def describe(self):
            return {"method": self.name}

    def record(score, types):
        return {"score": score, "categories": {"question_type": types}}

    gathered = {
        "prompt": [record(1.0, ["form"]), record(0.0, ["form", "layout"]), record(0.5, ["layout"])],
        "sdrt": [record(1.0, ["form"]), record(1.0, ["form", "layout"]), record(0.25, ["layout"])],
    }
    timing = {m: {"seconds": 3.0, "examples": 3, "new_tokens": 9, "processes": 1} for m in gathered}
    results = build_results(Data(), [Named("prompt"), Named("sdrt")], gathered, timing, GenerationSettings(), True)
    assert results["methods"]["sdrt"]["overall"] == pytest.approx(0.75)
    lines = results_markdown(results).splitlines()
    assert "| Method | docvqa | n | s/example |" in lines
    assert "| Prompting | 50.0 | 3 | 1.000 |" in lines
    assert "| SDRT (weighted adapter ensemble) | 75.0 | 3 | 1.000 |" in lines
    assert "| Method | form (n=2) | layout (n=2) |" in lines
    assert "| Prompting | 50.0 | 25.0 |" in lines
    assert "| SDRT (weighted adapter ensemble) | 100.0 | 62.5 |" in lines


FORMATS = {
    "docvqa": (make_lmms_docvqa, [], "question_type"),
    "infographicvqa": (make_rrc_infovqa, [], "answer_type"),
    "chartqa": (make_chartqa_official, [], "subset"),
    "figureqa": (make_figureqa, [], "question_template"),
    "mmmu": (make_mmmu, [], "domain"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_benchmark_format_runs_all_four_methods_with_its_breakdown(cli, tmp_path, adapters_dir, lora_dir, name):
    build, extra, key = FORMATS[name]
    root = build(tmp_path / "data")
    out = tmp_path / "eval"
    result = cli(
        "eval", "--backbone", "llava-next-tiny", "--max-new-tokens", "2", "--max-new-tokens-step1", "2", "--dataset", name,
        "--data-dir", root, "--limit", "2", "--batch-size", "2", "--method", "prompt,cot,lora,sdrt",
        "--adapters", adapters_dir, "--ensemble", "uniform-k2", "--lora", lora_dir, "--out", out, *extra,
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["scored"] and results["metric"] == get_metric({"docvqa": "anls", "infographicvqa": "anls", "chartqa": "relaxed_accuracy", "figureqa": "yes_no_accuracy", "mmmu": "mmmu"}[name]).name
    assert list(results["methods"]) == ["prompt", "cot", "lora", "sdrt"]
    for method in results["methods"]:
        summary = results["methods"][method]
        # the plumbing of every format; the scores themselves are checked against hand-computed
        # values in test_scores_through_the_cli_are_the_hand_computed_anls_and_relaxed_accuracy
        assert summary["count"] == 2 and 0.0 <= summary["overall"] <= 1.0
        assert key in summary["categories"]
    assert results["methods"]["sdrt"]["weights"]["normalised_entropy"] == pytest.approx(1.0)  # uniform-k2


@pytest.mark.slow
def test_scores_through_the_cli_are_the_hand_computed_anls_and_relaxed_accuracy(cli, tmp_path):
    """Gold answers written around what the model is known to say, so every score is worked out by
    hand from the metric's definition: ANLS = 1 − edit distance / longer length (0 below 0.5, case
    and outer spaces ignored); relaxed accuracy = case-insensitive match for a non-number."""
    from fixtures_datasets import DOCVQA_TYPES, docvqa_rows, write_parquet, write_png

    def said(name, root):
        out = tmp_path / f"probe-{name}"
        result = cli("eval", *TINY, "--dataset", name, "--data-dir", root, "--limit", "3", "--method", "prompt", "--out", out)
        assert result.exit_code == 0, result.output
        return [json.loads(line)["output"] for line in (out / "predictions" / "prompt.jsonl").read_text().splitlines()]

    def scores(name, root):
        out = tmp_path / f"scored-{name}"
        result = cli("eval", *TINY, "--dataset", name, "--data-dir", root, "--limit", "3", "--method", "prompt", "--out", out)
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in (out / "predictions" / "prompt.jsonl").read_text().splitlines()]
        return [r["score"] for r in lines], json.loads((out / "results.json").read_text())["methods"]["prompt"]

    # DocVQA (ANLS): rows 0 and 2 are "layout" questions, row 1 "handwritten" and "form"
    def write_docvqa(root, answers):
        rows = docvqa_rows("val", 1000, 3)
        for row, gold in zip(rows, answers):
            row["answers"] = gold
        write_parquet(root / "DocVQA" / "validation-00000-of-00001.parquet", rows, DOCVQA_TYPES)
        return root

    outputs = said("docvqa", write_docvqa(tmp_path / "probe-docvqa-data", [["x"]] * 3))
    spoken = [o.strip() for o in outputs]
    assert all(len(o) >= 6 and "#" not in o for o in spoken), outputs  # long enough for a partial match
    n = len(spoken[1])
    answers = [
        ["no", f"  {spoken[0].upper()} "],  # the best gold answer counts; case and outer spaces do not: 1
        [spoken[1][:-2]],  # two characters short: 1 − 2/n (≥ 0.5)
        ["#" * len(spoken[2])],  # nothing in common: distance = length, similarity 0
    ]
    per_example, summary = scores("docvqa", write_docvqa(tmp_path / "docvqa-data", answers))
    partial = 1 - 2 / n
    assert per_example == pytest.approx([1.0, partial, 0.0])
    assert summary["overall"] == pytest.approx((1.0 + partial + 0.0) / 3)
    assert summary["categories"]["question_type"] == {
        "layout": {"score": pytest.approx(0.5), "count": 2},
        "handwritten": {"score": pytest.approx(partial), "count": 1},
        "form": {"score": pytest.approx(partial), "count": 1},
    }

    # ChartQA (relaxed accuracy): two human questions, then one augmented
    def write_chartqa(root, labels):
        folder = root / "ChartQA Dataset" / "test"
        (folder / "png").mkdir(parents=True, exist_ok=True)
        human = [{"imgname": f"h{i}.png", "query": f"What is the value of bar {i}?", "label": labels[i]} for i in range(2)]
        augmented = [{"imgname": "a0.png", "query": "Which year is highest?", "label": labels[2]}]
        for record in human + augmented:
            write_png(folder / "png" / record["imgname"], 6, 6)
        (folder / "test_human.json").write_text(json.dumps(human))
        (folder / "test_augmented.json").write_text(json.dumps(augmented))
        return root

    spoken = [o.strip() for o in said("chartqa", write_chartqa(tmp_path / "probe-chartqa-data", ["1", "2", "3"]))]
    labels = [spoken[0].upper(), spoken[1][:-1], spoken[2]]  # match (any case), one character off, exact
    per_example, summary = scores("chartqa", write_chartqa(tmp_path / "chartqa-data", labels))
    assert per_example == [1.0, 0.0, 1.0]
    assert summary["overall"] == pytest.approx(2 / 3)
    assert summary["categories"]["subset"] == {"human": {"score": 0.5, "count": 2}, "augmented": {"score": 1.0, "count": 1}}


def test_hidden_answer_split_writes_a_submission_instead_of_scores(cli, tmp_path):
    root = make_lmms_docvqa(tmp_path / "data")
    out = tmp_path / "eval"
    result = cli("eval", *TINY, "--dataset", "docvqa", "--data-dir", root, "--split", "test", "--method", "prompt", "--out", out)
    assert result.exit_code == 0, result.output
    assert "Not scored:" in result.err and "split 'test' has no answers" in result.err
    predictions = [json.loads(line) for line in (out / "predictions" / "prompt.jsonl").read_text().splitlines()]
    assert [p["score"] for p in predictions] == [None, None]
    submission = json.loads((out / "submission" / "prompt.json").read_text())
    assert submission == [{"questionId": int(p["id"]), "answer": p["parsed"]} for p in predictions]
    assert json.loads((out / "results.json").read_text())["scored"] is False


def _bad_eval_cases(adapters, lora_run, tmp_path):
    base = ["--dataset", "synthetic-charts", "--limit", "1"]
    return [
        (["--method", "prompt,sdr", *base], "unknown method 'sdr': use prompt, cot, lora, sdrt; did you mean 'sdrt'?"),
        ([*base], "choose what to evaluate with --method"),
        (["--method", "sdrt", *base], "--method sdrt needs --adapters DIR"),
        (["--method", "lora", *base], "--method lora needs --lora DIR"),
        (["--method", "cot", "--cot-prompt", "plan-then-solv", *base], "has no prompt 'plan-then-solv'"),
        (["--method", "sdrt", "--adapters", adapters, "--backbone", "llava-next-bench", *base], "were trained on backbone 'llava-next-tiny' from 'random:tiny:seed=0'"),
        (["--method", "sdrt", "--adapters", adapters, "--ensemble", "k9", *base], "has no ensemble 'k9' (saved: k2, uniform-k2)"),
        (["--method", "sdrt", "--adapters", adapters, *base], "choose an ensemble of"),
        (["--method", "sdrt", "--adapters", lora_run, "--ensemble", "k2", *base], "an ensemble combines per-prompt intervention adapters"),
        (["--method", "lora", "--lora", adapters, *base], "holds 'reft' adapters, not LoRA"),
        (["--method", "prompt", "--dataset", "synthetic-chart", "--limit", "1"], "Did you mean 'synthetic-charts'"),
        (["--method", "prompt", "--dataset", "docvqa", "--data-dir", tmp_path / "missing"], "missing"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_input_is_one_sentence_and_writes_nothing(cli, tmp_path, adapters_dir, lora_dir, case):
    args, message = _bad_eval_cases(adapters_dir, lora_dir, tmp_path)[case]
    out = tmp_path / "eval"
    result = cli("eval", "--backbone", "llava-next-tiny", "--out", out, *args)
    assert result.exit_code == 1
    assert message in result.err
    assert "Traceback" not in result.output
    assert len(result.err.strip().splitlines()) == 1
    assert not out.exists()


def test_eval_loads_the_backbone_the_adapters_were_trained_on(cli, tmp_path, adapters_dir):
    # no --backbone: the adapters' recorded backbone and factory options (seed 0), whatever --seed is
    out = tmp_path / "eval"
    args = ["--dataset", "synthetic-charts", "--limit", "1", "--max-new-tokens", "2", "--method", "sdrt", "--adapters", adapters_dir, "--ensemble", "k2"]
    result = cli("eval", *args, "--seed", "1", "--out", out, "--no-report")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["examples"] == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_give_the_scores_of_one_process(tmp_path, adapters_dir):
    args = [*TINY, "--dataset", "synthetic-charts", "--limit", "3", "--batch-size", "1", "--method", "prompt,sdrt", "--adapters", str(adapters_dir), "--ensemble", "k2"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "sdrt_cli", "eval", *args, "--out", str(single)], check=True, capture_output=True)
    double = tmp_path / "double"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sdrt_cli", "eval", *args, "--out", str(double)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = json.loads((single / "results.json").read_text()), json.loads((double / "results.json").read_text())
    assert two["methods"]["sdrt"]["timing"]["processes"] == 2
    for method in ("prompt", "sdrt"):
        assert one["methods"][method]["overall"] == two["methods"][method]["overall"]
        a = [json.loads(line) for line in (single / "predictions" / f"{method}.jsonl").read_text().splitlines()]
        b = [json.loads(line) for line in (double / "predictions" / f"{method}.jsonl").read_text().splitlines()]
        assert [(r["id"], r["output"], r["score"]) for r in a] == [(r["id"], r["output"], r["score"]) for r in b]
    assert result.stdout.count("Wrote predictions and results") == 1  # only rank 0 writes and prints


@pytest.mark.slow
def test_pipeline_traces_distill_ensemble_eval_compares_all_four_methods(cli, tmp_path, traces_dir):
    """The whole chain with adapters trained by `sdrt distill` (one step: the point is the contract),
    then the comparison of all four methods and its files."""
    adapters, gold = tmp_path / "adapters", tmp_path / "gold"
    steps = ["--max-steps", "1", "--batch-size", "3"]
    assert cli("distill", "--traces", traces_dir, "--out", adapters, *steps).exit_code == 0
    trained = cli(
        "distill", "--loss", "ce", "--adapter", "lora", "--dataset", "synthetic-charts", "--split", "train", "--limit", "3", "--layers", "-3,-2,-1",
        "--backbone", "llava-next-tiny", "--out", gold, *steps,
    )
    assert trained.exit_code == 0, trained.output
    ensemble = cli("ensemble", "--adapters", adapters, "--traces", traces_dir, "--members", "2", "--steps", "20")
    assert ensemble.exit_code == 0, ensemble.output
    assert "held-out accuracy" in ensemble.out

    out = tmp_path / "eval"
    result = cli(
        "eval", *TINY, "--dataset", "synthetic-charts", "--limit", "3", "--method", "prompt,cot", "--method", "lora,sdrt",
        "--adapters", adapters, "--lora", gold, "--cot-prompt", "plan-then-solve", "--out", out,
    )
    assert result.exit_code == 0, result.output
    for label in ("Prompting", "Visual CoT prompting", "Fine-tuning (LoRA, gold answers)", "SDRT (weighted adapter ensemble)"):
        assert label in result.out
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["prompt", "cot", "lora", "sdrt"]
    assert results["generation"]["max_new_tokens"] == 4 and results["generation"]["sampling"]["temperature"] == 0.0
    assert results["methods"]["cot"]["prompt_id"] == "plan-then-solve"
    assert results["methods"]["sdrt"]["ensemble"] == "k2" and results["methods"]["lora"]["adapter"] == "gold"
    data = SyntheticCharts(limit=3)
    examples = {ex.id: ex for ex in data}
    metric = get_metric(data.metric)
    for name, summary in results["methods"].items():
        lines = [json.loads(line) for line in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in lines] == [0, 1, 2]
        for r in lines:
            ex = examples[r["id"]]
            assert r["parsed"] == metric.parse(r["output"], ex) and r["score"] == metric.score(r["output"], ex)
            assert r["categories"] == data.categories(ex)
        assert summary["overall"] == pytest.approx(sum(r["score"] for r in lines) / 3)
        assert set(summary["categories"]) == {"chart_type", "question_type"}
    sdrt_lines = [json.loads(line) for line in (out / "predictions" / "sdrt.jsonl").read_text().splitlines()]
    assert all(sum(r["weights"].values()) == pytest.approx(1.0, abs=1e-5) for r in sdrt_lines)
    mean_weights = results["methods"]["sdrt"]["weights"]["mean"]
    assert mean_weights == pytest.approx({m: sum(r["weights"][m] for r in sdrt_lines) / 3 for m in mean_weights})
    assert "| Method | synthetic-charts | n | s/example |" in (out / "results.md").read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "eval" and run["config"]["max_new_tokens"] == 4
    # the same command again has nothing to do; another eval into the same directory needs --overwrite
    (out / "report.html").unlink()
    same = cli(
        "eval", *TINY, "--dataset", "synthetic-charts", "--limit", "3", "--method", "prompt,cot", "--method", "lora,sdrt",
        "--adapters", adapters, "--lora", gold, "--cot-prompt", "plan-then-solve", "--out", out,
    )
    assert same.exit_code == 0 and "already holds the results of this eval" in same.out and (out / "report.html").exists()
    assert json.loads((out / "results.json").read_text()) == results
    again = cli("eval", *TINY, "--dataset", "synthetic-charts", "--limit", "1", "--method", "prompt", "--out", out)
    assert again.exit_code == 1 and "already holds the results of an eval with other options" in again.err


def _predictions(out, method="prompt"):
    return [json.loads(line) for line in (out / "predictions" / f"{method}.jsonl").read_text().splitlines()]


def _crash_after_first_batch(monkeypatch, cli, out, args):
    """An eval that dies after its first batch (as a failed collective or a kill would): that batch's
    predictions are on disk, in this rank's file under OUT/partial, plus a torn line."""
    real = PromptMethod.generate
    calls = []

    def dies_on_second_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("rank lost")
        return real(self, *a, **k)

    monkeypatch.setattr(PromptMethod, "generate", dies_on_second_batch)
    with pytest.raises(RuntimeError, match="rank lost"):
        cli("eval", *args, "--out", out)
    monkeypatch.setattr(PromptMethod, "generate", real)
    kept = out / "partial" / "prompt" / "r000.jsonl"
    assert [json.loads(line)["index"] for line in kept.read_text().splitlines()] == [0]
    with open(kept, "a", encoding="utf-8") as fh:
        fh.write('{"index": 1, "id": "tor')
    assert not (out / "predictions").exists()


@pytest.mark.slow
def test_an_interrupted_eval_keeps_its_predictions_and_a_rerun_finishes_it(cli, tmp_path, monkeypatch):
    args = [*TINY, "--dataset", "synthetic-charts", "--limit", "3", "--batch-size", "1", "--method", "prompt"]
    whole = tmp_path / "whole"
    assert cli("eval", *args, "--out", whole).exit_code == 0
    assert not (whole / "partial").exists()  # everything is in predictions/ once the run completes

    out = tmp_path / "resumed"
    _crash_after_first_batch(monkeypatch, cli, out, args)
    # other settings than the interrupted run's are refused, and its predictions kept
    other = cli("eval", *[a if a != "4" else "3" for a in args], "--out", out)
    assert other.exit_code == 1 and len(other.err.strip().splitlines()) == 1
    assert "holds predictions of an interrupted eval with other settings (max_new_tokens: 4 (earlier) vs 3 (now))" in other.err
    assert (out / "partial" / "prompt" / "r000.jsonl").exists()
    # the same settings (another batch size is fine) continue: example 0 is not generated again
    result = cli("eval", *[a if a != "1" else "2" for a in args], "--out", out)
    assert result.exit_code == 0, result.output
    timing = json.loads((out / "results.json").read_text())["methods"]["prompt"]["timing"]
    assert timing["resumed"] == 1 and timing["examples"] == 2
    assert _predictions(out) == _predictions(whole)
    assert json.loads((out / "results.json").read_text())["methods"]["prompt"]["overall"] == json.loads((whole / "results.json").read_text())["methods"]["prompt"]["overall"]


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_ranks_resume_an_interrupted_eval(cli, tmp_path, monkeypatch):
    args = [*TINY, "--dataset", "synthetic-charts", "--limit", "3", "--batch-size", "1", "--method", "prompt"]
    whole = tmp_path / "whole"
    assert cli("eval", *args, "--out", whole).exit_code == 0
    out = tmp_path / "resumed"
    _crash_after_first_batch(monkeypatch, cli, out, args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sdrt_cli", "eval", *args, "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    timing = json.loads((out / "results.json").read_text())["methods"]["prompt"]["timing"]
    assert timing == {**timing, "processes": 2, "resumed": 1, "examples": 2}
    assert _predictions(out) == _predictions(whole)
