"""What a distill run trains and how: the student's shape, the optimisation settings, the LR schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sdrt_cli import defaults
from sdrt_cli.adapters import LORA, weights_adapter
from sdrt_cli.errors import SdrtError

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class StudentSpec:
    """What the adapters are: kind, where they act, their size.  ``layers`` and ``compare_layers``
    are absolute decoder-layer indices; ``compare_layers`` are the store's layers, in its order."""

    adapter: str = "reft"
    layers: list[int] = field(default_factory=list)
    compare_layers: list[int] = field(default_factory=list)
    pos: int = defaults.POS
    rank: int = 4
    init_std: float | None = None
    skip: bool = False
    skip_layer: int | None = None
    skip_pool: str = "mean"
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None: the lora plugin's default (attention + MLP projections)

    @property
    def is_lora(self) -> bool:
        return self.adapter == LORA

    @property
    def changes_weights(self) -> bool:
        """A weights adapter (``lora``, ``projector``): trains model weights, not hooked interventions."""
        return weights_adapter(self.adapter) is not None


DEFAULT_BATCH_SIZE = 4


def default_batch_size(world: int) -> int:
    """The global batch when --batch-size is not given: 4, or one example per process on more than 4
    (every rank must train at every step).  Give --batch-size to fix the batch across process counts."""
    return max(DEFAULT_BATCH_SIZE, world)


@dataclass
class TrainSettings:
    epochs: int = defaults.EPOCHS
    max_steps: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    micro_batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    val_fraction: float = 0.0
    seed: int = 0
    autocast: bool = True  # bf16 autocast of the trainable part, on CUDA only
    save_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    cache_ram_gb: float = 8.0
    cache_disk_gb: float = 50.0

    # how the run computes, not what it computes: a resumed run may change these
    RUNTIME_ONLY = ("save_every", "cache_ram_gb", "cache_disk_gb", "micro_batch_size")

    def validate(self, world: int = 1) -> None:
        """Refuse impossible settings in one sentence; ``world`` is the number of processes."""
        checks = [
            ("epochs", self.epochs >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, "at least 1"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a number >= 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("max_grad_norm", math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, "a number >= 0 (0 = no clipping)"),
            ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)"),
            ("save_every", self.save_every >= 0, "a number of steps >= 0"),
            ("cache_ram_gb", self.cache_ram_gb >= 0, ">= 0 (0 = no RAM cache)"),
            ("cache_disk_gb", self.cache_disk_gb >= 0, ">= 0 (0 = no disk cache)"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise SdrtError(f"--{name.replace('_', '-')} must be {need}, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SdrtError(f"--max-steps must be at least 1, got {self.max_steps!r}")
        if self.batch_size < world:
            raise SdrtError(
                f"--batch-size {self.batch_size} is smaller than the {world} processes, so some would idle at every step; "
                f"use --batch-size {world} or a multiple of it"
            )
        if self.schedule not in SCHEDULES:
            raise SdrtError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def lr_at(step: int, total: int, settings: TrainSettings) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    warmup = math.ceil(settings.warmup_ratio * total)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    if settings.schedule == "constant":
        return settings.lr
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if settings.schedule == "linear":
        return settings.lr * (1.0 - progress)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

