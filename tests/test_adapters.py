"""Intervention adapters: the math of each part, positions, hooks on a real tiny Mistral, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sdrt_cli.adapters import (
    ADAPTER_JSON,
    ADAPTER_TENSORS,
    AdapterConfig,
    Intervention,
    InterventionAdapter,
    VisionSkip,
    attach,
    intervention_class,
    intervention_positions,
    load_adapter,
    pool_vision_features,
    save_adapter,
)
from sdrt_cli.errors import SdrtError, UnknownNameError
from sdrt_cli.hookspecs import hookimpl
from sdrt_cli.plugins import adapters as adapter_registry
from sdrt_plugins.adapters.reft import LoreftIntervention, ReftIntervention

HIDDEN = 64
LAYERS = 4


@pytest.fixture(scope="module")
def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=128,
    )
    model = MistralForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def layers_of(model):
    return list(model.model.layers)


def make_inputs(batch=2, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (batch, length), generator=g)
    attention = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        attention[1, :3] = 0  # row 1 is left-padded
    return ids, attention


def randomise(adapter: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (a trained adapter is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return adapter


# -- interventions ------------------------------------------------------------------------------


def test_fresh_reft_is_exactly_the_identity():
    torch.manual_seed(0)
    intervention = ReftIntervention(HIDDEN, rank=4)
    h = torch.randn(3, 7, HIDDEN)
    out = intervention(h)
    assert torch.equal(out, h)
    assert out.view(torch.int32).equal(h.view(torch.int32))  # bit for bit, not just ==
    assert torch.count_nonzero(intervention.up.weight) == 0


def test_reft_default_init_std_is_inverse_sqrt_hidden_and_configurable():
    torch.manual_seed(0)
    default = ReftIntervention(1024, rank=64)
    assert default.down.weight.std().item() == pytest.approx(1024**-0.5, rel=0.05)
    custom = ReftIntervention(1024, rank=64, init_std=0.2)
    assert custom.down.weight.std().item() == pytest.approx(0.2, rel=0.05)


def test_reft_computes_h_plus_b_a_h():
    intervention = randomise(ReftIntervention(HIDDEN, rank=4))
    h = torch.randn(5, HIDDEN)
    a, b = intervention.down.weight, intervention.up.weight  # [r, k], [k, r]
    expected = h + (h @ a.T) @ b.T
    torch.testing.assert_close(intervention(h), expected)


def test_loreft_has_orthonormal_rows_and_its_formula():
    torch.manual_seed(0)
    intervention = LoreftIntervention(HIDDEN, rank=5)
    r = intervention.projection
    assert r.shape == (5, HIDDEN)
    torch.testing.assert_close(r @ r.T, torch.eye(5), atol=1e-5, rtol=0)
    h = torch.randn(4, HIDDEN)
    w, b = intervention.source.weight, intervention.source.bias
    expected = h + (h @ w.T + b - h @ r.T) @ r
    torch.testing.assert_close(intervention(h), expected, atol=1e-5, rtol=1e-5)
    # only the rank x hidden reflectors are stored, never a hidden x hidden base
    assert all(t.numel() <= HIDDEN * 5 for t in intervention.state_dict().values())


def test_loreft_stays_orthonormal_after_an_optimiser_step():
    torch.manual_seed(0)
    intervention = LoreftIntervention(HIDDEN, rank=3)
    opt = torch.optim.SGD(intervention.parameters(), lr=0.5)
    h, target = torch.randn(8, HIDDEN), torch.randn(8, HIDDEN)
    before = intervention.projection.detach().clone()
    ((intervention(h) - target) ** 2).mean().backward()
    opt.step()
    r = intervention.projection
    assert not torch.allclose(r, before)
    torch.testing.assert_close(r @ r.T, torch.eye(3), atol=1e-5, rtol=0)


def test_vision_skip_is_zero_at_start_and_follows_eq8():
    torch.manual_seed(0)
    skip = VisionSkip(HIDDEN, vision_dim=12, rank=3)
    h, u = torch.randn(4, HIDDEN), torch.randn(4, 12)
    assert torch.count_nonzero(skip(h, u)) == 0
    randomise(skip)
    w, b, a_u, r = skip.source.weight, skip.source.bias, skip.vision.weight, skip.restore
    expected = (h @ w.T + b + u @ a_u.T) @ r
    torch.testing.assert_close(skip(h, u), expected)


def test_pool_vision_features_over_several_images():
    first = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # 2 tiles x 3 patches
    second = -torch.ones(1, 3, 4)  # 1 tile
    flat = torch.cat([first.reshape(-1, 4), second.reshape(-1, 4)])
    torch.testing.assert_close(pool_vision_features([first, second], "mean"), flat.mean(0))
    torch.testing.assert_close(pool_vision_features([first, second], "max"), flat.amax(0))
    # cls: the first token of each of the three tiles
    expected_cls = torch.stack([first[0, 0], first[1, 0], second[0, 0]]).mean(0)
    torch.testing.assert_close(pool_vision_features([first, second], "cls"), expected_cls)
    # a (patches, d) tensor is one tile
    torch.testing.assert_close(pool_vision_features([first[0]], "cls"), first[0, 0])
    assert pool_vision_features([first.to(torch.bfloat16)], "mean").dtype == torch.float32


@pytest.mark.parametrize(
    "features, how, message",
    [
        ([torch.zeros(2, 4)], "median", "unknown vision pooling 'median'"),
        ([], "mean", "at least one image"),
        ([torch.zeros(2, 4), torch.zeros(2, 5)], "mean", "share their last dimension"),
        ([torch.zeros(0, 4)], "mean", "contain no tokens"),
    ],
)
def test_pool_vision_features_rejects_bad_input(features, how, message):
    with pytest.raises(SdrtError, match=message):
        pool_vision_features(features, how)


# -- positions ----------------------------------------------------------------------------------


def test_positions_first_and_last_with_right_and_left_padding():
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1, 1],  # full
            [1, 1, 1, 1, 1, 1, 0, 0],  # right-padded, 6 real
            [0, 0, 0, 1, 1, 1, 1, 1],  # left-padded, 5 real
        ]
    )
    got = intervention_positions(mask, pos=2)
    assert got.dtype == torch.bool
    assert got.tolist() == [
        [True, True, False, False, False, False, True, True],
        [True, True, False, False, True, True, False, False],
        [False, False, False, True, True, False, True, True],
    ]


def test_positions_short_prompt_is_the_union_each_position_once():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    got = intervention_positions(mask, pos=2)  # 3 real < 2*pos: all three, once each
    assert got.tolist() == [[False, True, True, True, False], [True, False, False, False, False], [False] * 5]
    assert intervention_positions(mask, pos=10).sum().item() == 4
    assert intervention_positions(mask, pos=0).sum().item() == 0


def test_positions_reject_bad_arguments():
    with pytest.raises(SdrtError, match="2-D"):
        intervention_positions(torch.ones(5, dtype=torch.long), 2)
    with pytest.raises(SdrtError, match="non-negative integer"):
        intervention_positions(torch.ones(1, 5, dtype=torch.long), -1)


# -- config and registry ------------------------------------------------------------------------


def test_registry_has_builtin_adapters_and_rejects_non_interventions():
    names = adapter_registry().names()
    assert {"reft", "loreft", "lora"} <= set(names)
    assert intervention_class("reft") is ReftIntervention
    with pytest.raises(SdrtError, match="'lora' is not an intervention kind"):
        intervention_class("lora")
    with pytest.raises(UnknownNameError, match="Did you mean 'reft'"):
        InterventionAdapter(AdapterConfig(kind="reff", rank=2, layers=[1], pos=2, hidden_size=HIDDEN))


@pytest.mark.parametrize(
    "change, field",
    [
        ({"rank": 0}, "rank"),
        ({"layers": []}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"pos": 0}, "pos"),
        ({"skip": True}, "vision_dim"),
        ({"init_std": -1.0}, "init_std"),
        ({"hidden_size": "64"}, "hidden_size"),
    ],
)
def test_config_rejects_bad_fields_naming_them(change, field):
    base = dict(kind="reft", rank=2, layers=[1], pos=2, hidden_size=HIDDEN)
    base.update(change)
    with pytest.raises(SdrtError, match=f"field '{field}'"):
        AdapterConfig(**base)


class ScaleIntervention(Intervention):
    """A third-party intervention kind: h + s·h with one learned scalar."""

    def __init__(self, hidden_size, rank, init_std=None):
        super().__init__(hidden_size, rank, init_std)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def delta(self, h):
        return self.scale * h


class ScalePlugin:
    @staticmethod
    @hookimpl
    def register_adapters(register):
        register("scale-test", ScaleIntervention)


def test_third_party_intervention_kind_builds_and_round_trips(plugin, tmp_path):
    plugin(ScalePlugin, "scale-plugin")
    adapter = InterventionAdapter(AdapterConfig(kind="scale-test", rank=1, layers=[0, 2], pos=1, hidden_size=8))
    h = torch.randn(3, 8)
    torch.testing.assert_close(adapter.delta(2, h), 0.5 * h)
    save_adapter(tmp_path, adapter)
    assert isinstance(load_adapter(tmp_path).interventions["2"], ScaleIntervention)


# -- hooks on a real tiny Mistral ---------------------------------------------------------------


def reft_adapter(layers, rank=4, pos=2, skip=False, vision_dim=None, seed=0, kind="reft"):
    config = AdapterConfig(kind=kind, rank=rank, layers=layers, pos=pos, hidden_size=HIDDEN, skip=skip, vision_dim=vision_dim)
    torch.manual_seed(seed)
    return InterventionAdapter(config)


def test_fresh_adapter_leaves_the_model_exactly_unchanged(tiny_mistral):
    ids, attention = make_inputs()
    base = tiny_mistral(input_ids=ids, attention_mask=attention).logits
    adapter = reft_adapter([1, 2, 3])
    with attach(layers_of(tiny_mistral), adapter) as handle:
        handle.set_inputs(mask=intervention_positions(attention, 2))
        out = tiny_mistral(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(out, base)


def test_only_the_selected_positions_change(tiny_mistral):
    ids, attention = make_inputs()
    mask = intervention_positions(attention, 2)
    layers = layers_of(tiny_mistral)
    with attach(layers, [], capture=[2]) as plain:
        plain.set_inputs(mask=None)
        tiny_mistral(input_ids=ids, attention_mask=attention)
        h = plain.captured[2]
    adapter = randomise(reft_adapter([2]))
    with attach(layers, adapter, capture=[2]) as handle:
        handle.set_inputs(mask=mask)
        tiny_mistral(input_ids=ids, attention_mask=attention)
        hat = handle.captured[2]
    assert torch.equal(hat[~mask], h[~mask])  # untouched exactly
    torch.testing.assert_close(hat[mask], h[mask] + adapter.delta(2, h[mask]))
    assert not torch.allclose(hat[mask], h[mask])


def test_no_mask_or_empty_mask_leaves_forward_untouched(tiny_mistral):
    ids, attention = make_inputs()
    base = tiny_mistral(input_ids=ids, attention_mask=attention).logits
    adapter = randomise(reft_adapter([3]))
    with attach(layers_of(tiny_mistral), adapter) as handle:
        handle.set_inputs(mask=None)
        assert torch.equal(tiny_mistral(input_ids=ids, attention_mask=attention).logits, base)
        handle.set_inputs(mask=torch.zeros_like(attention, dtype=torch.bool))
        assert torch.equal(tiny_mistral(input_ids=ids, attention_mask=attention).logits, base)
        handle.set_inputs(mask=intervention_positions(attention, 1))
        assert not torch.allclose(tiny_mistral(input_ids=ids, attention_mask=attention).logits, base)
        handle.clear()
        assert torch.equal(tiny_mistral(input_ids=ids, attention_mask=attention).logits, base)


def test_ensemble_update_is_weighted_sum_of_deltas(tiny_mistral):
    ids, attention = make_inputs()
    mask = intervention_positions(attention, 2)
    layers = layers_of(tiny_mistral)
    with attach(layers, [], capture=[3]) as plain:
        plain.set_inputs(mask=None)
        tiny_mistral(input_ids=ids, attention_mask=attention)
        h = plain.captured[3]
    first, second = randomise(reft_adapter([3]), 1), randomise(reft_adapter([2, 3]), 2)
    # only layer 3 is compared, so the second adapter's layer-2 part is switched off (B = 0)
    with torch.no_grad():
        second.interventions["2"].up.weight.zero_()
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    with attach(layers, [first, second], weights=weights, capture=[3]) as handle:
        handle.set_inputs(mask=mask)
        tiny_mistral(input_ids=ids, attention_mask=attention)
        hat = handle.captured[3]
    rows, cols = mask.nonzero(as_tuple=True)
    sel = h[rows, cols]
    expected = sel + weights[rows, 0, None] * first.delta(3, sel) + weights[rows, 1, None] * second.delta(3, sel)
    torch.testing.assert_close(hat[rows, cols], expected)
    assert torch.equal(hat[~mask], h[~mask])


def test_decode_step_on_the_cache_sees_the_prompt_edit(tiny_mistral):
    ids, attention = make_inputs(batch=1)
    mask = intervention_positions(attention, 2)
    next_token = torch.tensor([[42]])
    adapter = randomise(reft_adapter([1, 3]))
    with attach(layers_of(tiny_mistral), adapter) as handle:
        # one forward over prompt + token, the new position not intervened
        handle.set_inputs(mask=torch.cat([mask, torch.zeros(1, 1, dtype=torch.bool)], dim=1))
        full = tiny_mistral(input_ids=torch.cat([ids, next_token], dim=1)).logits[:, -1]
        # prefill with the mask, then a decode step with none: the edit arrives through the cache
        handle.set_inputs(mask=mask)
        prefill = tiny_mistral(input_ids=ids, use_cache=True)
        handle.set_inputs(mask=None)
        step = tiny_mistral(input_ids=next_token, cache=prefill.cache).logits[:, -1]
    plain = tiny_mistral(input_ids=torch.cat([ids, next_token], dim=1)).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(step, plain, atol=1e-4)


def test_single_adapter_without_weights_equals_weight_one(tiny_mistral):
    ids, attention = make_inputs()
    mask = intervention_positions(attention, 2)
    adapter = randomise(reft_adapter([1, 3]))
    outs = []
    for weights in (None, torch.ones(2, 1)):
        with attach(layers_of(tiny_mistral), adapter, weights=weights) as handle:
            handle.set_inputs(mask=mask)
            outs.append(tiny_mistral(input_ids=ids, attention_mask=attention).logits)
    torch.testing.assert_close(outs[0], outs[1])


def test_hidden_state_recorder_sees_the_intervened_output(tiny_mistral):
    ids, attention = make_inputs()
    # a first forward installs transformers' hidden-state recorder hooks before ours
    plain = tiny_mistral(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[2]
    adapter = randomise(reft_adapter([1]))
    with attach(layers_of(tiny_mistral), adapter, capture=[1]) as handle:
        handle.set_inputs(mask=intervention_positions(attention, 2))
        out = tiny_mistral(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        assert torch.equal(out.hidden_states[2], handle.captured[1])  # layer 1's output, intervened
    assert not torch.allclose(out.hidden_states[2], plain)


def test_gradients_reach_adapter_only(tiny_mistral):
    ids, attention = make_inputs()
    adapter = reft_adapter([2, 3], skip=True, vision_dim=6)
    vision = torch.randn(2, 6)
    with attach(layers_of(tiny_mistral), adapter) as handle:
        handle.set_inputs(mask=intervention_positions(attention, 2), vision=vision)
        logits = tiny_mistral(input_ids=ids, attention_mask=attention).logits
    logits.float().pow(2).mean().backward()
    # B (zero-init) and the skip's R (zero-init) get gradients first; A, W, A_u only once those move
    assert adapter.interventions["3"].up.weight.grad.abs().sum() > 0
    assert adapter.skips["3"].restore.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_mistral.parameters())


def test_skip_connection_uses_each_rows_vision_vector(tiny_mistral):
    ids, attention = make_inputs()
    ids[1] = ids[0]
    attention[1] = 1  # two identical rows ...
    mask = intervention_positions(attention, 2)
    adapter = randomise(reft_adapter([3], skip=True, vision_dim=6))
    with torch.no_grad():
        adapter.interventions["3"].up.weight.zero_()  # isolate the skip part
    vision = torch.randn(2, 6)
    with attach(layers_of(tiny_mistral), adapter) as handle:
        handle.set_inputs(mask=mask, vision=vision)
        different = tiny_mistral(input_ids=ids, attention_mask=attention).logits
        handle.set_inputs(mask=mask, vision=vision[:1].repeat(2, 1))
        same = tiny_mistral(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(same[0], same[1])  # ... stay identical with the same u
    assert not torch.allclose(different[0], different[1])  # ... and differ with different u
    torch.testing.assert_close(different[0], same[0])


def test_hooks_are_removed_even_when_the_block_raises(tiny_mistral):
    ids, attention = make_inputs()
    base = tiny_mistral(input_ids=ids, attention_mask=attention).logits
    layers = layers_of(tiny_mistral)
    before = [len(layer._forward_hooks) for layer in layers]
    adapter = randomise(reft_adapter([0, 3]))
    with pytest.raises(RuntimeError, match="boom"):
        with attach(layers, adapter) as handle:
            handle.set_inputs(mask=intervention_positions(attention, 2))
            assert [len(layer._forward_hooks) for layer in layers] != before
            raise RuntimeError("boom")
    assert [len(layer._forward_hooks) for layer in layers] == before
    assert torch.equal(tiny_mistral(input_ids=ids, attention_mask=attention).logits, base)


class TupleLayer(nn.Module):
    """A decoder layer in the older transformers style: returns (hidden, attention weights)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, h):
        return (self.linear(h), torch.ones(1))


