"""The built-in losses: ``mse`` (hidden states), ``kl`` (top-k next-token distributions), ``ce`` (gold answers)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdrt_cli.errors import SdrtError
from sdrt_cli.losses import DistillBatch, Loss, topk_tail_kl


def _empty_like_graph(t: torch.Tensor) -> torch.Tensor:
    # zero that stays connected to the student graph (DDP expects every parameter to get a gradient)
    return t.sum() * 0.0


def _check_rows(name: str, row_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if tuple(row_mask.shape) != tuple(shape[:2]):
        raise SdrtError(f"loss {name!r}: row_mask has shape {tuple(row_mask.shape)}, expected [B, R] = {tuple(shape[:2])}")
    return row_mask.to(torch.bool)


class MSELoss(Loss):
    """Mean squared error between student and teacher hidden states (SDRT Eq. 6).

    Averaged over the real rows and hidden dimensions of each layer, then SUMMED over the configured
    layers (the paper adds the per-layer losses).

    ``scale="relative"`` divides each layer's error by the teacher's mean square on the same rows
    (a scale-free error: 1.0 = as far off as predicting zeros).  Raw decoder-layer outputs are large
    (a mean square of hundreds on SmolLM2's last layers, with a few massive dimensions), so a raw MSE
    swamps a KL of ~0.3 in ``mse+kl`` whatever the backbone; the relative one stays comparable.
    """

    name = "mse"
    needs = frozenset({"hidden"})
    SCALES = ("relative", "raw")

    def __init__(self, scale: str = "relative"):
        if scale not in self.SCALES:
            raise SdrtError(f"loss 'mse': scale must be one of {', '.join(self.SCALES)}, got {scale!r}")
        self.scale = scale

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        student, teacher = batch.student_hidden, batch.teacher_hidden
        if student.dim() != 4 or tuple(student.shape) != tuple(teacher.shape):
            raise SdrtError(
                f"loss 'mse': student_hidden {tuple(student.shape)} and teacher_hidden {tuple(teacher.shape)} must both be [B, R, L, H]"
            )
        rows = _check_rows("mse", batch.row_mask, student.shape).to(student.device)
        if not bool(rows.any()):
            return _empty_like_graph(student)
        s = student[rows].float()  # [M, L, H]
        t = teacher.detach().to(student.device)[rows].float()
        per_layer = (s - t).pow(2).mean(dim=(0, 2))
        if self.scale == "relative":
            per_layer = per_layer / t.pow(2).mean(dim=(0, 2)).clamp(min=torch.finfo(torch.float32).tiny)
        return per_layer.sum()


class KLLoss(Loss):
    """Forward KL(teacher ‖ student) on the stored top-k with a tail bucket (SDRT Eq. 7).

    ``temperature`` T softens both sides; the result is multiplied by T² (Hinton et al.) so gradient
    magnitudes do not shrink as T grows.  Averaged over the real rows.  See :func:`topk_tail_kl`.
    """

    name = "kl"
    needs = frozenset({"logits"})

    def __init__(self, temperature: float = 1.0):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise SdrtError(f"loss 'kl': temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        logits = batch.student_logits
        if logits.dim() != 3:
            raise SdrtError(f"loss 'kl': student_logits must be [B, R, V], got {tuple(logits.shape)}")
        rows = _check_rows("kl", batch.row_mask, logits.shape).to(logits.device)
        if not bool(rows.any()):
            return _empty_like_graph(logits)
        # only the real rows go through the vocabulary-sized computation
        tail = None if batch.tail_mass is None else batch.tail_mass.to(logits.device)[rows]
        kl = topk_tail_kl(
            logits[rows], batch.topk_ids.to(logits.device)[rows], batch.topk_logprobs.to(logits.device)[rows], self.temperature, tail
        )
        return kl.mean() * self.temperature**2


class CELoss(Loss):
    """Token cross-entropy on gold answers (the LoRA "Fine-tuning" baseline).

    ``ce_logits`` [B, T, V] and ``ce_labels`` [B, T] are already aligned (logits at t score label t);
    labels equal to −100 are ignored; the mean is over the remaining tokens.
    """

    name = "ce"
    needs = frozenset({"ce"})

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        logits, labels = batch.ce_logits, batch.ce_labels
        if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise SdrtError(f"loss 'ce': ce_logits {tuple(logits.shape)} must be [B, T, V] and ce_labels {tuple(labels.shape)} [B, T]")
        labels = labels.to(logits.device, torch.long)
        counted = labels != -100
        if not bool(counted.any()):
            return _empty_like_graph(logits)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
