"""Trace selection: what traces record about gold answers and the plain student, and the rules that
choose the records distill trains on and the labels the ensemble predictor learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdrt_cli.backbone import load_backbone
from sdrt_cli.errors import SdrtError
from sdrt_cli.evaluate import GenerationSettings, generate_single_step
from sdrt_cli.metrics import get_metric
from sdrt_cli.packs import load_pack
from sdrt_cli.selection import Selection, check_min_records, confidence_labels, record_counts, select_records
from sdrt_cli.trace_store import TraceStore, TraceWriter, finalize
from sdrt_cli.traces import StudentAnswer, TraceEngine, TraceRecord, TraceSettings
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

PROMPTS = ("a", "b", "c")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("llava-next-tiny", seed=0)


def hand_record(index: int, prompt_id: str, confidence: float, score: float | None, student: StudentAnswer | None) -> TraceRecord:
    rows = 2
    return TraceRecord(
        example_id=f"ex-{index}", example_index=index, prompt_id=prompt_id, step1_text="s1", step2_text="s2",
        y1="y1", y1_ids=[1], y2="y2", y2_ids=[2, 3], prompt_rows=1, confidence=confidence,
        hidden=torch.zeros(rows, 1, 4), topk_ids=torch.zeros(rows, 2, dtype=torch.int32), topk_logprobs=torch.full((rows, 2), -0.7),
        tail_mass=torch.zeros(rows), teacher_answer=None if score is None else "ans", teacher_score=score, student=student,
    )


def hand_store(root: Path, table: dict[int, tuple[float | None, list[tuple[float, float | None]]]]) -> TraceStore:
    """A store whose example i has plain-student score ``table[i][0]`` (None: no baseline) and, per
    prompt of PROMPTS, ``(confidence, teacher score)``."""
    writer = TraceWriter(root, {"pack": {"prompts": list(PROMPTS)}, "dataset": {"name": "hand", "split": "train"}})
    for index, (student_score, per_prompt) in sorted(table.items()):
        student = None if student_score is None else StudentAnswer(f"ex-{index}", index, "out", [5], "ans", student_score)
        writer.write([hand_record(index, pid, conf, score, student) for pid, (conf, score) in zip(PROMPTS, per_prompt)])
    finalize(root)
    return TraceStore(root)


# example -> (plain student's score, [(confidence, teacher score) for prompts a, b, c])
TABLE = {
    0: (0.0, [(0.9, 1.0), (0.5, 0.0), (0.7, 1.0)]),  # student wrong: a and c right
    1: (1.0, [(0.2, 1.0), (0.8, 0.0), (0.6, 0.0)]),  # student right: only a right too (a tie at the top)
    2: (0.0, [(0.4, 0.0), (0.3, 0.0), (0.95, 0.0)]),  # nobody right
    3: (0.5, [(0.1, 0.5), (0.6, 1.0), (0.3, 0.0)]),  # partial student (ANLS-like): b beats it, a ties below the top
}


def test_selection_rules_keep_per_prompt_records_by_correctness_assessment_and_confidence(tmp_path):
    store = hand_store(tmp_path / "s", TABLE)
    indices = store.example_indices
    assert select_records(store, indices, PROMPTS, Selection.parse("all")) == {p: [0, 1, 2, 3] for p in PROMPTS}
    assert select_records(store, indices, PROMPTS, Selection.parse("correct")) == {"a": [0, 1], "b": [3], "c": [0]}
    # teacher > student, or both right; a tie below the top (example 3, prompt a: 0.5 vs 0.5) is dropped
    assert select_records(store, indices, PROMPTS, Selection.parse("beats-student")) == {"a": [0, 1], "b": [3], "c": [0]}
    assert select_records(store, indices, PROMPTS, Selection.parse("confident:0.6")) == {"a": [0], "b": [1, 3], "c": [0, 1, 2]}
    assert Selection.parse("confident:0.60").spec == "confident:0.6" and Selection.parse(None).spec == "all"


def test_beats_student_differs_from_correct_when_the_student_is_right_or_partly_right(tmp_path):
    table = {0: (1.0, [(0.5, 0.0), (0.5, 1.0), (0.5, 0.5)]), 1: (0.0, [(0.5, 0.5), (0.5, 0.0), (0.5, 0.0)])}
    store = hand_store(tmp_path / "s", table)
    assert select_records(store, [0, 1], PROMPTS, Selection.parse("correct")) == {"a": [], "b": [0], "c": []}
    # a partly right teacher beats a wrong student (example 1, prompt a) but is not "correct"
    assert select_records(store, [0, 1], PROMPTS, Selection.parse("beats-student")) == {"a": [1], "b": [0], "c": []}


def test_a_prompt_left_with_too_few_records_is_refused_naming_it_and_its_count(tmp_path):
    store = hand_store(tmp_path / "s", TABLE)
    kept = select_records(store, store.example_indices, PROMPTS, Selection.parse("correct"))
    counts = record_counts(kept, PROMPTS, store.example_indices)
    assert counts == {"a": {"kept": 2, "total": 4}, "b": {"kept": 1, "total": 4}, "c": {"kept": 1, "total": 4}}
    assert record_counts(kept, PROMPTS, [0, 2])["a"] == {"kept": 1, "total": 2}
    check_min_records(counts, Selection.parse("correct"), 1)
    with pytest.raises(SdrtError) as refusal:
        check_min_records(counts, Selection.parse("correct"), 2)
    assert str(refusal.value).startswith("prompt 'b' keeps 1 of its 4 training records under --select correct, fewer than --min-records 2;")


@pytest.mark.parametrize(
    "value, message",
    [
        ("best", "--select 'best' is not one of all | correct | beats-student | confident:THRESHOLD"),
        ("confident", "--select 'confident' needs a threshold between 0 and 1"),
        ("confident:1.5", "the threshold is a probability and must lie in [0, 1]"),
        ("correct:0.5", "only confident takes a threshold"),
    ],
)
def test_bad_select_values_are_one_sentence(value, message):
    with pytest.raises(SdrtError, match=message.replace("|", r"\|").replace("[", r"\[").replace("]", r"\]")):
        Selection.parse(value)


def test_rules_needing_a_field_an_old_store_lacks_refuse_naming_the_store_and_field(tmp_path):
    old = hand_store(tmp_path / "old", {0: (None, [(0.5, None)] * 3)})  # made before scores existed
    assert old.student(0) is None and old.meta(0, "a")["teacher_score"] is None
    assert select_records(old, [0], PROMPTS, Selection.parse("confident:0.5")) == {p: [0] for p in PROMPTS}
    for rule, field in (("correct", "teacher_score"), ("beats-student", "teacher_score")):
        with pytest.raises(SdrtError, match=f"trace store {tmp_path / 'old'} has no {field} for example 'ex-0' and prompt 'a'"):
            select_records(old, [0], PROMPTS, Selection.parse(rule))
    no_baseline = hand_store(tmp_path / "nb", {0: (None, [(0.5, 1.0)] * 3)})
    with pytest.raises(SdrtError, match=r"has no student_score for example 'ex-0' .*--no-student-baseline"):
        select_records(no_baseline, [0], PROMPTS, Selection.parse("beats-student"))
    with pytest.raises(SdrtError, match="has no teacher_score"):
        confidence_labels(old, [0], PROMPTS, "correct-then-confident")


def test_a_store_without_the_per_example_file_still_loads_and_the_file_is_checksummed(tmp_path):
    store = hand_store(tmp_path / "s", TABLE)
    students = sorted((tmp_path / "s" / "shards").glob("*.students.jsonl"))
    assert len(students) == 4 and [json.loads(line)["score"] for line in students[3].read_text().splitlines()] == [0.5]
    assert store.record(3, "b").student == StudentAnswer("ex-3", 3, "out", [5], "ans", 0.5)  # once per example, on every record
    students[0].write_text(students[0].read_text().replace("0.0", "1.0"))
    with pytest.raises(SdrtError, match="r000-000000.students.jsonl is corrupt or truncated"):
        TraceStore(tmp_path / "s")


def test_labels_confident_and_correct_then_confident_with_fallback(tmp_path):
    store = hand_store(tmp_path / "s", TABLE)
    confident, confidences = confidence_labels(store, store.example_indices, PROMPTS)
    assert confident.tolist() == [0, 1, 2, 1]
    assert confidences[2].tolist() == [0.4, 0.3, 0.95]
    labels, _ = confidence_labels(store, store.example_indices, PROMPTS, "correct-then-confident")
    # 0: a and c right, a more confident; 1: only a right though b is more confident; 2: none right ->
    # the most confident (c); 3: only b right
    assert labels.tolist() == [0, 0, 2, 1]
    # ties go to the earlier member, among the correct ones too
    tied = hand_store(tmp_path / "t", {0: (0.0, [(0.5, 0.0), (0.7, 1.0), (0.7, 1.0)])})
    assert confidence_labels(tied, [0], PROMPTS, "correct-then-confident")[0].tolist() == [1]
    with pytest.raises(SdrtError, match="--label 'best' is not one of confident, correct-then-confident"):
        confidence_labels(store, [0], PROMPTS, "best")


def test_student_baseline_is_evals_prompt_answer_and_leaves_the_traces_unchanged(tiny):
    data = SyntheticCharts(split="train", limit=3)
    prompts = load_pack("visual_reasoning").prompts[:2]
    settings = TraceSettings(dtype="fp32", max_new_tokens_step1=5, max_new_tokens_step2=6, pos=3)
    metric = get_metric(data.metric)
    items = list(enumerate(data))
    with_baseline = TraceEngine(tiny, data, prompts, settings, metric=metric, student_baseline=True).run(items)
    plain_engine = TraceEngine(tiny, data, prompts, settings)
    plain = plain_engine.run(items)
    for a, b in zip(with_baseline, plain):
        assert (a.y1_ids, a.y2_ids) == (b.y1_ids, b.y2_ids)
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=1e-5)
        assert b.student is None and b.teacher_score is None
        example = items[a.example_index][1]
        assert (a.teacher_answer, a.teacher_score) == (metric.parse(a.y2, example), metric.score(a.y2, example))
    prompt = generate_single_step(tiny, data, [ex for _, ex in items], GenerationSettings(max_new_tokens=6), "prompt")
    for index, example in items:
        records = [r for r in with_baseline if r.example_index == index]
        assert all(r.student is records[0].student for r in records)  # one answer per example
        student = records[0].student
        assert (student.example_id, student.output_ids, student.output) == (example.id, prompt[index].output_ids, prompt[index].output)
        assert (student.answer, student.score) == (metric.parse(prompt[index].output, example), metric.score(prompt[index].output, example))


def test_sampled_teachers_leave_the_student_baseline_greedy(tiny):
    from sdrt_cli.generation import Sampling

    data = SyntheticCharts(split="train", limit=2)
    prompts = load_pack("visual_reasoning").prompts[:1]
    sampled = TraceSettings(dtype="fp32", max_new_tokens_step1=3, max_new_tokens_step2=5, pos=2, sampling=Sampling(temperature=1.5, seed=3))
    greedy = TraceSettings(dtype="fp32", max_new_tokens_step1=3, max_new_tokens_step2=5, pos=2)
    items = list(enumerate(data))
    a = TraceEngine(tiny, data, prompts, sampled, student_baseline=True).run(items)
    b = TraceEngine(tiny, data, prompts, greedy, student_baseline=True).run(items)
    assert [r.student.output_ids for r in a] == [r.student.output_ids for r in b]
    assert a[0].student.score is None  # no metric: answers kept, nothing scored


def test_cli_traces_record_scores_and_the_baseline_by_default_on_a_split_with_answers(cli, tmp_path):
    args = [
        "traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--prompts", "2", "--limit", "2",
        "--max-new-tokens-step1", "3", "--max-new-tokens-step2", "3", "--pos", "2",
    ]
    on = cli(*args, "--out", tmp_path / "on")
    assert on.exit_code == 0, on.output
    store = TraceStore(tmp_path / "on")
    assert store.fingerprint["scoring"] == {"metric": "extracted_relaxed_accuracy", "student_baseline": True}
    assert all(store.student(i).score in (0.0, 1.0) for i in store.example_indices)
    assert all(store.meta(i, p)["teacher_score"] is not None for i in store.example_indices for p in store.prompt_ids)
    shown = json.loads(cli("show", tmp_path / "on", "--json").out)["metrics"]
    assert set(shown["teacher_mean_score"]) == set(store.prompt_ids)
    assert shown["plain_student_mean_score"] == sum(store.student(i).score for i in store.example_indices) / 2
    off = cli(*args, "--out", tmp_path / "off", "--no-student-baseline")
    assert off.exit_code == 0, off.output
    store = TraceStore(tmp_path / "off")
    assert store.fingerprint["scoring"]["student_baseline"] is False and store.student(0) is None
    assert "plain_student_mean_score" not in json.loads(cli("show", tmp_path / "off", "--json").out)["metrics"]
    assert store.meta(0, store.prompt_ids[0])["teacher_score"] is not None


# ---------------------------------------------------------------------------------------------
# distill --select and ensemble --label on a real store whose scores are set by hand
# ---------------------------------------------------------------------------------------------

STORE_ARGS = [
    "traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--prompts", "2", "--limit", "4",
    "--max-new-tokens-step1", "3", "--max-new-tokens-step2", "3", "--pos", "2", "--store-dtype", "fp32",
]


def rescore(root: Path, teacher: dict[tuple[int, str], float | None], student: dict[int, float | None]) -> None:
    """Set the scores of a finished store by hand, keeping its checksums valid (what a store with
    those scores would hold)."""
    from sdrt_cli.io import sha256_file

    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["shards"]:
        shard = root / "shards" / entry["name"]
        lines = [json.loads(line) for line in Path(f"{shard}.jsonl").read_text().splitlines()]
        for line in lines:
            line["teacher_score"] = teacher[(line["example_index"], line["prompt_id"])]
        Path(f"{shard}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        entry["sha256"]["jsonl"] = sha256_file(Path(f"{shard}.jsonl"))
        students = Path(f"{shard}.students.jsonl")
        lines = [json.loads(line) for line in students.read_text().splitlines()]
        for line in lines:
            line["score"] = student[line["example_index"]]
        students.write_text("".join(json.dumps(line) + "\n" for line in lines))
        entry["sha256"]["students.jsonl"] = sha256_file(students)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (root / "progress" / "r000.jsonl").write_text("".join(json.dumps(e) + "\n" for e in manifest["shards"]))


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory):
    """A real 4-example, 2-prompt store of the tiny backbone, scored by hand: the first prompt's
    teacher is right on every example, the second's on example 3 only, the plain student on example 1."""
    from fault_helpers import run

    out = tmp_path_factory.mktemp("scored") / "store"
    run(*STORE_ARGS, "--out", out)
    first, second = TraceStore(out).prompt_ids
    rescore(out, {**{(i, first): 1.0 for i in range(4)}, **{(i, second): float(i == 3) for i in range(4)}}, {i: float(i == 1) for i in range(4)})
    return out