def test_tuple_layer_output_is_handled():
    torch.manual_seed(0)
    layers = nn.ModuleList([TupleLayer(), TupleLayer()])
    adapter = randomise(InterventionAdapter(AdapterConfig(kind="reft", rank=2, layers=[1], pos=1, hidden_size=8)))
    x = torch.randn(2, 4, 8)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[:, 0] = True
    plain, extra = layers[1](x)
    with attach(layers, adapter) as handle:
        handle.set_inputs(mask=mask)
        out = layers[1](x)
    assert isinstance(out, tuple) and len(out) == 2 and torch.equal(out[1], extra)
    torch.testing.assert_close(out[0][:, 0], plain[:, 0] + adapter.delta(1, plain[:, 0]))
    assert torch.equal(out[0][:, 1:], plain[:, 1:])


def test_bfloat16_backbone_output_keeps_its_dtype():
    layers = nn.ModuleList([nn.Linear(8, 8).to(torch.bfloat16)])
    adapter = randomise(InterventionAdapter(AdapterConfig(kind="reft", rank=2, layers=[0], pos=1, hidden_size=8)))
    x = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    with attach(layers, adapter) as handle:
        handle.set_inputs(mask=torch.ones(1, 3, dtype=torch.bool))
        out = layers[0](x)
    assert out.dtype == torch.bfloat16


