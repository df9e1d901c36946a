"""torchrun support: every command runs single-process by default and under
``torchrun --nproc-per-node N -m sdrt_cli COMMAND`` with N processes.

On a machine with CUDA the process group is ``cpu:gloo,cuda:nccl``: tensors reduce over NCCL when
they live on a GPU and over gloo when they live on the CPU (``--device cpu`` on a GPU node works).
Barriers and object collectives always run on a gloo group, so a rank that waits for a straggler
is not killed by NCCL's watchdog.  Every collective waits up to ``SDRT_DIST_TIMEOUT_MIN`` minutes
(default 360) for the slowest rank; see docs/gpu.md."""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
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


TIMEOUT_ENV = "SDRT_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 360.0  # ranks legitimately finish hours apart (traces, eval, feature extraction)

# barriers and object collectives: a gloo group when the default group also speaks NCCL, else None
_objects_group: Any = None


def collective_timeout(environ: dict[str, str] | None = None) -> timedelta:
    """How long a collective waits for the slowest rank: ``SDRT_DIST_TIMEOUT_MIN`` minutes (default 360)."""
    from sdrt_cli.errors import SdrtError

    text = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "").strip()
    if not text:
        return timedelta(minutes=DEFAULT_TIMEOUT_MIN)
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise SdrtError(f"{TIMEOUT_ENV}={text!r} is not a positive number of minutes")
    return timedelta(minutes=minutes)


def process_group_backend(cuda_available: bool) -> str:
    """gloo alone without CUDA; with CUDA each tensor reduces over the backend of its device."""
    return "cpu:gloo,cuda:nccl" if cuda_available else "gloo"


def rank_cuda_device(device: str | None) -> torch.device | None:
    """The GPU this rank computes on for the ``--device`` option, or None when it computes on the CPU."""
    from sdrt_cli.backbone import resolve_device

    chosen = resolve_device(device)
    if chosen.type != "cuda":
        return None
    if chosen.index is None:
        return resolve_device("auto")
    return chosen


def init(device: str | None = "auto") -> None:
    """Join the process group torchrun set up (no-op for a single process); ``device`` is the
    command's ``--device`` option, which binds the NCCL communicator to this rank's GPU."""
    global _objects_group
    if world_size() > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        timeout = collective_timeout()
        bound: dict[str, Any] = {}
        gpu = rank_cuda_device(device) if cuda else None
        if gpu is not None:
            torch.cuda.set_device(gpu)
            bound["device_id"] = gpu
        dist.init_process_group(backend=process_group_backend(cuda), timeout=timeout, **bound)
        if cuda:
            _objects_group = dist.new_group(backend="gloo", timeout=timeout)
        atexit.register(shutdown)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_objects_group)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a list of one outside torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_objects_group)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_objects_group)
    return box[0]


def sum_over_ranks(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The sum of ``values`` over ranks, on CPU; it reduces on ``device`` (the model's), so over NCCL
    on a GPU and over gloo on the CPU."""
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
    global _objects_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _objects_group = None
