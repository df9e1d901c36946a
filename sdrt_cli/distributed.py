"""torchrun support: every command runs single-process by default and under
``torchrun --nproc-per-node N -m sdrt_cli COMMAND`` with N processes (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group torchrun set up (no-op for a single process)."""
    if world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a list of one outside torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The sum of ``values`` over ranks, on CPU (NCCL reduces device tensors only; gloo takes either)."""
    on_device = values.detach().to(device)
    if dist.is_initialized():
        dist.all_reduce(on_device)
    return on_device.cpu()


def sum_gradients(params: Sequence[torch.nn.Parameter], device: torch.device | str) -> None:
    """Replace each parameter's gradient by its sum over ranks (a missing gradient counts as zero),
    in one all-reduce of a flat float32 buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]).to(device)
    if dist.is_initialized():
        dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).to(p.device, p.dtype)
        offset += g.numel()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share: items i with i % world_size == rank."""
    return [item for i, item in enumerate(items) if i % world_size() == rank()]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
