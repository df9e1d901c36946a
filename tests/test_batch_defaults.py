"""Batch sizes left to sdrt: small on a CPU, filling a large GPU on CUDA, always overridable."""

import torch

from sdrt_cli.generation import GENERATION_BATCH, generation_batch_size


def test_an_explicit_batch_size_always_wins():
    assert generation_batch_size("eval", 7, "cpu") == 7
    assert generation_batch_size("traces", 1, "cuda") == 1


def test_defaults_follow_the_device_the_run_will_use():
    assert generation_batch_size("eval", None, "cpu") == GENERATION_BATCH["eval"][0] == 4
    assert generation_batch_size("traces", None, "cpu") == GENERATION_BATCH["traces"][0] == 2
    on_auto = GENERATION_BATCH["eval"][1 if torch.cuda.is_available() else 0]
    assert generation_batch_size("eval", None, "auto") == on_auto
    # naming a GPU picks the GPU default without touching one
    assert generation_batch_size("eval", None, "cuda:0") == 32 and generation_batch_size("traces", None, "cuda") == 4


def test_help_states_both_defaults(cli):
    assert "Default: 4 on a CPU, 32 on a GPU" in cli("eval", "--help").out
    assert "Default: 2 on a CPU, 4 on a GPU" in cli("traces", "--help").out
