"""A real third-party plugin package (tests/example_plugin), pip-installed into its own directory and
used through the CLI: a LLaVA-1.5 style backbone (``LlavaForConditionalGeneration``: CLIP + Llama)
and a dataset, written against sdrt's public API only (docs/backbones.md)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).parent / "example_plugin"
BACKBONE = "example-llava15-tiny"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    # a copy: building in the source tree would leave build/ and *.egg-info beside it
    source = tmp_path_factory.mktemp("source") / "example_plugin"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )
    return target


def sdrt(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "sdrt_cli", *map(str, args)], capture_output=True, text=True, env=env)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_installed_plugin_is_listed_with_its_version_and_names(site):
    result = ok(sdrt(site, "plugins", "--json"))
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    mine = plugins["sdrt-example-plugin.example"]
    assert mine["version"] == "0.4.0"
    assert mine["registered"] == {"backbone": [BACKBONE], "dataset": ["example-shapes"]}


def test_unknown_backbone_suggests_the_plugin_one(site, tmp_path):
    result = sdrt(site, "traces", "--backbone", "example-llava15-tinny", "--dataset", "example-shapes", "--out", tmp_path / "x")
    assert result.returncode == 1
    assert f"Did you mean {BACKBONE!r}?" in result.stderr


def test_the_plugin_dataset_gets_its_options_converted(site):
    shown = ok(sdrt(site, "datasets", "show", "example-shapes", "--option", "size=3", "--limit", "10"))
    assert "shapes/validation/2" in shown.stdout and "shapes/validation/3" not in shown.stdout  # size=3 arrived as an int
    bad = sdrt(site, "datasets", "show", "example-shapes", "--option", "colour=red")
    assert bad.returncode == 1 and "has no option 'colour'" in bad.stderr


def reference_states(site, store_dir: Path, layers: list[int]):
    """Per record: the stored hidden rows and the same rows from transformers' own forward
    (``output_hidden_states``) over the step-2 prompt + teacher-forced y2, built here without sdrt's engine."""
    sys.path.insert(0, str(site))
    try:
        from sdrt_example_plugin.backbone import build_tiny
        from sdrt_example_plugin.dataset import ShapesQA
    finally:
        sys.path.remove(str(site))
    from sdrt_cli.backbone import Turn
    from sdrt_cli.trace_store import TraceStore

    store = TraceStore(store_dir)
    backbone = build_tiny(seed=store.backbone.options["seed"], device="cpu", dtype="fp32")
    examples = list(ShapesQA(split="train"))
    pairs = []
    for index in store.example_indices:
        for prompt_id in store.prompt_ids:
            record = store.record(index, prompt_id)
            turns = [Turn("user", record.step1_text, images=1), Turn("assistant", record.y1), Turn("user", record.step2_text)]
            prompt = backbone.tokenize(backbone.render_chat(turns), [backbone.tokens_per_image])
            ids = torch.tensor([prompt + record.y2_ids[:-1]])
            pixels = backbone.image_processor(examples[index].images, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                states = backbone.model(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states
            rows = record.hidden.shape[0]
            assert prompt[len(prompt) - record.prompt_rows :] == record.prompt_tail_ids
            # hidden_states[0] is the embeddings: layer l's output is hidden_states[l + 1]
            pairs.append((record.hidden, torch.stack([states[layer + 1][0, -rows:] for layer in layers], dim=1)))
    return pairs


@pytest.mark.slow
def test_plugin_backbone_runs_the_whole_pipeline_and_its_states_match_transformers(site, tmp_path):
    traces, adapters, results = tmp_path / "traces", tmp_path / "adapters", tmp_path / "eval"
    # seed 3: distill, ensemble and eval must rebuild these weights from the recorded options
    ok(sdrt(
        site, "traces", "--backbone", BACKBONE, "--seed", "3", "--dataset", "example-shapes", "--split", "train", "--limit", "3", "--prompts", "2",
        "--layers", "1,2", "--pos", "3", "--store-dtype", "fp32", "--max-new-tokens-step1", "3", "--max-new-tokens-step2", "3", "--out", traces,
    ))
    manifest = json.loads((traces / "manifest.json").read_text())
    assert manifest["num_records"] == 6
    recorded = manifest["fingerprint"]["backbone"]
    assert recorded["backbone"] == BACKBONE and recorded["options"] == {"seed": 3}
    assert recorded["num_layers"] == 4 and recorded["hidden_size"] == 64

    pairs = reference_states(site, traces, [1, 2])
    assert len(pairs) == 6
    for stored, plain in pairs:
        torch.testing.assert_close(stored, plain, rtol=1e-4, atol=1e-4)

    ok(sdrt(site, "distill", "--traces", traces, "--out", adapters, "--epochs", "1", "--batch-size", "2"))
    assert json.loads((adapters / "manifest.json").read_text())["backbone"]["options"] == {"seed": 3}
    ok(sdrt(site, "ensemble", "--adapters", adapters, "--traces", traces, "--steps", "5"))
    ok(sdrt(
        site, "eval", "--dataset", "example-shapes", "--dataset-option", "size=2", "--method", "prompt,sdrt",
        "--adapters", adapters, "--max-new-tokens", "2", "--out", results, "--no-report",
    ))
    scored = json.loads((results / "results.json").read_text())
    assert scored["examples"] == 2 and set(scored["methods"]) == {"prompt", "sdrt"}
