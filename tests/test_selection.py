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
from sdrt_cli.selection import Selection, check_min_records, confidence_labels, select_records
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
    check_min_records(kept, 4, Selection.parse("correct"), 1)
    with pytest.raises(SdrtError) as refusal:
        check_min_records(kept, 4, Selection.parse("correct"), 2)
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
    off = cli(*args, "--out", tmp_path / "off", "--no-student-baseline")
    assert off.exit_code == 0, off.output
    store = TraceStore(tmp_path / "off")
    assert store.fingerprint["scoring"]["student_baseline"] is False and store.student(0) is None
    assert store.meta(0, store.prompt_ids[0])["teacher_score"] is not None