def test_distill_select_trains_each_adapter_on_its_kept_records_and_records_the_counts(cli, scored_store, tmp_path):
    from safetensors.torch import load_file

    first, second = TraceStore(scored_store).prompt_ids
    common = ["--epochs", "2", "--batch-size", "2", "--rank", "2", "--seed", "1"]
    runs = {}
    for rule in ("all", "correct", "beats-student"):
        out = tmp_path / rule
        result = cli("distill", "--traces", scored_store, "--out", out, "--select", rule, *common)
        assert result.exit_code == 0, result.output
        runs[rule] = json.loads((out / "manifest.json").read_text())
    assert runs["all"]["selection"] == {"rule": "all", "min_records": 1, "counts": {first: {"kept": 4, "total": 4}, second: {"kept": 4, "total": 4}}}
    assert runs["correct"]["selection"]["counts"] == {first: {"kept": 4, "total": 4}, second: {"kept": 1, "total": 4}}
    # example 1: the student is right too, a tie at the top, kept; prompt 1 on example 1 is wrong where the student was right
    assert runs["beats-student"]["selection"]["counts"] == {first: {"kept": 4, "total": 4}, second: {"kept": 1, "total": 4}}

    def weights(rule, prompt_id):
        return load_file(str(tmp_path / rule / "adapters" / prompt_id / "adapter.safetensors"))

    # a prompt that keeps every record trains exactly as under --select all; one that keeps fewer does not
    for name, value in weights("all", first).items():
        assert torch.equal(value, weights("correct", first)[name])
    assert any(not torch.equal(v, weights("correct", second)[k]) for k, v in weights("all", second).items())
    # the second adapter trained only at the steps whose batch held example 3, on it alone
    lines = [json.loads(line) for line in (tmp_path / "correct" / "metrics.jsonl").read_text().splitlines()]
    three = TraceStore(scored_store).meta(3, second)["example_id"]
    for line in (line for line in lines if line["kind"] == "train"):
        has_three = three in line["examples"]
        assert line["examples_per_adapter"] == {first: 2, second: int(has_three)}
        assert (second in line["losses"]) == has_three and (line["grad_norm"][second] > 0) == has_three


