"""Sampling the next token (`sdrt_cli.generation.pick_next`): right distribution, nucleus cut, per-row seeds."""

from __future__ import annotations

import torch

from sdrt_cli.generation import Sampling, pick_next, row_generator

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])


def draws(logits: torch.Tensor, sampling: Sampling, rows: int) -> torch.Tensor:
    generators = [row_generator(sampling.seed, "row", r) for r in range(rows)]
    return torch.tensor(pick_next(logits.expand(rows, -1), sampling, generators))


def test_draws_follow_the_temperature_softmax():
    for temperature in (1.0, 2.0):
        picks = draws(LOGITS, Sampling(temperature=temperature, seed=3), rows=6000)
        frequencies = torch.bincount(picks, minlength=len(LOGITS)).double() / len(picks)
        expected = torch.softmax(LOGITS.double() / temperature, dim=-1)
        assert (frequencies - expected).abs().max() < 0.025, (frequencies, expected)


def test_nucleus_keeps_only_the_smallest_head_reaching_top_p():
    probs = torch.softmax(LOGITS, dim=-1)  # sorted: tokens 0, 1, 2, 4, 3 with 0.56, 0.21, 0.13, 0.08, 0.03
    picks = draws(LOGITS, Sampling(temperature=1.0, top_p=0.8, seed=1), rows=4000)
    assert set(picks.tolist()) == {0, 1, 2}  # 0.56 + 0.21 < 0.8, so token 2 completes the nucleus
    frequencies = torch.bincount(picks, minlength=len(LOGITS)).double() / len(picks)
    head = probs[[0, 1, 2]].double()
    assert (frequencies[[0, 1, 2]] - head / head.sum()).abs().max() < 0.03


def test_a_rows_draw_depends_on_its_own_generator_only():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    sampling = Sampling(temperature=0.7, top_p=0.9, seed=5)
    together = pick_next(logits, sampling, [row_generator(5, "ex", r) for r in range(5)])
    alone = [pick_next(logits[r : r + 1], sampling, [row_generator(5, "ex", r)])[0] for r in reversed(range(5))][::-1]
    assert together == alone
    assert pick_next(logits, Sampling(), [None] * 5) == logits.argmax(-1).tolist()  # greedy needs no generator
