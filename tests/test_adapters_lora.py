"""The ``lora`` adapter on real tiny transformers models: placement, identity at start, checkpoints."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sdrt_cli.adapters import ADAPTER_JSON, ADAPTER_TENSORS, AdapterConfig, InterventionAdapter, save_adapter
from sdrt_cli.errors import SdrtError
from sdrt_cli.plugins import adapters as adapter_registry
from sdrt_plugins.adapters.lora import LoraAdapter, LoraSettings, apply_lora, load_lora, save_lora

# the default targets: a usual LoRA fine-tune adapts attention and MLP projections
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_mistral(seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=128,
    )
    return MistralForCausalLM(config).eval()


def tiny_llava(seed=0):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    torch.manual_seed(seed)
    text = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14)
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=999, image_grid_pinpoints=[[56, 56]])
    return LlavaNextForConditionalGeneration(config).eval()


def lora_modules(peft_model):
    found = set()
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A"):
            found.add(name)
    return found


def ids():
    return torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(3))


def test_registered_as_lora():
    assert adapter_registry().get("lora") is LoraAdapter


def test_only_the_chosen_layers_attention_and_mlp_projections_get_lora():
    model = tiny_mistral()
    peft_model = apply_lora(model, list(model.model.layers), LoraSettings(layers=[1, 3], rank=4))
    names = lora_modules(peft_model)
    layer_and_target = {(int(re.search(r"layers\.(\d+)\.", n).group(1)), n.rsplit(".", 1)[1]) for n in names}
    assert layer_and_target == {(layer, t) for layer in (1, 3) for t in PROJECTIONS}
    assert all(".self_attn." in n or ".mlp." in n for n in names)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B for 7 projections on 2 layers


def test_vision_tower_is_never_touched_on_llava_next():
    model = tiny_llava()
    layers = list(model.model.language_model.layers)
    peft_model = apply_lora(model, layers, LoraSettings(layers=[0, 1], rank=2))
    names = lora_modules(peft_model)
    assert len(names) == 2 * 7
    assert all(".language_model.layers." in n for n in names)
    assert not any("vision" in n for n in names)  # CLIP's layers 0 and 1 also have q/k/v_proj


def test_fresh_lora_leaves_outputs_unchanged():
    model = tiny_mistral()
    tokens = ids()
    with torch.no_grad():
        base = model(input_ids=tokens).logits
        peft_model = apply_lora(model, list(model.model.layers), LoraSettings(layers=[2, 3]))
        assert torch.equal(peft_model(input_ids=tokens).logits, base)


def trained_lora(seed=0):
    model = tiny_mistral(seed)
    settings = LoraSettings(layers=[2, 3], rank=4, alpha=8)
    peft_model = apply_lora(model, list(model.model.layers), settings)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.eval()  # LoRA dropout (0.05 by default) is for training only: logits compared here must be deterministic
    return model, peft_model, settings


def test_round_trip_on_a_fresh_model(tmp_path):
    model, peft_model, settings = trained_lora()
    tokens = ids()
    with torch.no_grad():
        trained = peft_model(input_ids=tokens).logits
    save_lora(tmp_path, peft_model, settings, list(model.model.layers), {"prompt_id": "p3"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_JSON, ADAPTER_TENSORS]
    document = json.loads((tmp_path / ADAPTER_JSON).read_text())
    assert document["config"]["layers"] == [2, 3] and document["extra"] == {"prompt_id": "p3"}
    assert document["layers_path"] == "model.layers"

    fresh = tiny_mistral()  # same seed: the same frozen base weights
    with torch.no_grad():
        base = fresh(input_ids=tokens).logits
    loaded = load_lora(tmp_path, fresh, list(fresh.model.layers), device="cpu")
    with torch.no_grad():
        again = loaded(input_ids=tokens).logits
    assert not torch.allclose(trained, base)
    torch.testing.assert_close(again, trained)


def test_load_errors_name_file_and_field(tmp_path):
    model, peft_model, settings = trained_lora()
    save_lora(tmp_path / "lora", peft_model, settings, list(model.model.layers))

    llava = tiny_llava()
    with pytest.raises(SdrtError, match=r"field 'layers_path' is 'model.layers' but this model's decoder layers are at 'model.language_model.layers'"):
        load_lora(tmp_path / "lora", llava, list(llava.model.language_model.layers))

    path = tmp_path / "lora" / ADAPTER_JSON
    document = json.loads(path.read_text())
    document["config"]["rank"] = 8
    path.write_text(json.dumps(document))
    fresh = tiny_mistral()
    with pytest.raises(SdrtError, match=r"adapter.safetensors: tensor .* has shape .* the config in .* implies"):
        load_lora(tmp_path / "lora", fresh, list(fresh.model.layers))

    document["config"]["rank"] = 4
    document["config"]["layers"] = [3]
    path.write_text(json.dumps(document))
    fresh = tiny_mistral()
    with pytest.raises(SdrtError, match=r"holds tensor '.*layers\.2\..*' that the config in"):
        load_lora(tmp_path / "lora", fresh, list(fresh.model.layers))

    document["config"]["dropout"] = 2
    path.write_text(json.dumps(document))
    with pytest.raises(SdrtError, match=r"field 'dropout' must be a number in \[0, 1\)"):
        load_lora(tmp_path / "lora", fresh, list(fresh.model.layers))


def test_reft_checkpoint_is_not_a_lora_checkpoint(tmp_path):
    save_adapter(tmp_path, InterventionAdapter(AdapterConfig(kind="reft", rank=2, layers=[1], pos=1, hidden_size=64)))
    model = tiny_mistral()
    with pytest.raises(SdrtError, match="field 'format' is 'sdrt-intervention-adapter', expected 'sdrt-lora-adapter'"):
        load_lora(tmp_path, model, list(model.model.layers))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[]), "field 'layers'"),
        (dict(layers=[1], rank=0), "field 'rank'"),
        (dict(layers=[1], alpha=0), "field 'alpha'"),
        (dict(layers=[1], targets=["q_proj", "a.b"]), "field 'targets'"),
    ],
)
def test_settings_reject_bad_fields(kwargs, message):
    with pytest.raises(SdrtError, match=message):
        LoraSettings(**kwargs)


def test_out_of_range_layer_and_missing_target():
    model = tiny_mistral()
    with pytest.raises(SdrtError, match="LoRA layer 9 is out of range: the backbone has 4 decoder layers"):
        apply_lora(model, list(model.model.layers), LoraSettings(layers=[9]))
    model = tiny_mistral()
    with pytest.raises(SdrtError, match=r"LoRA targets \['qkv_proj'\] match nothing in decoder layers \[1\]"):
        apply_lora(model, list(model.model.layers), LoraSettings(layers=[1], targets=["qkv_proj"]))
    model = tiny_mistral()
    with pytest.raises(SdrtError, match="LoRA target 'qkv_proj' was not found in decoder layer 1"):
        apply_lora(model, list(model.model.layers), LoraSettings(layers=[1], targets=["q_proj", "qkv_proj"]))


def test_the_lora_student_keeps_one_named_peft_adapter_per_prompt(tmp_path):
    from sdrt_cli.backbone import load_backbone
    from sdrt_cli.distill.settings import StudentSpec
    from sdrt_cli.distill.students import LoraStudent

    backbone = load_backbone("llava-next-tiny", seed=0, device="cpu", dtype="fp32")
    spec = StudentSpec(adapter="lora", layers=[2, 3], rank=2, lora_alpha=4.0, lora_dropout=0.0, lora_targets=["q_proj", "v_proj"])
    student = LoraStudent(backbone, ["a", "b"], spec, seed=5)
    assert set(student.peft_model.peft_config) == {"unit0", "unit1"}  # peft's own multi-adapter bookkeeping
    first, second = student.parameters_of(0), student.parameters_of(1)
    assert len(first) == len(second) == 2 * 2 * 2  # A and B of q and v in two layers
    assert not {id(p) for p in first} & {id(p) for p in second}
    a_first = [p for p in first if p.shape[0] == 2]
    a_second = [p for p in second if p.shape[0] == 2]
    assert not torch.equal(a_first[0], a_second[0])  # each prompt's A from its own seed
    assert all(not p.any() for p in first + second if p.shape[0] != 2)  # B = 0
    again = LoraStudent(load_backbone("llava-next-tiny", seed=0, device="cpu", dtype="fp32"), ["a", "b"], spec, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(second, again.parameters_of(1)))  # reproducible from the seed

    with torch.no_grad():
        for p in second:
            p.add_(0.5)  # unit 1 now changes the model, unit 0 does not
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        plain = load_backbone("llava-next-tiny", seed=0, device="cpu", dtype="fp32").model(input_ids=ids).logits
        with student.active(0, [], training=False):
            assert student.peft_model.active_adapters == ["unit0"]
            torch.testing.assert_close(backbone.model(input_ids=ids).logits, plain)
        with student.active(1, [], training=False):
            assert student.peft_model.active_adapters == ["unit1"]
            assert not torch.allclose(backbone.model(input_ids=ids).logits, plain)
            assert all(p.requires_grad for p in second) and not any(p.requires_grad for p in first)

    # saved per prompt in the plain LoRA format; restoring the training state restores the weights
    student.save(1, tmp_path / "b", {"prompt_id": "b"})
    fresh = load_backbone("llava-next-tiny", seed=0, device="cpu", dtype="fp32")
    reloaded = load_lora(tmp_path / "b", fresh.model, fresh.decoder_layers)
    with torch.no_grad(), student.active(1, [], training=False):
        torch.testing.assert_close(reloaded(input_ids=ids).logits, backbone.model(input_ids=ids).logits)
    again.load_state_tensors(student.state_tensors())
    assert all(torch.equal(p, q) for p, q in zip(second, again.parameters_of(1)))
