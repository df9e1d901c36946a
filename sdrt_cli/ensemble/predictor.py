"""Training the ensemble's predictor with cross-entropy on the most confident member's label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdrt_cli.ensemble.runtime import EnsemblePredictor
from sdrt_cli.errors import SdrtError
from sdrt_cli.selection import confidence_labels  # noqa: F401 - its home is sdrt_cli.selection; importable here too


@dataclass
class TrainSettings:
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.01
    hidden_size: int = 128
    batch_size: int = 256
    holdout: float = 0.2
    seed: int = 0
    # optional second phase (0 = the paper's predictor): epochs of end-to-end KL fine-tuning
    kl_epochs: int = 0
    kl_lr: float = 1e-3
    kl_batch_size: int = 8
    # which trace labels an example (sdrt_cli.selection.LABELS): the paper's is "confident"
    label: str = "confident"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) positions; no held-out part below 2 examples or for fraction 0."""
    held = 0 if n < 2 or fraction <= 0 else min(n - 1, max(1, round(n * fraction)))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen).tolist()
    return sorted(order[held:]), sorted(order[:held])


def train_predictor(features: torch.Tensor, labels: torch.Tensor, members: int, settings: TrainSettings) -> tuple[EnsemblePredictor, dict[str, Any]]:
    """Cross-entropy training on (features, labels); returns the predictor and a report with the
    held-out accuracy and the majority-label baseline on the same held-out examples.

    With a held-out part, the predictor kept is the one of the step with the lowest held-out
    cross-entropy (early stopping): the labels are noisy (which trace was most confident), and a
    predictor trained to the end memorises a few hundred examples and is confidently wrong on new
    ones, which hurts more than a soft mix, because the weights mix the members' edits.
    """
    n = features.shape[0]
    if n == 0:
        raise SdrtError("no examples to train the ensemble predictor on")
    train_idx, held_idx = split_holdout(n, settings.holdout, settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        predictor = EnsemblePredictor(features.shape[1], settings.hidden_size, members)
    x, y = features.float(), labels.long()
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    train_tensor = torch.tensor(train_idx)

    def held_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(predictor(x[held_idx]), y[held_idx]))

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in predictor.state_dict().items()}

    # without a held-out part there is nothing to choose by: the last step is kept
    best_step, best_loss, best_state = settings.steps, None, None
    if held_idx:
        best_step, best_loss, best_state = 0, held_loss(), snapshot()
    loss_value = float("nan")
    for step in range(1, settings.steps + 1):
        predictor.train()
        if len(train_idx) > settings.batch_size:
            pick = train_tensor[torch.randint(len(train_idx), (settings.batch_size,), generator=gen)]
        else:
            pick = train_tensor
        loss = nn.functional.cross_entropy(predictor(x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if held_idx:
            predictor.eval()
            current = held_loss()
            if current < best_loss:
                best_step, best_loss, best_state = step, current, snapshot()
    if best_state is not None:
        predictor.load_state_dict(best_state)
    predictor.eval()

    def accuracy(idx: list[int]) -> float | None:
        if not idx:
            return None
        with torch.no_grad():
            return float((predictor(x[idx]).argmax(1) == y[idx]).float().mean())

    counts = torch.bincount(y[train_idx], minlength=members)
    majority = int(counts.argmax())
    report = {
        "examples": n,
        "train_examples": len(train_idx),
        "holdout_examples": len(held_idx),
        "final_train_loss": loss_value,
        "selected_step": best_step,
        "holdout_loss": best_loss,
        "train_accuracy": accuracy(train_idx),
        "holdout_accuracy": accuracy(held_idx),
        "holdout_majority_accuracy": float((y[held_idx] == majority).float().mean()) if held_idx else None,
        "label_counts": torch.bincount(y, minlength=members).tolist(),
    }
    return predictor, report

