"""One notion of "the teacher beats the student", shared by trace selection and `sdrt calibrate`.

An :class:`Assessment` holds two scores of one instruction on MmDC's 1–10 judge scale: the
two-step teacher's answer and the plain single-step student's answer.  The scores come either from
a judge model (MmDC's assessor prompt, both orders averaged) or from the dataset's official metric,
mapped linearly from [0, 1] to [1, 10] (:func:`from_metric`): a wrong answer is 1, a right one 10.

* :meth:`Assessment.teacher_beats_student` is the rule `sdrt distill --select beats-student` keeps a
  trace by: the teacher scored higher, or both answers are right (a tie at the top of the scale);
  a tie anywhere else means the teacher adds nothing, so it is dropped.
* :meth:`Assessment.difficulty` is MmDC's Eq. 6, S = (|R_S − R_T| + 1) / max(R_S, R_T): large when
  the two disagree or when both are poor; `sdrt calibrate` calls S ≥ τ difficult.
"""

from __future__ import annotations

import dataclasses

from sdrt_cli.errors import SdrtError

SCALE_MIN = 1.0
SCALE_MAX = 10.0


def from_metric(score: float) -> float:
    """A metric score in [0, 1] on the judge's 1–10 scale (0 → 1, 1 → 10)."""
    if not 0.0 <= score <= 1.0:
        raise SdrtError(f"a metric score must lie in [0, 1] to be put on the 1–10 scale, got {score!r}")
    return SCALE_MIN + (SCALE_MAX - SCALE_MIN) * score


@dataclasses.dataclass(frozen=True)
class Assessment:
    """The teacher's and the student's scores for one instruction, each in [1, 10]."""

    teacher: float
    student: float

    def __post_init__(self) -> None:
        for role, value in (("teacher", self.teacher), ("student", self.student)):
            if not SCALE_MIN <= value <= SCALE_MAX:
                raise SdrtError(f"the {role}'s score must lie in [{SCALE_MIN:g}, {SCALE_MAX:g}], got {value!r}")

    @classmethod
    def from_metric(cls, teacher_score: float, student_score: float) -> Assessment:
        """Both answers scored by the dataset's metric (each in [0, 1])."""
        return cls(from_metric(teacher_score), from_metric(student_score))

    def teacher_beats_student(self) -> bool:
        return self.teacher > self.student or self.teacher == self.student == SCALE_MAX

    def difficulty(self) -> float:
        return (abs(self.student - self.teacher) + 1.0) / max(self.student, self.teacher)