def test_attach_rejects_bad_inputs(tiny_mistral):
    ids, attention = make_inputs()
    layers = layers_of(tiny_mistral)
    with pytest.raises(SdrtError, match="at least one adapter or one layer to capture"):
        with attach(layers, []):
            pass
    with pytest.raises(SdrtError, match=r"layer 7 is out of range: the backbone has 4 decoder layers"):
        with attach(layers, reft_adapter([7])):
            pass
    with attach(layers, reft_adapter([3])) as handle:
        handle.set_inputs(mask=torch.ones(2, 4, dtype=torch.bool))  # stale mask from another prompt
        with pytest.raises(SdrtError, match=r"mask has shape \(2, 4\) but decoder layer 3 saw"):
            tiny_mistral(input_ids=ids, attention_mask=attention)
        with pytest.raises(SdrtError, match="bool tensor"):
            handle.set_inputs(mask=attention)
    with attach(layers, [reft_adapter([3]), reft_adapter([3])]) as handle:
        with pytest.raises(SdrtError, match=r"weights must have shape \[2, 2\]"):
            handle.set_inputs(mask=intervention_positions(attention, 1), weights=torch.ones(2, 3))
    with attach(layers, reft_adapter([3], skip=True, vision_dim=6)) as handle:
        with pytest.raises(SdrtError, match="needs vision"):
            handle.set_inputs(mask=intervention_positions(attention, 1))
        with pytest.raises(SdrtError, match="width 5 but the adapters expect"):
            handle.set_inputs(mask=intervention_positions(attention, 1), vision=torch.zeros(2, 5))


