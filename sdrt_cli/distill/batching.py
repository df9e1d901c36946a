"""Data order, train/validation splits and each rank's share of a global batch."""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch


def split_train_val(indices: Sequence[int], val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic by example index alone (not by seed): the same examples are held out in every
    run over the same store; adding examples moves few of the old ones."""
    indices = sorted(indices)
    if val_fraction <= 0 or len(indices) < 2:
        return indices, []
    count = min(len(indices) - 1, max(1, round(val_fraction * len(indices))))
    ranked = sorted(indices, key=lambda i: hashlib.sha256(f"sdrt-val:{i}".encode()).hexdigest())
    val = set(ranked[:count])
    return [i for i in indices if i not in val], sorted(val)


def epoch_order(train: Sequence[int], seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]


def epoch_batches(train: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global batches, the same for any number of processes.

    The examples are dealt once per run (from the seed) into ``batch_size`` slots; every epoch
    shuffles each slot, and batch s holds the s-th example of every slot, slot j at position j (the
    last batch only has the longer, leading slots).  :func:`rank_share` gives position j to rank
    ``j % world``, so every rank trains on ``batch_size / world`` examples at every step, and always on
    the same examples, whose lower states it has cached."""
    dealt = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    slots = [[train[p] for p in dealt[j::batch_size]] for j in range(batch_size)]
    shuffle = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    slots = [[slot[i] for i in torch.randperm(len(slot), generator=shuffle).tolist()] for slot in slots]
    steps = math.ceil(len(train) / batch_size)
    return [[slot[s] for slot in slots if s < len(slot)] for s in range(steps)]


def rank_share(batch: Sequence[int], world: int, rank: int) -> list[int]:
    """Rank ``rank``'s disjoint part of a global batch: positions ``rank, rank + world, ...`` (sizes
    differ by at most one; with :func:`epoch_batches` a rank always gets the same slots)."""
    return list(batch[rank::world])

