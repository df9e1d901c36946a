"""The backbone contract as the core enforces it (docs/backbones.md): a validated identity, a record
of how the backbone was loaded, rebuilding from it, one cache factory, and refusals of what is not
supported."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdrt_cli import hf
from sdrt_cli.backbone import BackboneIdentity, BackboneRecord, load_backbone, load_recorded_backbone
from sdrt_cli.errors import SdrtError
from sdrt_cli.hookspecs import hookimpl
from sdrt_plugins.backbones.llava_next import LlavaNextBackbone, build_random


@pytest.fixture(scope="module")
def base():
    return build_random("tiny", seed=0, device="cpu", dtype="fp32")


class NoWeightsHash(LlavaNextBackbone):
    """What a plugin without a weights fingerprint returned: distill once compared None with None."""

    def identity(self):
        return dataclasses.replace(super().identity(), weights_hash=None)


class DictIdentity(LlavaNextBackbone):
    """A plugin that followed the old docstring's keys."""

    def identity(self):
        return {"name": "x", "model": "y", "config_hash": "c", "tokenizer_hash": "t"}


class NoClassToken(LlavaNextBackbone):
    vision_class_token = False  # as a SigLIP tower: its early states have no class token


def register_factories(plugin, base):
    def rewrap(cls):
        return lambda **_: cls(base.model, base.processor, "x", "random:tiny:seed=0", base.device, base.dtype)

    class Factories:
        @staticmethod
        @hookimpl
        def register_backbones(register):
            register("no-weights-hash", rewrap(NoWeightsHash))
            register("dict-identity", rewrap(DictIdentity))
            register("not-a-backbone", lambda **_: base.model)
            register("no-class-token", rewrap(NoClassToken))

    plugin(Factories, "contract-plugin")


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-weights-hash", "backbone 'no-weights-hash' (plugin 'contract-plugin'): identity() field 'weights_hash' is None; it must be a non-empty string"),
        ("dict-identity", "backbone 'dict-identity' (plugin 'contract-plugin'): identity() returned dict, not a sdrt_cli.backbone.BackboneIdentity"),
        ("not-a-backbone", "backbone 'not-a-backbone' (plugin 'contract-plugin'): its factory returned LlavaNextForConditionalGeneration, not a sdrt_cli.backbone.Backbone"),
    ],
)
def test_a_bad_identity_is_refused_when_the_backbone_loads(plugin, base, name, message):
    register_factories(plugin, base)
    with pytest.raises(SdrtError) as refused:
        load_backbone(name, seed=0, device="cpu", dtype="fp32")
    assert str(refused.value) == message


def test_a_bad_identity_stops_the_cli_in_one_sentence(plugin, base, cli, tmp_path):
    register_factories(plugin, base)
    out = tmp_path / "traces"
    result = cli("traces", "--backbone", "no-weights-hash", "--dataset", "synthetic-charts", "--limit", "1", "--out", out)
    assert result.exit_code == 1
    assert "backbone 'no-weights-hash' (plugin 'contract-plugin'): identity() field 'weights_hash' is None" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_the_record_keeps_identity_options_and_its_json_keeps_the_manifest_shape():
    loaded = load_backbone("llava-next-tiny", seed=3, device="cpu", dtype="fp32")
    record = loaded.record()
    assert record.name == "llava-next-tiny" and record.options == {"seed": 3}  # device/dtype are per run
    data = record.to_json()
    assert data["backbone"] == "llava-next-tiny" and data["source"] == "random:tiny:seed=3"
    assert {"config_hash", "weights_hash", "tokenizer_hash", "chat_template_hash", "num_layers", "hidden_size"} <= set(data)
    assert BackboneRecord.from_json(data, "m.json") == record

    # rebuilt from the record: the recorded seed wins over this run's
    again = load_recorded_backbone(BackboneRecord.from_json(data, "m.json"), device="cpu", dtype="fp32", seed=0)
    assert again.record().mismatch(record) is None and again.record().options == {"seed": 3}
    other = load_backbone("llava-next-tiny", seed=4, device="cpu", dtype="fp32").record()
    assert record.mismatch(other).startswith("weights_hash ")
    with pytest.raises(SdrtError, match=r"^trace store s was made with backbone 'llava-next-tiny' from 'random:tiny:seed=3', not the one in use \(weights_hash "):
        record.check_matches(other, "trace store s was made with")


