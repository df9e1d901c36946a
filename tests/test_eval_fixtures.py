"""Adapter directories in the `sdrt distill` output layout with chosen (random) weights, written with
the real checkpoint functions: tests that need adapters which visibly change outputs use these."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdrt_cli.adapters import AdapterConfig, InterventionAdapter, save_adapter
from sdrt_cli.overlap import trained_on
from sdrt_cli.trace_store import TraceStore
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts


def write_intervention_run(out: Path, backbone, traces: Path, scale: float = 0.5, seed: int = 0, kind: str = "reft", pos: int = 3, skip: bool = False) -> Path:
    """OUT/manifest.json + OUT/adapters/<prompt>/ for every prompt of the store, random B (so they change outputs)."""
    store = TraceStore(traces)
    layers = list(range(len(backbone.decoder_layers)))[-3:]
    gen = torch.Generator().manual_seed(seed)
    for n, prompt_id in enumerate(store.prompt_ids):
        config = AdapterConfig(kind=kind, rank=4, layers=layers, pos=pos, hidden_size=backbone.hidden_size,
                               skip=skip, vision_dim=backbone.vision_hidden_size if skip else None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100 + n)
            adapter = InterventionAdapter(config)
        with torch.no_grad():
            for intervention in adapter.interventions.values():
                if kind == "reft":
                    intervention.up.weight.copy_(scale * torch.randn(intervention.up.weight.shape, generator=gen))
            for skip_module in adapter.skips.values():
                skip_module.restore.copy_(scale * torch.randn(skip_module.restore.shape, generator=gen))
        save_adapter(out / "adapters" / prompt_id, adapter, extra={"prompt_id": prompt_id})
    manifest = {
        "kind": "adapters",
        "format_version": 1,
        "status": "complete",
        "mode": "traces",
        "adapter": kind,
        "loss": {"spec": "mse+kl"},
        "layers": layers,
        "pos": pos,
        "skip": {"enabled": skip, "vision_layer": backbone.vision_feature_default_layer if skip else None, "pooling": "mean" if skip else None},
        "prompts": store.prompt_ids,
        "adapters": {pid: f"adapters/{pid}" for pid in store.prompt_ids},
        "backbone": backbone.record().to_json(),
        "traces": {"path": str(Path(traces).resolve()), "fingerprint": store.fingerprint},
        # what a distill run on the whole store records
        "trained_on": trained_on(store.fingerprint["dataset"], (store.meta(i, store.prompt_ids[0])["example_id"] for i in store.example_indices)),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def write_lora_run(out: Path, backbone, scale: float = 0.5, seed: int = 0) -> Path:
    """OUT/adapters/gold/ with a LoRA whose B is random (the gold-answer baseline's layout)."""
    import copy

    from sdrt_plugins.adapters.lora import LoraSettings, apply_lora, save_lora

    layers = list(range(len(backbone.decoder_layers)))[-3:]
    model = copy.deepcopy(backbone.model)
    decoder_layers = list(model.model.language_model.layers)
    peft_model = apply_lora(model, decoder_layers, LoraSettings(layers=layers, rank=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))
    save_lora(out / "adapters" / "gold", peft_model, LoraSettings(layers=layers, rank=4), decoder_layers, extra={"prompt_id": "gold"})
    manifest = {
        "kind": "adapters",
        "format_version": 1,
        "status": "complete",
        "mode": "gold",
        "adapter": "lora",
        "loss": {"spec": "ce"},
        "layers": layers,
        "prompts": ["gold"],
        "adapters": {"gold": "adapters/gold"},
        "backbone": backbone.record().to_json(),
        "traces": None,
        # what `sdrt distill --loss ce --dataset synthetic-charts --split train --limit 3` records
        "trained_on": trained_on({"name": "synthetic-charts", "split": "train"}, SyntheticCharts(split="train", limit=3).ids()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


# ---------------------------------------------------------------- shared, session-scoped fixtures

TRACE_ARGS = [
    "traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--split", "train", "--limit", "3", "--prompts", "2",
    "--pos", "3", "--max-new-tokens-step1", "6", "--max-new-tokens-step2", "5", "--store-dtype", "fp32",
]


def run_cli(*args) -> None:
    """`sdrt ARGS` in-process outside a test's capsys (for session fixtures); raises on failure."""
    from sdrt_cli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"sdrt {' '.join(map(str, args))} exited with {exc.code}") from None


@pytest.fixture(scope="session")
def tiny():
    from sdrt_cli.backbone import load_backbone

    return load_backbone("llava-next-tiny", seed=0)


@pytest.fixture(scope="session")
def traces_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("traces") / "store"
    run_cli(*TRACE_ARGS, "--out", out)
    return out


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, tiny, traces_dir):
    """Two reft adapters with random B and a trained k2 ensemble + a uniform one, saved beside them."""
    out = write_intervention_run(tmp_path_factory.mktemp("adapters") / "run", tiny, traces_dir)
    run_cli("ensemble", "--adapters", out, "--traces", traces_dir, "--steps", "50")
    run_cli("ensemble", "--adapters", out, "--uniform")
    return out


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny):
    return write_lora_run(tmp_path_factory.mktemp("lora") / "run", tiny)
