"""Losses: the spec syntax, composition, and the math of mse, kl (top-k + tail bucket) and ce."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdrt_cli.errors import SdrtError, UnknownNameError
from sdrt_cli.hookspecs import hookimpl
from sdrt_cli.losses import DistillBatch, Loss, compose, parse_loss_spec
from sdrt_cli.plugins import losses as loss_registry
from sdrt_plugins.losses.distill import CELoss, KLLoss, MSELoss, topk_tail_kl

# -- spec ---------------------------------------------------------------------------------------


def test_builtins_are_registered():
    assert {"mse", "kl", "ce"} <= set(loss_registry().names())


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("mse", [("mse", 1.0)]),
        ("mse+kl", [("mse", 1.0), ("kl", 1.0)]),
        ("mse:1+kl:0.5", [("mse", 1.0), ("kl", 0.5)]),
        (" mse : 2 + ce ", [("mse", 2.0), ("ce", 1.0)]),
        ("kl:1e-1", [("kl", 0.1)]),
    ],
)
def test_parse_loss_spec(spec, expected):
    assert parse_loss_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "is empty"),
        ("mse+", "has an empty term"),
        ("mse:abc", "weight 'abc' of 'mse' is not a number"),
        ("mse:-1", "must be a finite number >= 0"),
        ("mse:inf", "must be a finite number >= 0"),
        ("mse:1:2", "must be NAME or NAME:WEIGHT"),
        (":1", "must be NAME or NAME:WEIGHT"),
        ("mse+mse:2", "names 'mse' twice"),
    ],
)
def test_parse_loss_spec_rejects_bad_syntax(spec, message):
    with pytest.raises(SdrtError, match=message):
        parse_loss_spec(spec)


def test_unknown_loss_suggests_a_close_name():
    with pytest.raises(UnknownNameError) as info:
        parse_loss_spec("mes+kl")
    message = str(info.value)
    assert "loss spec 'mes+kl': unknown loss 'mes'" in message
    assert "Did you mean 'mse'?" in message and "ce, kl, mse" in message


# -- batches ------------------------------------------------------------------------------------


def hidden_batch(seed=0, b=2, r=3, layers=2, h=5):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, r, layers, h, generator=g, requires_grad=True)
    teacher = torch.randn(b, r, layers, h, generator=g)
    row_mask = torch.tensor([[True, True, False], [True, False, False]])
    return DistillBatch(student_hidden=student, teacher_hidden=teacher, row_mask=row_mask)


def logits_batch(seed=0, b=2, r=3, vocab=11, k=3):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, r, vocab, generator=g, requires_grad=True)
    teacher = torch.randn(b, r, vocab, generator=g).log_softmax(-1)
    top = teacher.topk(k, dim=-1)
    row_mask = torch.tensor([[True, True, False], [True, False, True]])
    return DistillBatch(student_logits=student, topk_ids=top.indices, topk_logprobs=top.values, row_mask=row_mask)


# -- compose ------------------------------------------------------------------------------------


def test_compose_weights_parts_and_declares_needs():
    batch = hidden_batch()
    logits = logits_batch()
    batch.student_logits, batch.topk_ids, batch.topk_logprobs = logits.student_logits, logits.topk_ids, logits.topk_logprobs
    batch.row_mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = compose("mse:2+kl:0.5")
    assert loss.needs == {"hidden", "logits"}
    assert compose("ce").needs == {"ce"}
    total, parts = loss(batch)
    assert set(parts) == {"mse", "kl"}
    assert not parts["mse"].requires_grad and total.requires_grad
    torch.testing.assert_close(total, 2 * parts["mse"] + 0.5 * parts["kl"])
    torch.testing.assert_close(parts["mse"], MSELoss()(batch))


def test_compose_passes_options_and_rejects_bad_ones():
    batch = logits_batch()
    total, _ = compose("kl", options={"kl": {"temperature": 2.0}})(batch)
    torch.testing.assert_close(total, KLLoss(temperature=2.0)(batch))
    with pytest.raises(SdrtError, match="loss 'kl' does not accept options \\['tau'\\]"):
        compose("kl", options={"kl": {"tau": 2.0}})
    with pytest.raises(SdrtError, match="loss options given for 'ce', which is not in the loss spec"):
        compose("kl", options={"ce": {}})
    with pytest.raises(SdrtError, match="temperature must be a positive number, got 0"):
        compose("kl", options={"kl": {"temperature": 0}})


def test_missing_batch_field_names_the_loss_and_field():
    with pytest.raises(SdrtError, match="loss 'kl' needs batch field 'student_logits', which was not computed"):
        compose("mse+kl")(hidden_batch())


class L1Loss(Loss):
    name = "l1-test"
    needs = frozenset({"hidden"})

    def __call__(self, batch):
        rows = batch.row_mask
        return (batch.student_hidden[rows] - batch.teacher_hidden[rows]).abs().mean()


class L1Plugin:
    @staticmethod
    @hookimpl
    def register_losses(register):
        register("l1-test", L1Loss)


def no_needs(batch):
    return batch.student_hidden.sum()


class NoNeedsPlugin:
    @staticmethod
    @hookimpl
    def register_losses(register):
        register("no-needs-test", no_needs)


def test_third_party_loss_registers_and_composes(plugin):
    plugin(L1Plugin, "l1-plugin")
    batch = hidden_batch()
    total, parts = compose("mse+l1-test:2")(batch)
    expected_l1 = (batch.student_hidden[batch.row_mask] - batch.teacher_hidden[batch.row_mask]).abs().mean()
    torch.testing.assert_close(parts["l1-test"], expected_l1.detach())
    torch.testing.assert_close(total, parts["mse"] + 2 * expected_l1)


def test_third_party_loss_without_needs_is_refused(plugin):
    plugin(NoNeedsPlugin, "no-needs-plugin")
    with pytest.raises(SdrtError, match="loss 'no-needs-test' from plugin 'no-needs-plugin' must declare `needs`"):
        compose("no-needs-test")


# -- mse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["raw", "relative"])
def test_mse_is_masked_mean_per_layer_summed_over_layers(scale):
    batch = hidden_batch()
    batch.teacher_hidden[1, 2] = float("nan")  # a padded row's content must not leak in
    got = MSELoss(scale=scale)(batch)
    s, t = batch.student_hidden.detach(), batch.teacher_hidden
    real = [(0, 0), (0, 1), (1, 0)]
    expected = 0.0
    for layer in range(2):
        error = sum(sum(((s[b, r, layer] - t[b, r, layer]) ** 2).tolist()) for b, r in real) / (len(real) * 5)
        teacher_square = sum(sum((t[b, r, layer] ** 2).tolist()) for b, r in real) / (len(real) * 5)
        expected += error / teacher_square if scale == "relative" else error
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_relative_mse_does_not_depend_on_the_scale_of_the_states():
    batch = hidden_batch()
    small = MSELoss()(batch)
    batch.student_hidden = batch.student_hidden.detach() * 300
    batch.teacher_hidden = batch.teacher_hidden * 300
    assert MSELoss()(batch).item() == pytest.approx(small.item(), rel=1e-5)
    assert MSELoss(scale="raw")(batch).item() == pytest.approx(300**2 * MSELoss(scale="raw")(hidden_batch()).item(), rel=1e-5)
    zeros = hidden_batch()
    zeros.student_hidden = torch.zeros_like(zeros.student_hidden)
    assert MSELoss()(zeros).item() == pytest.approx(2.0)  # predicting zeros scores 1 per layer


def test_mse_rejects_an_unknown_scale():
    with pytest.raises(SdrtError, match="loss 'mse': scale must be one of relative, raw, got 'log'"):
        compose("mse", options={"mse": {"scale": "log"}})


def test_mse_gradient_reaches_student_only_and_empty_mask_is_zero():
    batch = hidden_batch()
    batch.teacher_hidden.requires_grad_(True)
    MSELoss()(batch).backward()
    assert batch.student_hidden.grad is not None and batch.student_hidden.grad[1, 1].abs().sum() == 0
    assert batch.teacher_hidden.grad is None
    batch.row_mask = torch.zeros(2, 3, dtype=torch.bool)
    empty = MSELoss()(batch)
    assert empty.item() == 0.0 and empty.requires_grad


def test_mse_rejects_mismatched_shapes():
    batch = hidden_batch()
    batch.teacher_hidden = batch.teacher_hidden[:, :, :1]
    with pytest.raises(SdrtError, match="loss 'mse': student_hidden .* must both be \\[B, R, L, H\\]"):
        MSELoss()(batch)


# -- kl -----------------------------------------------------------------------------------------


def test_kl_of_identical_distributions_is_zero():
    batch = logits_batch()
    student_logprobs = batch.student_logits.detach().log_softmax(-1)
    top = student_logprobs.topk(3, dim=-1)
    batch.topk_ids, batch.topk_logprobs = top.indices, top.values
    assert KLLoss()(batch).abs().item() < 1e-6
    assert KLLoss(temperature=1.0)(batch).abs().item() < 1e-6


def test_kl_hand_computed_case():
    # vocabulary of 4, teacher top-2 = tokens 2 (0.5) and 0 (0.3), tail 0.2
    student_logits = torch.tensor([[[1.0, 0.0, 2.0, -1.0]]])
    batch = DistillBatch(
        student_logits=student_logits,
        topk_ids=torch.tensor([[[2, 0]]]),
        topk_logprobs=torch.tensor([[[math.log(0.5), math.log(0.3)]]]),
        row_mask=torch.tensor([[True]]),
    )
    z = [1.0, 0.0, 2.0, -1.0]
    norm = sum(math.exp(v) for v in z)
    q = [math.exp(v) / norm for v in z]
    q2, q0, q_tail = q[2], q[0], q[1] + q[3]
    expected = 0.5 * math.log(0.5 / q2) + 0.3 * math.log(0.3 / q0) + 0.2 * math.log(0.2 / q_tail)
    assert KLLoss()(batch).item() == pytest.approx(expected, rel=1e-5)
    # the trace store's tail mass is used as is (same value here, so the same loss) ...
    batch.tail_mass = torch.tensor([[0.2]])
    assert KLLoss()(batch).item() == pytest.approx(expected, rel=1e-5)
    # ... and it is really read, not recomputed
    batch.tail_mass = torch.tensor([[0.05]])
    assert KLLoss()(batch).item() != pytest.approx(expected, rel=1e-3)


def test_kl_is_non_negative_and_masked():
    for seed in range(5):
        batch = logits_batch(seed=seed, b=3, r=4, vocab=50, k=5)
        batch.row_mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(seed)) > 0.3
        batch.row_mask[0, 0] = True
        per_row = topk_tail_kl(batch.student_logits, batch.topk_ids, batch.topk_logprobs)
        assert (per_row >= -1e-6).all()
        torch.testing.assert_close(KLLoss()(batch), per_row[batch.row_mask].mean())
    # a masked-out row with garbage does not matter
    batch = logits_batch()
    clean = KLLoss()(batch)
    batch.topk_logprobs[0, 2] = float("nan")
    torch.testing.assert_close(KLLoss()(batch), clean)


def test_kl_tail_bucket_matters():
    # teacher: 0.3 + 0.2 on tokens 0, 1 and half its mass in the tail
    ids = torch.tensor([[[0, 1]]])
    teacher = torch.tensor([[[math.log(0.3), math.log(0.2)]]])
    vocab = 6
    matching = torch.tensor([0.3, 0.2, 0.125, 0.125, 0.125, 0.125]).log()
    # same 3:2 ratio on the top-k, but almost no tail: a top-k-only KL would call this a perfect match
    no_tail = torch.tensor([0.59, 0.39, 0.005, 0.005, 0.005, 0.005]).log()
    losses = []
    for student in (matching, no_tail):
        batch = DistillBatch(student_logits=student.view(1, 1, vocab), topk_ids=ids, topk_logprobs=teacher, row_mask=torch.tensor([[True]]))
        losses.append(KLLoss()(batch).item())
    assert losses[0] == pytest.approx(0.0, abs=1e-6)
    assert losses[1] > 0.5
    renormalised_top = F.kl_div(no_tail[:2].log_softmax(-1), teacher[0, 0].log_softmax(-1), log_target=True, reduction="sum")
    assert renormalised_top.item() < 1e-3


@pytest.mark.parametrize("temperature", [0.5, 2.0, 10.0])
def test_kl_temperature_scaling_is_exact_when_top_k_covers_the_vocabulary(temperature):
    g = torch.Generator().manual_seed(4)
    vocab = 7
    student = torch.randn(1, 2, vocab, generator=g)
    teacher_logits = torch.randn(1, 2, vocab, generator=g)
    top = teacher_logits.log_softmax(-1).topk(vocab, dim=-1)  # no tail: the tempered teacher is exact
    batch = DistillBatch(student_logits=student, topk_ids=top.indices, topk_logprobs=top.values, row_mask=torch.ones(1, 2, dtype=torch.bool))
    p = (teacher_logits / temperature).log_softmax(-1)
    q = (student / temperature).log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1).mean() * temperature**2
    got = KLLoss(temperature=temperature)(batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got)
    # a stored tail_mass at float32 rounding level (1 - sum of exactly-covering top-k) is no tail
    batch.tail_mass = torch.full((1, 2), 2.4e-7)
    torch.testing.assert_close(KLLoss(temperature=temperature)(batch), expected, atol=1e-5, rtol=1e-5)


def test_kl_gradient_reaches_student_only_and_stays_finite_with_extreme_logits():
    batch = logits_batch()
    batch.topk_logprobs = batch.topk_logprobs.clone().requires_grad_(True)
    with torch.no_grad():
        batch.student_logits.mul_(1000.0)  # a saturated student: its tail underflows float32
    loss = KLLoss(temperature=1.5)(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert batch.student_logits.grad is not None and torch.isfinite(batch.student_logits.grad).all()
    assert batch.student_logits.grad.abs().sum() > 0
    assert batch.topk_logprobs.grad is None


def test_kl_rejects_mismatched_topk_shapes():
    batch = logits_batch()
    batch.topk_ids = batch.topk_ids[..., :2]
    with pytest.raises(SdrtError, match="loss 'kl': topk_ids .* must be \\[B, R, k\\]"):
        KLLoss()(batch)


# -- ce -----------------------------------------------------------------------------------------


def test_ce_ignores_minus_100_and_matches_manual_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 9, generator=g, requires_grad=True)
    labels = torch.tensor([[3, -100, 5, 1], [-100, -100, 8, 0]])
    batch = DistillBatch(ce_logits=logits, ce_labels=labels)
    got = CELoss()(batch)
    log_probs = logits.detach().log_softmax(-1)
    kept = [(0, 0, 3), (0, 2, 5), (0, 3, 1), (1, 2, 8), (1, 3, 0)]
    expected = -sum(log_probs[b, t, y].item() for b, t, y in kept) / len(kept)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[0, 0].abs().sum() > 0


def test_ce_with_no_labels_is_zero_and_bad_shapes_fail():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    empty = CELoss()(DistillBatch(ce_logits=logits, ce_labels=torch.full((1, 3), -100)))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(SdrtError, match="loss 'ce': ce_logits"):
        CELoss()(DistillBatch(ce_logits=logits, ce_labels=torch.zeros(1, 4, dtype=torch.long)))