@pytest.mark.parametrize(
    "source, options",
    [
        ("random:tiny:seed=7", {"seed": 7}),
        ("random:SmolLM2-135M-Instruct.Q4_1.gguf@sha256=0123456789abcdef+random-vision:seed=2", {"seed": 2}),
        ("/models/llava-v1.6-mistral-7b-hf", {"model": "/models/llava-v1.6-mistral-7b-hf"}),
    ],
)
def test_manifests_written_before_options_were_recorded_still_load(source, options):
    old = {"backbone": "llava-next", "source": source, "config_hash": "a", "weights_hash": "b", "tokenizer_hash": "c", "chat_template_hash": "d", "num_layers": 4, "hidden_size": 64}
    assert BackboneRecord.from_json(old, "old/manifest.json").options == options


def test_a_manifest_without_a_weights_hash_is_refused_naming_the_field():
    broken = {"backbone": "my-vlm", "source": "s", "config_hash": "a", "tokenizer_hash": "c", "chat_template_hash": "d"}
    with pytest.raises(SdrtError, match=r"^runs/a/manifest.json: field 'backbone.weights_hash' must be a non-empty string, got None$"):
        BackboneRecord.from_json(broken, "runs/a/manifest.json")


def test_every_cache_comes_from_the_backbone(base):
    from transformers import DynamicCache

    from sdrt_cli.generation import SlotBatch

    class OwnCache(LlavaNextBackbone):
        def new_cache(self):
            return DynamicCache()

    own = OwnCache(base.model, base.processor, "x", "y", base.device, base.dtype)
    batch = SlotBatch(own, rows=1)
    assert type(batch.cache) is DynamicCache
    batch.append([[1, 2, 3]])
    assert batch.cache.get_seq_length() == 3
    assert type(SlotBatch(base, rows=1).cache) is type(hf.growable_cache())


def test_multi_axis_positions_are_refused():
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    config = Qwen2VLTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    qwen = Qwen2VLTextModel(config)
    hidden = torch.zeros(1, 4, 32)
    with pytest.raises(SdrtError, match=r"Qwen2VLTextModel uses multi-axis rotary positions \(M-RoPE, as Qwen2-VL\), which sdrt does not support yet"):
        hf.run_decoder_layers(qwen, hidden, torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None], 0, 1)


def test_position_ids_must_be_one_per_token(base):
    hidden = torch.zeros(1, 4, base.hidden_size)
    three_axes = torch.arange(4).expand(3, 1, 4)
    with pytest.raises(SdrtError, match=r"position ids must be \[batch, tokens\] \(one position per token\), got shape \(3, 1, 4\)"):
        base.run_layers(hidden, torch.ones(1, 4, dtype=torch.long), three_axes, 0, 1)


def test_cls_pooling_needs_a_declared_class_token(base):
    from sdrt_cli.adapters import check_pooling

    check_pooling("cls", base)  # CLIP: declared
    check_pooling("mean", NoClassToken(base.model, base.processor, "x", "y", base.device, base.dtype))
    with pytest.raises(SdrtError, match=r"cls pooling reads a class token at position 0 of each image tile, and backbone 'x' declares none"):
        check_pooling("cls", NoClassToken(base.model, base.processor, "x", "y", base.device, base.dtype))


def test_identity_is_a_typed_object_with_required_fields():
    with pytest.raises(TypeError):
        BackboneIdentity(source="s", config_hash="a", tokenizer_hash="c", chat_template_hash="d")  # type: ignore[call-arg]


def test_a_random_backbone_refuses_a_checkpoint_rather_than_ignore_it():
    with pytest.raises(SdrtError, match=r"^the llava-next-tiny backbone is drawn from --seed and takes no --model \(got 'ckpt'\)"):
        load_backbone("llava-next-tiny", seed=0, device="cpu", dtype="fp32", model="ckpt")
