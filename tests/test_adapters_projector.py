"""The ``projector`` adapter (MmDC's multimodal alignment) and the core's ``projector`` backbone option:
training moves only the projector, checkpoints round-trip on real safetensors files and bad ones are
refused in one sentence, an aligned backbone is recorded and never mixed with a plain one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdrt_cli.backbone import BackboneRecord, load_backbone
from sdrt_cli.errors import SdrtError
from sdrt_cli.hookspecs import hookimpl
from sdrt_plugins.adapters.projector import PROJECTOR_FORMAT, ProjectorAdapter, load_projector, save_projector
from sdrt_plugins.backbones.llava_next import LlavaNextBackbone

GOLD = ["--loss", "ce", "--adapter", "projector", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--split", "train", "--limit", "2"]
TRACES = [
    "traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--prompts", "2", "--limit", "2",
    "--max-new-tokens-step1", "2", "--max-new-tokens-step2", "3", "--pos", "3", "--store-dtype", "fp32",
]


def tiny():
    return load_backbone("llava-next-tiny", seed=0, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def gold_run(tmp_path_factory) -> Path:
    """A projector trained on gold answers through `sdrt distill` (2 examples, 1 step)."""
    from sdrt_cli.cli import main

    out = tmp_path_factory.mktemp("projector") / "gold"
    with pytest.raises(SystemExit) as done:
        main(["distill", *GOLD, "--epochs", "1", "--batch-size", "2", "--lr", "0.01", "--out", str(out)])
    assert done.value.code in (0, None)
    return out


def test_projector_training_changes_only_the_projector(tmp_path):
    from sdrt_cli.data import examples_by_index, open_dataset
    from sdrt_cli.distill import Distiller, GoldSource, StudentSpec, TrainSettings

    backbone = tiny()
    before = {name: p.detach().clone() for name, p in backbone.model.named_parameters()}
    projector_names = {f"model.multi_modal_projector.{name}" for name, _ in backbone.multimodal_projector.named_parameters()}
    dataset = open_dataset("synthetic-charts", split="train")
    source = GoldSource(dataset, examples_by_index(dataset, {0, 1}))
    spec = StudentSpec(adapter="projector", layers=list(range(len(backbone.decoder_layers))))
    identity = {"backbone": backbone.record().to_json(), "dataset": dataset.identity(), "traces": None}
    trainer = Distiller(backbone, source, spec, TrainSettings(epochs=1, batch_size=2, lr=0.01), "ce", {}, tmp_path, identity)
    summary = trainer.run()
    trainer.save_adapters({})

    assert summary["steps"] == 1
    # the model is bit-identical afterwards: vision tower, language model and its own projector
    for name, parameter in backbone.model.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert not parameter.requires_grad, name
    trained = load_file(str(tmp_path / "adapters" / "gold" / "adapter.safetensors"))
    assert {f"model.multi_modal_projector.{name}" for name in trained} == projector_names
    assert all(not torch.equal(trained[name], before[f"model.multi_modal_projector.{name}"]) for name in trained)


def test_distill_on_traces_trains_one_projector_per_prompt(cli, tmp_path):
    store = tmp_path / "store"
    assert cli(*TRACES, "--limit", "1", "--out", store).exit_code == 0
    out = tmp_path / "per-prompt"
    result = cli("distill", "--traces", store, "--adapter", "projector", "--loss", "mse+kl", "--max-steps", "1", "--batch-size", "1", "--lr", "0.01", "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter"] == "projector" and len(manifest["prompts"]) == 2
    first, second = (load_file(str(out / manifest["adapters"][p] / "adapter.safetensors")) for p in manifest["prompts"])
    assert any(not torch.equal(first[k], second[k]) for k in first)  # two different projectors


def test_a_saved_projector_round_trips_and_is_applied_then_restored(gold_run):
    directory = gold_run / "adapters" / "gold"
    document = json.loads((directory / "adapter.json").read_text())
    assert document["format"] == PROJECTOR_FORMAT and document["extra"]["prompt_id"] == "gold"
    saved = load_file(str(directory / "adapter.safetensors"))
    backbone = tiny()
    loaded = load_projector(directory, backbone)
    assert sorted(loaded) == sorted(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)

    from sdrt_cli.data import open_dataset

    images = open_dataset("synthetic-charts", split="train", limit=1).example(0).images
    plain = backbone.encode_images(images).features[0]
    with ProjectorAdapter.applied(directory, backbone):
        aligned = backbone.encode_images(images).features[0]
    assert not torch.equal(aligned, plain)
    assert torch.equal(backbone.encode_images(images).features[0], plain)  # restored after the block

    # the core's projector option: the run directory names its gold projector
    with_option = load_backbone("llava-next-tiny", seed=0, device="cpu", dtype="fp32", projector=str(gold_run))
    assert torch.equal(with_option.encode_images(images).features[0], aligned)
    recorded = with_option.record().options["projector"]
    assert recorded["path"] == str(directory.resolve()) and recorded["tensors_sha256"] == document["tensors_sha256"]
    assert BackboneRecord.from_json(with_option.record().to_json(), "m.json") == with_option.record()


def _write(directory: Path, tensors: dict, meta_change=None) -> Path:
    save_projector(directory, tensors, {"prompt_id": "gold"})
    if meta_change:
        path = directory / "adapter.json"
        document = json.loads(path.read_text())
        meta_change(document)
        path.write_text(json.dumps(document))
    return directory


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "lacks tensor 'linear_2.bias' of backbone 'llava-next-tiny''s projector"),
        ("extra", "holds tensor 'linear_3.weight', which backbone 'llava-next-tiny''s projector does not have"),
        ("shape", "tensor 'linear_1.weight' has shape (3, 3), backbone 'llava-next-tiny''s projector has"),
        ("nan", "tensor 'linear_1.bias' holds non-finite values"),
        ("format", "field 'format' is 'sdrt-lora-adapter', expected 'sdrt-projector-adapter'"),
        ("config", "field 'config.parameters' must be an object of parameter names and shapes"),
        ("replaced", "does not match field 'tensors_sha256'"),
    ],
)
def test_a_malformed_projector_checkpoint_is_refused_in_one_sentence(tmp_path, case, message):
    backbone = tiny()
    tensors = {k: p.detach().clone() for k, p in backbone.multimodal_projector.named_parameters()}
    meta_change = None
    if case == "missing":
        del tensors["linear_2.bias"]
    elif case == "extra":
        tensors["linear_3.weight"] = torch.zeros(2, 2)
    elif case == "shape":
        tensors["linear_1.weight"] = torch.zeros(3, 3)
    elif case == "nan":
        tensors["linear_1.bias"][0] = float("nan")
    elif case == "format":
        meta_change = lambda d: d.update(format="sdrt-lora-adapter")  # noqa: E731
    elif case == "config":
        meta_change = lambda d: d.update(config=[])  # noqa: E731
    directory = _write(tmp_path / "ckpt", tensors, meta_change)
    if case == "replaced":
        save_file({k: v + 1 for k, v in tensors.items()}, str(directory / "adapter.safetensors"))
    with pytest.raises(SdrtError) as refused:
        load_projector(directory, backbone)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(SdrtError, match="projector"):  # the backbone option refuses it too, before any use
        load_backbone("llava-next-tiny", seed=0, device="cpu", dtype="fp32", projector=str(directory))


class NoProjector(LlavaNextBackbone):
    """A backbone that exposes no projector (the contract's default)."""

    @property
    def multimodal_projector(self):
        return None


def test_a_backbone_without_a_projector_is_refused_naming_it(plugin, cli, tmp_path):
    class Factories:
        @staticmethod
        @hookimpl
        def register_backbones(register):
            def build(seed=0, device="auto", dtype="auto", **_):
                base = tiny()
                return NoProjector(base.model, base.processor, "no-projector", "random:tiny:seed=0", base.device, base.dtype)

            register("no-projector", build)

    plugin(Factories, "no-projector-plugin")
    out = tmp_path / "run"
    args = [a if a != "llava-next-tiny" else "no-projector" for a in GOLD]
    result = cli("distill", *args, "--out", out)
    assert result.exit_code == 1
    assert result.err.strip() == (
        "Error: backbone 'no-projector' exposes no multimodal projector (its multimodal_projector is None), "
        "so the projector adapter cannot train or load one"
    )
    assert not out.exists()


def test_stores_made_with_and_without_an_aligned_projector_are_never_mixed(cli, gold_run, tmp_path):
    plain = tiny().record()
    aligned = load_backbone("llava-next-tiny", seed=0, device="cpu", dtype="fp32", projector=str(gold_run)).record()
    assert plain.mismatch(aligned).startswith("weights_hash ")
    with pytest.raises(SdrtError, match=r"^trace store s was made with backbone 'llava-next-tiny' from 'random:tiny:seed=0', not the one in use \(weights_hash .*\+projector:"):
        plain.check_matches(aligned, "trace store s was made with")

    store = tmp_path / "plain-store"
    assert cli(*TRACES, "--limit", "1", "--prompts", "1", "--out", store).exit_code == 0
    out = tmp_path / "mixed"
    result = cli("distill", "--traces", store, "--projector", gold_run, "--max-steps", "1", "--out", out)
    assert result.exit_code == 1
    assert f"trace store {store} was made with backbone 'llava-next-tiny' from 'random:tiny:seed=0', not the one in use" in result.err
    assert "+projector:" in result.err and not out.exists()


def test_eval_scores_the_aligned_model_and_refuses_the_projectors_training_examples(cli, gold_run, tmp_path):
    base = ["eval", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--limit", "1", "--max-new-tokens", "2"]
    out = tmp_path / "train"
    result = cli(*base, "--split", "train", "--method", "prompt", "--projector", gold_run / "adapters" / "gold", "--out", out)
    assert result.exit_code == 1
    assert f"projector run {gold_run} was trained on 1 of the 1 'synthetic-charts' 'train' examples being scored" in result.err
    out = tmp_path / "validation"
    result = cli(*base, "--split", "validation", "--method", "prompt", "--projector", gold_run, "--no-report", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["config"]["projector"] == str(gold_run)


@pytest.mark.slow
def test_a_projector_run_killed_mid_training_resumes_to_the_same_projector(tmp_path):
    from fault_helpers import kill_when, lines, run

    args = ["distill", *GOLD, "--epochs", "3", "--batch-size", "1", "--save-every", "1", "--lr", "0.01"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run(*args, "--out", clean)
    assert kill_when([*args, "--out", killed], lambda: lines(killed / "metrics.jsonl") >= 3)  # past a checkpoint, before the end
    assert not (killed / "manifest.json").exists()
    run(*args, "--out", killed, "--resume")
    tensors = [load_file(str(out / "adapters" / "gold" / "adapter.safetensors")) for out in (clean, killed)]
    assert sorted(tensors[0]) == sorted(tensors[1]) and all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
