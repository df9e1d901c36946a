"""`measure_students` on a real store: the oracle's record filter and the answers' metric scores."""

from __future__ import annotations

import pytest
import torch

from sdrt_cli.backbone import load_backbone
from sdrt_cli.data import open_dataset
from sdrt_cli.fidelity import Student, measure_students
from sdrt_cli.metrics import get_metric
from sdrt_cli.trace_store import TraceStore


def run_main(*args) -> int:
    from sdrt_cli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity") / "store"
    code = run_main(
        "traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--split", "validation", "--limit", "3",
        "--prompts", "2", "--max-new-tokens-step1", "3", "--max-new-tokens-step2", "3", "--pos", "2", "--out", out,
    )
    assert code == 0
    return TraceStore(out)


def test_keys_limit_a_student_to_those_records_and_answers_are_scored(store):
    torch.manual_seed(0)
    backbone = load_backbone("llava-next-tiny", device="cpu", dtype="auto", seed=0)
    first, second = store.prompt_ids
    only = {f"0:{first}", f"2:{first}"}
    measured = measure_students(
        backbone, store, {"all": Student(None, store.prompt_ids), "some": Student(None, [first], keys=only)}, max_new_tokens=3, batch_size=2
    )
    rows = measured["per_record"]
    assert set(rows["some"]) == only
    assert len(rows["all"]) == 3 * 2
    # the same record measured with or without the filter gives the same numbers
    for key in only:
        assert rows["some"][key]["kl"] == pytest.approx(rows["all"][key]["kl"], rel=1e-4, abs=1e-6)
        assert rows["some"][key]["student_answer"] == rows["all"][key]["student_answer"]
    # both answers carry the dataset metric's score of exactly that text
    dataset = open_dataset("synthetic-charts", split="validation", limit=3)
    metric = get_metric(dataset.metric)
    examples = list(dataset)
    for key, row in rows["all"].items():
        example = examples[int(key.split(":")[0])]
        assert row["student_score"] == metric.score(row["student_answer"], example)
        assert row["teacher_score"] == metric.score(row["teacher_answer"], example)
