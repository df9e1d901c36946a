"""The single-step student scored against a stored two-step teacher, at the teacher's answer rows.

The student is fed its single-step prompt (images + question, adapters armed for that forward as at
inference), then the teacher's answer ``y2[:-1]`` teacher-forced on the same KV cache; the rows
that predict y2's tokens (the prompt's last position predicts y2[0]) are compared with the stored
teacher rows by KL(teacher ‖ student) over the teacher's top-k + one tail bucket, the `kl`
distillation loss at T = 1.  ``sdrt ensemble --kl-epochs`` trains the ensemble predictor on it and
``bench/fidelity.py`` measures with it.

Both, and ``sdrt distill``, first check with :func:`check_prompt_alignment` that the student prompt
ends in the same P tokens as the teacher's step-2 prompt: the stored prompt rows are those P
positions, so any other ending would compare the student with the teacher at different places.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from sdrt_cli.backbone import Backbone
from sdrt_cli.data import Dataset, Example
from sdrt_cli.errors import SdrtError
from sdrt_cli.losses import topk_tail_kl
from sdrt_cli.prompting import prefill_single_step

_warned_unchecked = False


def check_prompt_alignment(
    backbone: Backbone, student_prompt: Sequence[int], teacher_tail: Sequence[int] | None, prompt_id: str, example_id: str
) -> None:
    """Refuse a student prompt whose last P token ids are not ``teacher_tail``, the teacher's last P
    step-2 prompt token ids stored in the record (``prompt_tail_ids``, P = ``prompt_rows``).

    A record from a store made before ``prompt_tail_ids`` existed (``None``) cannot be checked: one
    warning line per process says so and the comparison goes ahead, as it did when the store was made.
    """
    global _warned_unchecked
    if teacher_tail is None:
        if not _warned_unchecked:
            from sdrt_cli import distributed

            _warned_unchecked = True
            if distributed.is_main():
                print(
                    "warning: this trace store predates the stored prompt endings ('prompt_tail_ids'), so sdrt cannot check that "
                    "teacher and student rows are the same places; re-run `sdrt traces` into a new --out to have it checked",
                    file=sys.stderr,
                )
        return
    teacher = list(teacher_tail)
    student = list(student_prompt[-len(teacher) :]) if teacher else []
    if student == teacher:
        return
    shown_teacher, shown_student = backbone.decode(teacher), backbone.decode(student)
    if shown_teacher == shown_student:  # they differ only in special tokens: show the ids
        shown_teacher, shown_student = f"{shown_teacher} {teacher}", f"{shown_student} {student}"
    raise SdrtError(
        f"prompt {prompt_id!r} does not end like the student prompt on example {example_id!r}: its step-2 prompt's last "
        f"{len(teacher)} tokens are {shown_teacher!r} but the single-step prompt's are {shown_student!r}, so teacher and "
        "student rows would not be the same places (end the prompt's step 2 with \"{question}\\n{instruction}\" and trace again)"
    )


def teacher_answer_rows(record) -> slice:
    """The aligned rows of a trace record that predict y2 tokens: the last len(y2) of its
    ``prompt_rows + len(y2) - 1`` rows (row prompt_rows - 1, the prompt's last position, predicts y2[0])."""
    total = record.prompt_rows + len(record.y2_ids) - 1
    if record.topk_ids.shape[0] != total:
        raise ValueError(f"record ({record.example_id}, {record.prompt_id}) has {record.topk_ids.shape[0]} rows, the trace contract gives {total}")
    return slice(record.prompt_rows - 1, total)


def answer_row_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_mass: torch.Tensor) -> torch.Tensor:
    """Mean over answer rows of KL(teacher ‖ student) on the teacher's top-k + tail bucket (a 0-dim
    tensor, differentiable in ``student_logits``).

    ``student_logits`` [n, V]; ``topk_ids``/``topk_logprobs`` [n, k]; ``tail_mass`` [n]: the stored
    teacher rows that predict the same n answer tokens.
    """
    if student_logits.shape[0] != topk_ids.shape[0] or student_logits.shape[0] == 0:
        raise ValueError(f"student has {student_logits.shape[0]} answer rows, the teacher {topk_ids.shape[0]}; both must be equal and > 0")
    per_row = topk_tail_kl(student_logits[None].float(), topk_ids[None].long(), topk_logprobs[None].float(), 1.0, tail_mass[None].float())
    return per_row.mean()


@dataclass
class AnswerTarget:
    """A trace record's answer and the stored teacher rows that predict it, copied out of the record
    (only those: a prompt's rows can number thousands on a 7B VLM), with what identifies the record
    and its prompt ending for :func:`check_prompt_alignment`."""

    y2_ids: list[int]
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_mass: torch.Tensor
    prompt_id: str
    example_id: str
    prompt_tail_ids: list[int] | None

    @classmethod
    def of(cls, record) -> AnswerTarget:
        rows = teacher_answer_rows(record)
        return cls(
            list(record.y2_ids), record.topk_ids[rows].clone(), record.topk_logprobs[rows].clone(), record.tail_mass[rows].clone(),
            record.prompt_id, record.example_id, record.prompt_tail_ids,
        )

    def kl(self, student_logits: torch.Tensor) -> torch.Tensor:
        """:func:`answer_row_kl` of the student's answer rows against these teacher rows."""
        return answer_row_kl(student_logits, self.topk_ids, self.topk_logprobs, self.tail_mass)


def answer_logits(
    backbone: Backbone,
    dataset: Dataset,
    examples: Sequence[Example],
    answers: Sequence[Sequence[AnswerTarget]],
    steer=None,
    vision=None,
) -> list[list[torch.Tensor]]:
    """Student logits at the answer rows, per example and per teacher answer: ``[example][answer]``
    -> [len(y2), V] float32; row i predicts ``answers[example][answer].y2_ids[i]``.

    Each example's prompt is fed once (``steer``, an ``EnsembleHandle``, armed for that forward, as
    in ``generate_single_step``), then each of its answers' ``y2[:-1]`` continues the shared KV cache.
    A teacher whose prompt ending differs from the student prompt's is refused
    (:func:`check_prompt_alignment`).  Runs under the caller's grad mode: wrap it in
    ``torch.no_grad()`` to measure.
    """
    _, batch, out = prefill_single_step(backbone, dataset, examples, steer, vision)
    for b, targets in enumerate(answers):
        for target in targets:
            check_prompt_alignment(backbone, batch.tokens[b], target.prompt_tail_ids, target.prompt_id, target.example_id)
    first = backbone.lm_logits(out.last_hidden[:, -1]).float()  # [B, V]: predicts y2[0]
    rows = [(b, a) for b in range(len(examples)) for a in range(len(answers[b]))]
    batch.select_rows([b for b, _ in rows])
    tails = [answers[b][a].y2_ids[:-1] for b, a in rows]
    out = batch.append(tails)
    width = out.last_hidden.shape[1]
    result: list[list[torch.Tensor]] = [[] for _ in examples]
    for r, (b, _) in enumerate(rows):
        n = len(tails[r])
        later = backbone.lm_logits(out.last_hidden[r, width - n :]).float() if n else first[:0]
        result[b].append(torch.cat([first[b : b + 1], later]))
    return result
