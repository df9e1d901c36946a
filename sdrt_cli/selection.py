"""Which traces teach: per-prompt record selection for `sdrt distill` and the ensemble's labels.

SDRT distils every trace and labels the ensemble predictor with the most confident one, assuming
the two-step teacher is better than the single-step student.  Per prompt that can fail, so a trace
store made on a split with gold answers records the teacher's score under the dataset's official
metric (``teacher_score`` of each record) and the plain student's score per example (the store's
student baseline).  From those:

Selection rules (``sdrt distill --select``), applied per prompt to its own records:

* ``all`` -- every record (the paper);
* ``correct`` -- the teacher's answer scores the metric's maximum, 1.0 (ANLS: an exact match after
  normalisation; a partly right answer is not correct);
* ``beats-student`` -- :meth:`sdrt_cli.assessment.Assessment.teacher_beats_student` on the two
  metric scores: the teacher scored higher than the plain student, or both are right;
* ``confident:T`` -- the record's ``confidence`` (the mean top-token probability over y2's rows,
  the number the ensemble labels by) is at least T.

Ensemble labels (``sdrt ensemble --label``):

* ``confident`` -- the member whose trace is the most confident (the paper);
* ``correct-then-confident`` -- the most confident among the members whose traces are correct,
  falling back to the most confident of all when none is.

Ties go to the earlier member.  Rules that need a field the store lacks (made before sdrt recorded
it, on a split without gold answers, or with ``--no-student-baseline``) refuse in one sentence
naming the store and the field.  Gold only ever comes from the store, i.e. the traced split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from sdrt_cli.assessment import Assessment
from sdrt_cli.errors import SdrtError

RULES = ("all", "correct", "beats-student", "confident")
SELECT_HELP_CHOICES = "all | correct | beats-student | confident:THRESHOLD"
LABELS = ("confident", "correct-then-confident")
# a metric score counts as correct at the metric's maximum
CORRECT_SCORE = 1.0


def record_confidence(meta: dict[str, Any]) -> float:
    """A record's confidence: the mean top-token probability over the rows that predict y2 (computed
    by the trace engine); what ``confident:T`` thresholds and the ensemble labels rank by."""
    return float(meta["confidence"])


def is_correct(score: float) -> bool:
    return score >= CORRECT_SCORE


@dataclass(frozen=True)
class Selection:
    """A parsed ``--select`` value."""

    rule: str = "all"
    threshold: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> Selection:
        value = "all" if text is None else str(text).strip()
        rule, _, argument = value.partition(":")
        if rule not in RULES:
            raise SdrtError(f"--select {value!r} is not one of {SELECT_HELP_CHOICES}")
        if rule != "confident":
            if argument:
                raise SdrtError(f"--select {value!r}: only confident takes a threshold (confident:0.5)")
            return cls(rule)
        try:
            threshold = float(argument)
        except ValueError:
            raise SdrtError(f"--select {value!r} needs a threshold between 0 and 1, e.g. confident:0.5") from None
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise SdrtError(f"--select {value!r}: the threshold is a probability and must lie in [0, 1]")
        return cls(rule, threshold)

    @property
    def spec(self) -> str:
        return f"confident:{self.threshold:g}" if self.rule == "confident" else self.rule

    @property
    def needs(self) -> tuple[str, ...]:
        """The stored fields the rule reads besides the record itself."""
        return {"correct": ("teacher_score",), "beats-student": ("teacher_score", "student_score")}.get(self.rule, ())


def _missing(store, field: str, why: str) -> SdrtError:
    return SdrtError(
        f"trace store {store.root} has no {field} for {why} (it was made before sdrt recorded it, on a split without gold "
        f"answers{', or with --no-student-baseline' if field == 'student_score' else ''}); re-run `sdrt traces` on a split with "
        "answers into a new --out, or use --select all"
    )


def teacher_score(store, index: int, prompt_id: str) -> float:
    meta = store.meta(index, prompt_id)
    score = meta.get("teacher_score")
    if score is None:
        raise _missing(store, "teacher_score", f"example {meta['example_id']!r} and prompt {prompt_id!r}")
    return float(score)


def student_score(store, index: int) -> float:
    student = store.student(index)
    if student is None or student.score is None:
        raise _missing(store, "student_score", f"example {store.meta(index, store.prompt_ids[0])['example_id']!r}")
    return float(student.score)


def keeps(selection: Selection, store, index: int, prompt_id: str) -> bool:
    """Whether ``selection`` keeps the record of example ``index`` for ``prompt_id``."""
    if selection.rule == "all":
        return True
    if selection.rule == "correct":
        return is_correct(teacher_score(store, index, prompt_id))
    if selection.rule == "beats-student":
        return Assessment.from_metric(teacher_score(store, index, prompt_id), student_score(store, index)).teacher_beats_student()
    return record_confidence(store.meta(index, prompt_id)) >= selection.threshold


def select_records(store, example_indices: Sequence[int], prompt_ids: Sequence[str], selection: Selection) -> dict[str, list[int]]:
    """Per prompt, the examples (of ``example_indices``, in order) whose record ``selection`` keeps."""
    return {pid: [i for i in example_indices if keeps(selection, store, i, pid)] for pid in prompt_ids}


def record_counts(kept: dict[str, list[int]] | None, prompt_ids: Sequence[str], indices: Sequence[int]) -> dict[str, dict[str, int]]:
    """Per prompt, how many of ``indices`` it keeps and of how many (``kept`` None: all of them)."""
    chosen = set(indices)
    return {pid: {"kept": len(chosen) if kept is None else len(chosen.intersection(kept[pid])), "total": len(chosen)} for pid in prompt_ids}


def check_min_records(counts: dict[str, dict[str, int]], selection: Selection, min_records: int) -> None:
    """Refuse, naming the first prompt left with fewer than ``min_records`` training records."""
    for pid, count in counts.items():
        if count["kept"] < min_records:
            raise SdrtError(
                f"prompt {pid!r} keeps {count['kept']} of its {count['total']} training records under --select {selection.spec}, "
                f"fewer than --min-records {min_records}; choose a looser rule, more examples, or drop the prompt with --prompts"
            )


def confidence_labels(store, example_indices: Sequence[int], members: Sequence[str], label: str = "confident") -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the index (into ``members``) of the label trace under ``label`` (see the module
    docstring), and all confidences [n, K]."""
    if label not in LABELS:
        raise SdrtError(f"--label {label!r} is not one of {', '.join(LABELS)}")
    confidences = torch.tensor([[record_confidence(store.meta(i, pid)) for pid in members] for i in example_indices], dtype=torch.float64)
    if label == "confident" or not len(example_indices):
        return confidences.argmax(dim=1), confidences  # argmax returns the first maximum: ties -> earlier member
    correct = torch.tensor([[is_correct(teacher_score(store, i, pid)) for pid in members] for i in example_indices], dtype=torch.bool)
    # the wrong members drop below every confidence ([0, 1]) where some member is right
    ranked = torch.where(correct | ~correct.any(dim=1, keepdim=True), confidences, confidences - 2.0)
    return ranked.argmax(dim=1), confidences
