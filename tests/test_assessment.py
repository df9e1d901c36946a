"""The shared teacher-vs-student rule and MmDC's difficulty (Eq. 6), on hand-worked cases."""

import pytest

from sdrt_cli.assessment import Assessment, from_metric
from sdrt_cli.errors import SdrtError


def test_metric_scores_map_linearly_onto_the_judge_scale():
    assert from_metric(0.0) == 1.0
    assert from_metric(1.0) == 10.0
    assert from_metric(0.5) == 5.5


@pytest.mark.parametrize(
    ("teacher", "student", "beats"),
    [
        (1.0, 0.0, True),  # teacher right, student wrong
        (1.0, 1.0, True),  # both right: kept
        (0.0, 0.0, False),  # both wrong: the teacher adds nothing
        (0.0, 1.0, False),  # the student was right already
        (0.8, 0.5, True),  # ANLS-style partial credit: higher is better
        (0.5, 0.5, False),  # a tie below the top is not a win
    ],
)
def test_teacher_beats_student(teacher, student, beats):
    assert Assessment.from_metric(teacher, student).teacher_beats_student() is beats


def test_difficulty_is_mmdc_eq6():
    # S = (|R_S - R_T| + 1) / max(R_S, R_T)
    assert Assessment(teacher=10, student=10).difficulty() == pytest.approx(0.1)
    assert Assessment(teacher=10, student=1).difficulty() == pytest.approx(1.0)
    assert Assessment(teacher=8, student=6).difficulty() == pytest.approx(3 / 8)
    assert Assessment(teacher=2, student=2).difficulty() == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [0.0, 10.5, float("nan")])
def test_scores_off_the_scale_are_refused(bad):
    with pytest.raises(SdrtError, match="teacher's score"):
        Assessment(teacher=bad, student=5)


def test_metric_score_outside_unit_interval_is_refused():
    with pytest.raises(SdrtError, match=r"\[0, 1\]"):
        from_metric(1.5)
