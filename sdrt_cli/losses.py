"""Distillation losses: the batch they read, the ``mse:1+kl:0.5`` spec syntax, and their composition.

A loss is registered by name through ``register_losses`` as a class (or factory) ``loss_cls(**options)``
whose instances are ``callable(DistillBatch) -> scalar Tensor`` and declare ``needs``, a subset of
:data:`NEEDS`, so the trainer computes only what the chosen losses read:

- ``"hidden"``: ``student_hidden``, ``teacher_hidden``, ``row_mask``
- ``"logits"``: ``student_logits``, ``topk_ids``, ``topk_logprobs``, ``row_mask``
- ``"ce"``:     ``ce_logits``, ``ce_labels``
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from sdrt_cli.errors import SdrtError, UnknownNameError

NEEDS = frozenset({"hidden", "logits", "ce"})
# log-probabilities are floored here: exp(-80) ~ 2e-35 is still a normal float32, so no log(0)
LOG_FLOOR = -80.0

FIELDS_FOR_NEED = {
    "hidden": ("student_hidden", "teacher_hidden", "row_mask"),
    "logits": ("student_logits", "topk_ids", "topk_logprobs", "row_mask"),
    "ce": ("ce_logits", "ce_labels"),
}


@dataclass
class DistillBatch:
    """What the losses read for one batch of B examples.

    Aligned rows (R per example, padded; ``row_mask`` [B, R] marks real ones) are the student
    positions that the trace contract pairs with teacher positions.  Row r's logits predict the
    token AFTER row r's position.

    - ``student_hidden``/``teacher_hidden`` [B, R, L, H]: decoder-layer outputs (before the final
      norm) on the L configured layers; the teacher side comes from the trace store.
    - ``student_logits`` [B, R, V]: student next-token logits at the rows.
    - ``topk_ids`` [B, R, k] (long) and ``topk_logprobs`` [B, R, k]: the teacher's stored top-k
      next-token log-probabilities at temperature 1 (keep them in float32); ``tail_mass`` [B, R] is
      the trace store's 1 − Σ exp(topk_logprobs) (None: the loss computes it the same way).
    - ``ce_logits`` [B, T, V] and ``ce_labels`` [B, T] for ``ce``: ALREADY ALIGNED, logits at t score
      the label at t (the caller shifts); label −100 is ignored.
    """

    student_hidden: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    row_mask: torch.Tensor | None = None
    student_logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_mass: torch.Tensor | None = None
    ce_logits: torch.Tensor | None = None
    ce_labels: torch.Tensor | None = None

    def require(self, loss_name: str, need: str) -> None:
        """Raise naming ``loss_name`` and the first field its ``need`` reads that is missing."""
        for name in FIELDS_FOR_NEED[need]:
            if getattr(self, name) is None:
                raise SdrtError(f"loss {loss_name!r} needs batch field {name!r}, which was not computed")


class Loss:
    """Base class for registered losses: set ``name`` and ``needs``, implement ``__call__``."""

    name: str = ""
    needs: frozenset[str] = frozenset()

    def __call__(self, batch: DistillBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """``"mse+kl"`` or ``"mse:1+kl:0.5"`` -> [("mse", 1.0), ("kl", 0.5)]; names must be registered."""
    from sdrt_cli.plugins import losses

    if not isinstance(spec, str) or not spec.strip():
        raise SdrtError(f"loss spec {spec!r} is empty; write names joined by '+', e.g. 'mse+kl' or 'mse:1+kl:0.5'")
    registry = losses()
    terms: list[tuple[str, float]] = []
    for raw in spec.split("+"):
        term = raw.strip()
        if not term:
            raise SdrtError(f"loss spec {spec!r} has an empty term; write names joined by '+', e.g. 'mse+kl'")
        name, sep, weight_text = term.partition(":")
        name = name.strip()
        if not name or ":" in weight_text:
            raise SdrtError(f"loss spec {spec!r}: term {term!r} must be NAME or NAME:WEIGHT")
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text.strip())
            except ValueError:
                raise SdrtError(f"loss spec {spec!r}: weight {weight_text.strip()!r} of {name!r} is not a number") from None
            if not math.isfinite(weight) or weight < 0:
                raise SdrtError(f"loss spec {spec!r}: weight of {name!r} must be a finite number >= 0, got {weight_text.strip()!r}")
        if name not in registry:
            raise UnknownNameError(f"loss spec {spec!r}: {registry.unknown_message(name)}")
        if any(existing == name for existing, _ in terms):
            raise SdrtError(f"loss spec {spec!r} names {name!r} twice")
        terms.append((name, weight))
    return terms


class CompositeLoss:
    """Σ weight · loss over the spec's terms; ``needs`` is the union of the terms' needs."""

    def __init__(self, terms: list[tuple[str, float, Callable[[DistillBatch], torch.Tensor]]]):
        self.terms = terms
        self.needs = frozenset().union(*(fn.needs for _, _, fn in terms))

    def __call__(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, parts): ``total`` carries the gradient; ``parts`` maps each name to its
        unweighted, detached value for logging."""
        total = None
        parts: dict[str, torch.Tensor] = {}
        for name, weight, fn in self.terms:
            for need in fn.needs:
                batch.require(name, need)
            value = fn(batch)
            parts[name] = value.detach()
            total = value * weight if total is None else total + value * weight
        return total, parts


