"""Run under torchrun by tests/test_distributed.py: joins the group with sdrt's own init, then
exercises every collective sdrt uses.  ``PROBE_SLEEP`` seconds of delay on rank 1 before a barrier
makes rank 0 wait for a straggler."""

import os
import time

import torch

from sdrt_cli import distributed

distributed.init("cpu")
rank = distributed.rank()
assert distributed.gather_objects(rank * 10) == [0, 10]
assert distributed.broadcast_object(f"from {rank}") == "from 0"
assert distributed.sum_over_ranks(torch.tensor([rank + 1.0]), "cpu").tolist() == [3.0]
param = torch.nn.Parameter(torch.zeros(2))
param.grad = torch.full((2,), float(rank + 1))
distributed.sum_gradients([param], "cpu")
assert param.grad.tolist() == [3.0, 3.0]
if rank == 1:
    time.sleep(float(os.environ.get("PROBE_SLEEP", "0")))
distributed.barrier()
print(f"rank {rank} passed", flush=True)
