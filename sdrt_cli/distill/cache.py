"""The cache of the frozen lower layers (RAM first, then disk, else recomputed)."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdrt_cli.io import atomic_write_bytes


@dataclass
class LowerStates:
    """Input to the first trainable layer for one example: the shared prompt part and one tail per unit."""

    prefix: torch.Tensor  # [S, H]
    tails: dict[str, torch.Tensor]  # unit -> [len(tail), H]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.prefix, *self.tails.values()])

    def full(self, unit: str) -> torch.Tensor:
        return torch.cat([self.prefix, self.tails[unit]]) if self.tails[unit].shape[0] else self.prefix


class LowerCache:
    """RAM up to ``ram_bytes``, then safetensors files in ``directory`` up to ``disk_bytes``; beyond
    both, ``put`` declines and the caller recomputes.  Kept on the CPU; moved to ``device`` on ``get``."""

    def __init__(self, ram_bytes: int, disk_bytes: int, directory: Path, device: torch.device):
        self.ram_bytes, self.disk_bytes = ram_bytes, disk_bytes
        self.directory = Path(directory)
        self.device = device
        self.ram: dict[int, LowerStates] = {}
        self.disk: dict[int, Path] = {}
        self.ram_used = self.disk_used = 0
        self.hits = self.misses = 0

    def get(self, index: int) -> LowerStates | None:
        if index in self.ram:
            self.hits += 1
            states = self.ram[index]
        elif index in self.disk:
            from safetensors.torch import load_file

            self.hits += 1
            tensors = load_file(str(self.disk[index]))
            prefix = tensors.pop("prefix")
            states = LowerStates(prefix, {k[len("tail.") :]: v for k, v in tensors.items()})
        else:
            self.misses += 1
            return None
        if self.device.type == "cpu":
            return states
        return LowerStates(states.prefix.to(self.device), {k: v.to(self.device) for k, v in states.tails.items()})

    def put(self, index: int, states: LowerStates) -> None:
        size = states.nbytes
        cpu = LowerStates(states.prefix.cpu(), {k: v.cpu() for k, v in states.tails.items()})
        if self.ram_used + size <= self.ram_bytes:
            self.ram[index] = cpu
            self.ram_used += size
        elif self.disk_used + size <= self.disk_bytes:
            from safetensors.torch import save

            path = self.directory / f"{index}.safetensors"
            tensors = {"prefix": cpu.prefix.contiguous(), **{f"tail.{k}": v.contiguous() for k, v in cpu.tails.items()}}
            atomic_write_bytes(path, save(tensors))
            self.disk[index] = path
            self.disk_used += size

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "ram_bytes": self.ram_used, "disk_bytes": self.disk_used, "ram_examples": len(self.ram), "disk_examples": len(self.disk)}

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.directory.parent.rmdir()  # OUT/cache, once every rank's folder is gone

