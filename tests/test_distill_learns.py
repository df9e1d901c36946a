"""It learns: distilled adapters bring held-out examples closer to the two-step teacher (MSE and KL)
than the identity adapter does, on a tiny LLaVA-NeXT.

The tiny model's LM head is scaled up (``sharp_backbone``) so that its KL values are not float noise.
Everything else is the real pipeline: traces, distill, load_adapters.
"""

from __future__ import annotations

import json

import pytest
import torch

from sdrt_cli.adapters import attach, intervention_positions
from sdrt_cli.distill import load_adapters
from sdrt_cli.plugins import register_plugin, unregister_plugin
from sdrt_cli.trace_store import TraceStore
from sdrt_cli.traces import student_turns
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts
from sdrt_plugins.losses.distill import topk_tail_kl
from sharp_backbone import SharpBackbonePlugin, sharp_tiny


def run_main(*args) -> int:
    from sdrt_cli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: avoid OpenMP oversubscription
    register_plugin(SharpBackbonePlugin(), "sharp-tiny")
    try:
        root = tmp_path_factory.mktemp("learns")
        traces = [
            "traces", "--backbone", "llava-next-tiny-sharp", "--dataset", "synthetic-charts", "--prompts", "1", "--limit", "5",
            "--max-new-tokens-step1", "4", "--max-new-tokens-step2", "4", "--pos", "3", "--store-dtype", "fp32", "--out", root / "store",
        ]
        assert run_main(*traces) == 0
        distill = [
            "distill", "--traces", root / "store", "--out", root / "adapters", "--epochs", "4", "--batch-size", "3",
            "--val-fraction", "0.4", "--lr", "5e-4", "--rank", "4",
        ]
        assert run_main(*distill) == 0
        yield root, sharp_tiny()
    finally:
        unregister_plugin("sharp-tiny")
        torch.set_num_threads(threads)


def held_out_distances(backbone, store, dataset, index, prompt_id, adapter=None):
    """MSE and KL to the teacher on one example, from one plain full forward of the student."""
    record = store.record(index, prompt_id)
    example = dataset.example(index)
    encoded = backbone.encode_images(example.images)
    prompt = backbone.tokenize(backbone.render_chat(student_turns(dataset, example)), encoded.token_counts)
    ids = prompt + record.y2_ids[:-1]
    rows = record.hidden.shape[0]
    layers = store.fingerprint["settings"]["layers"]
    prompt_mask = torch.zeros((1, len(ids)), dtype=torch.long)
    prompt_mask[0, : len(prompt)] = 1
    with torch.no_grad(), attach(backbone.decoder_layers, [adapter] if adapter else [], capture=layers) as handle:
        if adapter is not None:
            handle.set_inputs(intervention_positions(prompt_mask, adapter.config.pos))
        out = backbone.lm_forward(
            backbone.embed(torch.tensor([ids]), [torch.cat(encoded.features)]), torch.ones((1, len(ids)), dtype=torch.long), torch.arange(len(ids))[None]
        )
        hidden = torch.stack([handle.captured[layer][0, -rows:] for layer in layers], dim=1)
        logits = backbone.lm_logits(out.last_hidden[0, -rows:])
    # the default relative mse: each layer's error over the teacher's mean square, summed over layers
    mse = float(((hidden - record.hidden).pow(2).mean(dim=(0, 2)) / record.hidden.pow(2).mean(dim=(0, 2))).sum())
    kl = float(topk_tail_kl(logits, record.topk_ids.long(), record.topk_logprobs, 1.0, record.tail_mass).mean())
    return mse, kl


@pytest.mark.slow
def test_distilled_adapters_beat_the_identity_on_held_out_examples(trained):
    root, backbone = trained
    lines = [json.loads(line) for line in (root / "adapters" / "metrics.jsonl").read_text().splitlines()]
    val = [line for line in lines if line["kind"] == "val"]
    assert [v["epoch"] for v in val] == [0, 1, 2, 3, 4]
    identity, final = val[0], val[-1]  # epoch 0 = fresh adapters = the identity
    assert final["val_mse"] < identity["val_mse"]
    assert final["val_kl"] < 0.9 * identity["val_kl"]

    # the same verdict from the saved adapters on the plain full-model forward path (no cache)
    store = TraceStore(root / "store")
    manifest, pairs = load_adapters(root / "adapters", backbone)
    dataset = SyntheticCharts(split="validation", limit=5)
    held_out = manifest["training"]["val_examples"]
    assert len(held_out) == 2 and not set(held_out) & set(manifest["training"]["train_examples"])
    (prompt_id, adapter), = pairs
    before = [held_out_distances(backbone, store, dataset, i, prompt_id) for i in held_out]
    after = [held_out_distances(backbone, store, dataset, i, prompt_id, adapter) for i in held_out]
    mean = lambda pairs, k: sum(p[k] for p in pairs) / len(pairs)  # noqa: E731
    assert mean(before, 0) == pytest.approx(identity["val_mse"], rel=1e-3)
    assert mean(before, 1) == pytest.approx(identity["val_kl"], rel=1e-3)
    assert mean(after, 0) == pytest.approx(final["val_mse"], rel=1e-3)
    assert mean(after, 1) == pytest.approx(final["val_kl"], rel=1e-3)
    assert mean(after, 0) < mean(before, 0) and mean(after, 1) < mean(before, 1)
