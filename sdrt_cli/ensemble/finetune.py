"""The optional second phase: KL fine-tuning of the predictor through the frozen ensemble."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from sdrt_cli import distributed
from sdrt_cli.backbone import Backbone
from sdrt_cli.data import examples_by_index
from sdrt_cli.distill.batching import epoch_order, rank_share
from sdrt_cli.ensemble.predictor import TrainSettings, split_holdout
from sdrt_cli.ensemble.runtime import Ensemble
from sdrt_cli.teacher_forcing import AnswerTarget, answer_logits


def finetune_predictor_kl(
    ensemble: Ensemble,
    backbone: Backbone,
    store,
    dataset,
    indices: Sequence[int],
    labels: torch.Tensor,
    settings: TrainSettings,
    progress_bar=None,
) -> dict[str, Any]:
    """Fine-tune the trained predictor end to end on the distillation objective of the MIXED student.

    Cross-entropy on "which trace was most confident" treats every wrong pick alike, though mixing
    two members whose edits agree costs little and a confident wrong pick costs much.  Here the loss
    is what the ensemble exists for: per example, KL(most confident teacher ‖ the weighted ensemble)
    at the teacher's answer rows (``sdrt_cli.teacher_forcing``), the student fed its single-step
    prompt with the weights computed inside the forward, and y2 teacher-forced.  Only the predictor
    learns (adapters and backbone stay frozen); gradients reach it through the backbone layers above
    the feature layer.  The held-out examples are those of the cross-entropy phase; the epoch with
    their lowest KL is kept (epoch 0 = the cross-entropy predictor unchanged).  Under torchrun each
    rank takes its share of every batch and the gradients are summed across ranks.
    """
    predictor = ensemble.predictor
    assert predictor is not None
    world, rank = distributed.world_size(), distributed.rank()
    train_pos, held_pos = split_holdout(len(indices), settings.holdout, settings.seed)
    train = [indices[j] for j in train_pos]
    held = [indices[j] for j in held_pos]
    label_of = {indices[j]: ensemble.members[int(labels[j])] for j in range(len(indices))}
    examples = examples_by_index(dataset, indices)  # decoded batch by batch, every epoch
    targets = {i: AnswerTarget.of(store.record(i, label_of[i])) for i in indices}
    device = next(predictor.parameters()).device
    params = list(predictor.parameters())

    def batch_loss_sum(part: Sequence[int]) -> torch.Tensor:
        """Sum of the part's per-example KLs (this rank's share of a batch; 0 for an empty share)."""
        if not part:
            return torch.zeros((), device=device)
        with ensemble.attach(backbone) as handle:
            logits = answer_logits(backbone, dataset, [examples[i] for i in part], [[targets[i]] for i in part], steer=handle, vision=ensemble.vision)
        total = torch.zeros((), device=device)
        for b, i in enumerate(part):
            total = total + targets[i].kl(logits[b][0]).to(device)
        return total

    def held_kl(bar) -> float | None:
        if not held:
            return None
        predictor.eval()
        total = torch.zeros(())
        with torch.no_grad():
            for start in range(0, len(held), settings.kl_batch_size):
                part = rank_share(held[start : start + settings.kl_batch_size], world, rank)
                total += distributed.sum_over_ranks(batch_loss_sum(part), backbone.device).float()
                if bar:
                    bar.advance(len(part))
        return float(total) / len(held)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in predictor.state_dict().items()}

    frozen = [p for a in ensemble.adapters for p in a.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=settings.kl_lr, weight_decay=settings.weight_decay)
    epochs: list[dict[str, Any]] = []

    def my_count(items: Sequence[int]) -> int:
        step = settings.kl_batch_size
        return sum(len(rank_share(items[s : s + step], world, rank)) for s in range(0, len(items), step))

    work = settings.kl_epochs * (my_count(train) + my_count(held)) + my_count(held)
    try:
        with (progress_bar("ensemble KL fine-tune", work) if progress_bar else contextlib.nullcontext()) as bar:
            start_kl = held_kl(bar)
            best_epoch, best_kl, best_state = 0, start_kl, snapshot()
            for epoch in range(1, settings.kl_epochs + 1):
                predictor.train()
                order = epoch_order(train, settings.seed, epoch)
                train_sum = 0.0
                for start in range(0, len(order), settings.kl_batch_size):
                    batch = order[start : start + settings.kl_batch_size]
                    part = rank_share(batch, world, rank)
                    loss = batch_loss_sum(part) / len(batch)  # the mean over the GLOBAL batch once summed
                    optimizer.zero_grad()
                    if loss.requires_grad:
                        loss.backward()
                    if world > 1:
                        distributed.sum_gradients(params, backbone.device)
                    optimizer.step()
                    train_sum += float(distributed.sum_over_ranks(loss, backbone.device)) * len(batch)
                    if bar:
                        bar.advance(len(part))
                current = held_kl(bar)
                epochs.append({"epoch": epoch, "train_kl": train_sum / max(len(train), 1), "holdout_kl": current})
                if current is None or current < best_kl:
                    best_epoch, best_kl, best_state = epoch, current, snapshot()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    predictor.load_state_dict(best_state)
    predictor.eval()
    return {
        "epochs": settings.kl_epochs,
        "selected_epoch": best_epoch,
        "holdout_kl_before": start_kl,
        "holdout_kl": best_kl,
        "per_epoch": epochs,
    }

