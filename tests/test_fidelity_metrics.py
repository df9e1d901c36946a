"""The fidelity helpers (sdrt_cli.fidelity, sdrt_cli.teacher_forcing) on hand-made tensors and records."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sdrt_cli.teacher_forcing import answer_row_kl, teacher_answer_rows


@pytest.fixture(scope="module")
def fidelity():
    from sdrt_cli import fidelity

    return fidelity


def test_exact_agreement_ignores_case_and_whitespace_only(fidelity):
    assert fidelity.exact_agreement("  The answer is\n 42 ", "the ANSWER is 42")
    assert not fidelity.exact_agreement("42.", "42")
    assert not fidelity.exact_agreement("4 2", "42")


def test_prefix_agreement_counts_shared_prefix_over_longer_answer(fidelity):
    eos = [0]
    assert fidelity.prefix_agreement([5, 6, 7, 0], [5, 6, 7], eos) == 1.0  # EOS does not count
    assert fidelity.prefix_agreement([5, 6, 9, 9], [5, 6, 7], eos) == 0.5
    # the student's answer runs on past the teacher's: not full agreement
    assert fidelity.prefix_agreement([5, 6, 7, 8], [5, 6, 7, 0], eos) == 0.75
    assert fidelity.prefix_agreement([1, 6, 7], [5, 6, 7], eos) == 0.0
    assert fidelity.prefix_agreement([0], [0], eos) == 1.0


def test_answer_row_kl_is_zero_for_the_teacher_itself_and_matches_full_kl_when_k_covers_the_vocabulary():
    torch.manual_seed(0)
    vocab, rows = 6, 3
    teacher_logits = torch.randn(rows, vocab)
    teacher_lp = torch.log_softmax(teacher_logits, -1)
    top_lp, top_ids = teacher_lp.topk(vocab, -1)
    tail = (1 - top_lp.exp().sum(-1)).clamp_min(0)
    assert float(answer_row_kl(teacher_logits, top_ids, top_lp, tail)) == pytest.approx(0.0, abs=1e-5)

    student_logits = torch.randn(rows, vocab)
    student_lp = torch.log_softmax(student_logits, -1)
    full = (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1).mean()
    assert float(answer_row_kl(student_logits, top_ids, top_lp, tail)) == pytest.approx(float(full), rel=1e-4)


def test_answer_row_kl_uses_the_tail_bucket_for_a_truncated_top_k():
    # teacher: p = (0.5, 0.3) stored, tail 0.2; student puts (0.5, 0.3) on them and 0.2 elsewhere -> KL 0
    student = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]]))
    ids = torch.tensor([[0, 1]])
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    assert float(answer_row_kl(student, ids, lp, torch.tensor([0.2]))) == pytest.approx(0.0, abs=1e-5)
    # student with the tokens swapped: KL = 0.5 ln(0.5/0.3) + 0.3 ln(0.3/0.5)
    swapped = torch.log(torch.tensor([[0.3, 0.5, 0.1, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.5)
    assert float(answer_row_kl(swapped, ids, lp, torch.tensor([0.2]))) == pytest.approx(expected, rel=1e-4)


def test_answer_row_kl_refuses_mismatched_rows():
    with pytest.raises(ValueError, match="answer rows"):
        answer_row_kl(torch.zeros(2, 4), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), torch.zeros(3))


def test_gap_closed(fidelity):
    assert fidelity.gap_closed(1.0, 4.0) == 0.75
    assert fidelity.gap_closed(4.0, 4.0) == 0.0
    assert fidelity.gap_closed(5.0, 4.0) == -0.25
    with pytest.raises(ValueError, match="positive"):
        fidelity.gap_closed(1.0, 0.0)


def test_teacher_answer_rows_are_the_last_len_y2_rows():
    # prompt_rows 4, y2 of 3 tokens -> 6 aligned rows; rows 3, 4, 5 predict y2[0..2]
    record = SimpleNamespace(example_id="x", prompt_id="p", prompt_rows=4, y2_ids=[7, 8, 2], topk_ids=torch.zeros(6, 2))
    rows = teacher_answer_rows(record)
    assert list(range(6))[rows] == [3, 4, 5]
    bad = SimpleNamespace(example_id="x", prompt_id="p", prompt_rows=4, y2_ids=[7, 8, 2], topk_ids=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="trace contract"):
        teacher_answer_rows(bad)


def test_most_confident_teacher_is_picked_per_example_with_ties_to_the_earlier_prompt(fidelity):
    records = {
        "0:a": {"example": "x0", "prompt": "a", "confidence": 0.4},
        "0:b": {"example": "x0", "prompt": "b", "confidence": 0.9},
        "1:a": {"example": "x1", "prompt": "a", "confidence": 0.7},
        "1:b": {"example": "x1", "prompt": "b", "confidence": 0.7},
    }
    assert fidelity.most_confident_teachers(records) == {"0:b", "1:a"}
    per_record = {"k": {key: {**row, "kl": float(i), "exact": False, "prefix": 0.0, "first_token": True} for i, (key, row) in enumerate(records.items())}}
    chosen = fidelity.summarise(per_record, "k", ["a", "b"], {"0:b", "1:a"})
    assert chosen["records"] == 2 and chosen["kl"] == pytest.approx((1.0 + 2.0) / 2)


def test_teacher_table_states_the_verdict_the_interval_supports():
    from sdrt_cli.fidelity import teacher_table_markdown
    from sdrt_cli.stats import gap_closed_interval, mean_interval

    def table(student_kl, base_kl):
        rows = {
            "prompt": {"accuracy": mean_interval([1, 0, 0, 1]).as_dict(), "kl": mean_interval(base_kl).as_dict(), "agreement": mean_interval([0, 0, 1, 0]).as_dict()},
            "cot": {"accuracy": mean_interval([1, 1, 0, 1]).as_dict()},
            "sdrt": {"accuracy": mean_interval([1, 1, 0, 0]).as_dict(), "kl": mean_interval(student_kl).as_dict(), "agreement": mean_interval([1, 0, 1, 0]).as_dict()},
        }
        return teacher_table_markdown({"examples": 4, "teacher": "t", "rows": rows, "gap_closed": gap_closed_interval(student_kl, base_kl).as_dict()})

    # every example's KL halves or better: 1 - 0.7 / 1.4 = 50%, and every resample is above 0
    closer = table([0.1, 0.1, 0.3, 0.2], [0.3, 0.2, 0.4, 0.5])
    assert "| Prompting (single step) | 50.0% [0.0, 100.0] | 0.350 [0.250, 0.450] | 25.0% [0.0, 75.0] |" in closer
    assert "| Two-step prompting (cot, first prompt) | 75.0% [25.0, 100.0] | – | – |" in closer
    assert "SDRT closes 50.0% [" in closer and "moved toward its two-step teacher" in closer
    # better on two examples, worse on two: 1 - 1.4 / 1.4 = 0%, and the interval includes 0
    mixed = table([0.1, 0.1, 0.6, 0.6], [0.3, 0.3, 0.4, 0.4])
    assert "SDRT closes 0.0% [" in mixed and "does not show the student moving toward its teacher" in mixed
    assert "no gap to close" in table([0.0, 0.0], [0.0, 0.0])
