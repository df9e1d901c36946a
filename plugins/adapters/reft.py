"""ReFT interventions, natively in torch (pyreft is only a test oracle; it pins transformers 4.x).

Both act on the rows they are given, h of shape [..., hidden]; :class:`sdrt_cli.adapters.InterventionAdapter`
feeds them only the selected positions of a decoder layer's output.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from sdrt_cli.adapters import Intervention


class ReftIntervention(Intervention):
    """The paper's intervention (SDRT Eq. 5): ĥ = h + B·A·h.

    A (hidden → rank) is drawn from N(0, init_std²) — default std hidden_size ** -0.5, so A·h has the
    per-coordinate scale of h — and B (rank → hidden) is zero, as in LoRA, so a fresh intervention is
    exactly the identity and B learns first.
    """

    def __init__(self, hidden_size: int, rank: int, init_std: float | None = None):
        super().__init__(hidden_size, rank, init_std)
        self.down = nn.Linear(hidden_size, rank, bias=False)  # A
        self.up = nn.Linear(rank, hidden_size, bias=False)  # B
        nn.init.normal_(self.down.weight, mean=0.0, std=init_std if init_std is not None else hidden_size**-0.5)
        nn.init.zeros_(self.up.weight)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h))


class LoreftIntervention(Intervention):
    """LoReFT (Wu et al. 2024): ĥ = h + Rᵀ(W·h + b − R·h), R (rank × hidden) with orthonormal rows.

    R is kept orthonormal by ``torch.nn.utils.parametrizations.orthogonal`` with the Householder map
    and no trivialisation: the trivialised form stores a hidden × hidden base (64 MB per layer at
    hidden 4096), this one stores only rank × hidden reflectors.  R starts as a random orthonormal
    matrix and W, b keep ``nn.Linear``'s default initialisation, as in pyreft, so unlike ``reft`` a
    fresh LoReFT is not the identity.  ``init_std`` is unused.
    """

    def __init__(self, hidden_size: int, rank: int, init_std: float | None = None):
        super().__init__(hidden_size, rank, init_std)
        rotate = nn.Linear(hidden_size, rank, bias=False)
        nn.init.orthogonal_(rotate.weight)
        self.rotate = orthogonal(rotate, orthogonal_map="householder", use_trivialization=False)
        self.source = nn.Linear(hidden_size, rank, bias=True)  # W, b

    @property
    def projection(self) -> torch.Tensor:
        """R, [rank, hidden], orthonormal rows."""
        return self.rotate.weight

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        r = self.rotate.weight
        return (self.source(h) - h @ r.T) @ r