# -- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reft", "loreft"])
def test_checkpoint_round_trip(tmp_path, kind):
    adapter = randomise(reft_adapter([1, 3], kind=kind, skip=True, vision_dim=6))
    extra = {"backbone": {"name": "llava-next-tiny", "config_hash": "abc"}, "prompt_id": "extract-1"}
    save_adapter(tmp_path / "a", adapter, extra)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ADAPTER_JSON, ADAPTER_TENSORS]
    document = json.loads((tmp_path / "a" / ADAPTER_JSON).read_text())
    assert document["config"]["kind"] == kind and document["extra"] == extra
    loaded = load_adapter(tmp_path / "a", device="cpu", expected={"prompt_id": "extract-1", "hidden_size": HIDDEN})
    assert loaded.config == adapter.config
    h, u = torch.randn(5, HIDDEN), torch.randn(5, 6)
    assert torch.equal(loaded.delta(3, h, u), adapter.delta(3, h, u))
    for name, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_checkpoint_keeps_bfloat16(tmp_path):
    adapter = randomise(reft_adapter([2])).to(torch.bfloat16)
    save_adapter(tmp_path, adapter)
    loaded = load_adapter(tmp_path)
    assert loaded.interventions["2"].down.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.interventions["2"].down.weight, adapter.interventions["2"].down.weight)