def test_distill_refuses_a_prompt_left_with_too_few_records_and_writes_nothing(cli, scored_store, tmp_path):
    first, second = TraceStore(scored_store).prompt_ids
    out = tmp_path / "run"
    result = cli("distill", "--traces", scored_store, "--out", out, "--select", "correct", "--min-records", "2", "--epochs", "1")
    assert result.exit_code == 1
    assert f"prompt {second!r} keeps 1 of its 4 training records under --select correct, fewer than --min-records 2;" in result.err
    assert "Traceback" not in result.output and not (out / "manifest.json").exists() and not (out / "adapters").exists()
    # refused before --overwrite removes anything: a finished run in --out survives
    assert cli("distill", "--traces", scored_store, "--out", out, "--select", "correct", "--epochs", "1", "--max-steps", "1").exit_code == 0
    again = cli("distill", "--traces", scored_store, "--out", out, "--select", "correct", "--min-records", "2", "--overwrite")
    assert again.exit_code == 1 and json.loads((out / "manifest.json").read_text())["selection"]["rule"] == "correct"
    bad = cli("distill", "--traces", scored_store, "--out", out, "--select", "confident:2")
    assert bad.exit_code == 1 and "--select 'confident:2': the threshold is a probability" in bad.err


def test_distill_refuses_gold_rules_on_a_store_without_scores(cli, scored_store, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(scored_store, old)
    first, second = TraceStore(old).prompt_ids
    rescore(old, {(i, p): None for i in range(4) for p in (first, second)}, {i: None for i in range(4)})
    result = cli("distill", "--traces", old, "--out", tmp_path / "run", "--select", "beats-student", "--epochs", "1")
    assert result.exit_code == 1
    assert f"trace store {old} has no teacher_score for example" in result.err and "use --select all" in result.err


def test_ensemble_label_correct_then_confident_is_recorded_and_labels_by_correctness(cli, scored_store, tmp_path):
    store = TraceStore(scored_store)
    first, second = store.prompt_ids
    adapters = tmp_path / "adapters"
    assert cli("distill", "--traces", scored_store, "--out", adapters, "--epochs", "1", "--rank", "2").exit_code == 0
    result = cli("ensemble", "--adapters", adapters, "--traces", scored_store, "--label", "correct-then-confident", "--steps", "3", "--holdout", "0", "--name", "gold")
    assert result.exit_code == 0, result.output
    meta = json.loads((adapters / "ensembles" / "gold" / "adapter.json").read_text())
    training = meta["extra"]["training"] if "extra" in meta else meta["training"]
    assert training["label"] == "correct-then-confident"
    # the first prompt is right on 0-2 alone; on 3 both are, and the more confident one wins
    third = first if store.meta(3, first)["confidence"] >= store.meta(3, second)["confidence"] else second
    expected = {first: 3 + (third == first), second: int(third == second)}
    assert training["report"]["label_counts"] == expected
    plain = cli("ensemble", "--adapters", adapters, "--traces", scored_store, "--steps", "3", "--holdout", "0", "--name", "plain")
    assert plain.exit_code == 0, plain.output
    meta = json.loads((adapters / "ensembles" / "plain" / "adapter.json").read_text())
    assert (meta["extra"]["training"] if "extra" in meta else meta["training"])["label"] == "confident"
    bad = cli("ensemble", "--adapters", adapters, "--traces", scored_store, "--label", "gold")
    assert bad.exit_code == 1 and "--label 'gold' is not one of confident, correct-then-confident" in bad.err


@pytest.mark.slow
def test_selection_grid_runs_under_sdrt_ablate_and_the_paper_grid_keeps_all(cli, tmp_path):
    from sdrt_cli.ablate import load_grid
    from sdrt_cli.stages import stage_option_params

    names = {stage: set(params) for stage, params in stage_option_params().items()}
    assert "select" not in load_grid("paper", names).defaults.get("distill", {})  # the paper: every trace
    # the demo uses the rule bench/selection.py chose on dev (its recorded result), and the paper's label
    chosen = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / "selection.json").read_text())["dev_chosen"]
    demo = load_grid("demo", names).defaults
    assert demo["distill"]["select"] == chosen[0] and demo.get("ensemble", {}).get("label", "confident") == chosen[1]
    small = [
        "--datasets", "synthetic-charts",
        "--set", "traces.backbone=llava-next-tiny", "--set", "traces.limit=2", "--set", "traces.max_new_tokens_step1=3",
        "--set", "traces.max_new_tokens_step2=2", "--set", "traces.pos=2", "--set", "traces.prompts=2",
        "--set", "distill.epochs=1", "--set", "distill.min_records=0", "--set", "ensemble.members=2", "--set", "ensemble.steps=3",
        "--set", "ensemble.holdout=0", "--set", "eval.limit=1", "--set", "eval.max_new_tokens=2",
    ]
    out = tmp_path / "grid"
    result = cli("ablate", "--grid", "selection", *small, "--out", out)
    assert result.exit_code == 0, result.output[-3000:]
    select_rows = json.loads((out / "tables" / "select.json").read_text())["rows"]
    assert [row["Selection"] for row in select_rows] == ["all (the paper)", "correct", "beats-student"]
    assert all(row["synthetic-charts"] is not None for row in select_rows)
    label_rows = json.loads((out / "tables" / "label.json").read_text())["rows"]
    assert [row["Label"] for row in label_rows] == ["confident (the paper)", "correct-then-confident"]
    rules = sorted(json.loads((p / "manifest.json").read_text())["selection"]["rule"] for p in (out / "stages").glob("distill-*"))
    assert rules == ["all", "beats-student", "correct"]