def compose(spec: str | list[tuple[str, float]], options: Mapping[str, Mapping[str, Any]] | None = None) -> CompositeLoss:
    """Build the loss callable for ``spec``; ``options`` passes keyword options per loss name,
    e.g. ``{"kl": {"temperature": 2.0}}``."""
    from sdrt_cli.plugins import losses

    terms = parse_loss_spec(spec) if isinstance(spec, str) else list(spec)
    options = dict(options or {})
    names = {name for name, _ in terms}
    stray = sorted(set(options) - names)
    if stray:
        raise SdrtError(f"loss options given for {stray[0]!r}, which is not in the loss spec {spec!r}")
    registry = losses()
    built = []
    for name, weight in terms:
        entry = registry.entry(name)
        factory = entry.value
        kwargs = dict(options.get(name, {}))
        if isinstance(factory, type):
            try:
                fn = factory(**kwargs)
            except TypeError as exc:
                raise SdrtError(f"loss {name!r} does not accept options {sorted(kwargs)}: {exc}") from None
        elif kwargs:
            raise SdrtError(f"loss {name!r} is a plain function and takes no options, got {sorted(kwargs)}")
        else:
            fn = factory
        needs = getattr(fn, "needs", None)
        if not isinstance(needs, (set, frozenset)) or not needs or not needs <= NEEDS:
            raise SdrtError(
                f"loss {name!r} from plugin {entry.plugin!r} must declare `needs`, a non-empty subset of {sorted(NEEDS)}, got {needs!r}"
            )
        built.append((name, float(weight), fn))
    return CompositeLoss(built)


# The top-k + tail KL: the built-in `kl` loss and the teacher-forced comparisons (sdrt_cli.teacher_forcing) share it.


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x <= 0, accurate on both sides of −log 2, floored at LOG_FLOOR."""
    x = x.clamp(max=0.0)
    near_zero = x > -math.log(2.0)
    out = torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return out.clamp(min=LOG_FLOOR)


def topk_tail_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
    tail_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row forward KL(teacher ‖ student) over the teacher's top-k tokens plus one tail bucket.

    Both distributions are reduced to k + 1 buckets: the k stored token ids and "everything else".
    Teacher: p_i = exp(topk_logprobs_i) and tail = ``tail_mass`` as stored, or 1 − Σ p_i when None.
    That difference is only known to the rounding of the stored log-probs (k · eps of their dtype),
    so a smaller remainder counts as an empty tail rather than as noise.  Student:
    q = softmax(z / T) over the full vocabulary, q_i at the same ids, and its tail computed exactly as
    a logsumexp over the other logits (never as 1 − a sum, which loses all precision when small).

    Temperature: the teacher's stored log-probs are at T = 1 and its tail is one number, not a
    distribution, so the tempered teacher is approximated by tempering the k + 1 buckets as if the
    tail were a single token (p_i^(1/T), tail^(1/T), renormalised).  At T = 1 this is exact; for
    T ≠ 1 it is an approximation (the true tempered tail spreads over many tokens).  The student side
    is exact at any T.  Empty buckets stay empty at any T.  Returns [B, R] (not scaled by T²).
    """
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise SdrtError(
            f"loss 'kl': topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} must be [B, R, k] "
            f"matching student_logits {tuple(student_logits.shape)} = [B, R, V]"
        )
    z = student_logits.float() / temperature
    ids = topk_ids.to(z.device, torch.long)
    log_norm = torch.logsumexp(z, dim=-1)  # [B, R]
    student_top = z.gather(-1, ids) - log_norm.unsqueeze(-1)
    # the most negative finite float, not -inf: an all-masked row would otherwise give NaN gradients
    others = z.scatter(-1, ids, torch.finfo(z.dtype).min)
    student_tail = (torch.logsumexp(others, dim=-1) - log_norm).clamp(min=LOG_FLOOR)
    log_q = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)

    teacher_top = topk_logprobs.detach().to(z.device).float().clamp(min=LOG_FLOOR)
    if tail_mass is not None:
        teacher_tail = tail_mass.detach().to(z.device).float().clamp(min=0.0, max=1.0).log().clamp(min=LOG_FLOOR)
    else:
        teacher_tail = _log1mexp(torch.logsumexp(teacher_top, dim=-1))
    # the store computes its tail_mass as the same 1 - sum, with the same rounding noise
    rounding = topk_logprobs.shape[-1] * torch.finfo(topk_logprobs.dtype).eps
    teacher_tail = torch.where(teacher_tail < math.log(rounding), LOG_FLOOR, teacher_tail)
    buckets = torch.cat([teacher_top, teacher_tail.unsqueeze(-1)], dim=-1)
    # an empty bucket (at the floor) must stay empty: tempering log 0 = -80 to -80/T would give it mass
    tempered = torch.where(buckets <= LOG_FLOOR, torch.finfo(z.dtype).min, buckets / temperature)
    log_p = tempered - torch.logsumexp(tempered, dim=-1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