def saved(tmp_path):
    save_adapter(tmp_path, randomise(reft_adapter([1, 3])), {"prompt_id": "p1"})
    return tmp_path


def edit_json(directory, fn):
    path = directory / ADAPTER_JSON
    document = json.loads(path.read_text())
    fn(document)
    path.write_text(json.dumps(document))


def test_load_missing_files(tmp_path):
    with pytest.raises(SdrtError, match=f"{ADAPTER_JSON} does not exist"):
        load_adapter(tmp_path)
    saved(tmp_path)
    (tmp_path / ADAPTER_TENSORS).unlink()
    with pytest.raises(SdrtError, match=f"{ADAPTER_TENSORS} does not exist"):
        load_adapter(tmp_path)


def test_load_corrupt_tensors_is_caught_by_the_checksum(tmp_path):
    saved(tmp_path)
    data = bytearray((tmp_path / ADAPTER_TENSORS).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / ADAPTER_TENSORS).write_bytes(bytes(data))
    with pytest.raises(SdrtError, match="does not match field 'tensors_sha256'"):
        load_adapter(tmp_path)


def test_load_unreadable_safetensors_names_the_file(tmp_path):
    saved(tmp_path)
    (tmp_path / ADAPTER_TENSORS).write_bytes(b"not a safetensors file")
    from sdrt_cli.io import sha256_file

    edit_json(tmp_path, lambda d: d.update(tensors_sha256=sha256_file(tmp_path / ADAPTER_TENSORS)))
    with pytest.raises(SdrtError, match=f"{ADAPTER_TENSORS} cannot be read"):
        load_adapter(tmp_path)


def test_load_corrupt_json(tmp_path):
    saved(tmp_path)
    (tmp_path / ADAPTER_JSON).write_text("{not json")
    with pytest.raises(SdrtError, match=f"{ADAPTER_JSON} is not valid JSON"):
        load_adapter(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["config"].update(rank=8), r"has shape \(4, 64\) but the config .* implies \(8, 64\)"),
        (lambda d: d["config"].update(layers=[1]), "holds tensor 'interventions.3"),
        (lambda d: d["config"].update(layers=[1, 2, 3]), "lacks tensor 'interventions.2"),
        (lambda d: d["config"].pop("pos"), "config field 'pos' is missing"),
        (lambda d: d["config"].update(colour="red"), "unknown config field 'colour'"),
        (lambda d: d["config"].update(rank="four"), "field 'rank' must be a positive integer"),
        (lambda d: d.update(format="something-else"), "field 'format' is 'something-else'"),
        (lambda d: d.update(format_version=99), "field 'format_version' is 99"),
        (lambda d: d["config"].update(kind="reftt"), "Did you mean 'reft'"),
    ],
)
def test_load_config_mismatch_names_file_and_field(tmp_path, edit, message):
    saved(tmp_path)
    edit_json(tmp_path, edit)
    with pytest.raises(SdrtError, match=message) as info:
        load_adapter(tmp_path)
    assert str(tmp_path) in str(info.value) or "Did you mean" in str(info.value)


def test_load_expected_metadata_mismatch(tmp_path):
    saved(tmp_path)
    with pytest.raises(SdrtError, match=r"field 'prompt_id' is 'p1', expected 'p2'"):
        load_adapter(tmp_path, expected={"prompt_id": "p2"})
    with pytest.raises(SdrtError, match=r"field 'hidden_size' is 64, expected 4096"):
        load_adapter(tmp_path, expected={"hidden_size": 4096})
    with pytest.raises(SdrtError, match=r"field 'backbone' is missing"):
        load_adapter(tmp_path, expected={"backbone": "llava-next"})


def test_save_rejects_non_json_metadata(tmp_path):
    with pytest.raises(SdrtError, match="not JSON-serialisable"):
        save_adapter(tmp_path, reft_adapter([1]), {"when": object()})
    assert not (tmp_path / ADAPTER_JSON).exists()
