"""``sdrt distill``: train one adapter per prompt on a trace store (or one LoRA on gold answers)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import typer

from sdrt_cli.commands import common

HELP = """Train one adapter per prompt so the single-step model reproduces the two-step teacher.

The student sees the plain single-step question with the teacher's answer y2 teacher-forced; adapter n
intervenes at the first and last --pos prompt positions on --layers and is trained so that the
decoder-layer outputs (mse) and next-token distributions (kl) at the aligned positions match what the
trace store recorded for prompt n.  The frozen layers below the first trained layer run once per example
and are cached (--cache-ram-gb, then --cache-disk-gb under OUT/cache; both budgets are per process, so
8 ranks use up to 8 times as much).

--loss ce with --adapter lora trains one LoRA on the gold answers of --dataset instead (no --traces):
the paper's Table 1 "Fine-tuning" baseline.  Its defaults are a usual, fair LoRA fine-tune: every
decoder layer, the attention (q, k, v, o) and MLP (gate, up, down) projections, rank 16, alpha 32,
dropout 0.05 (--layers, --lora-targets, --rank, --lora-alpha, --lora-dropout change them).  Train it
on --split train and score it on validation: `sdrt eval` refuses examples a run was trained on.

Writes OUT/manifest.json, OUT/run.json, OUT/metrics.jsonl and OUT/adapters/<prompt id>/ (safetensors +
JSON).  Checkpoints every epoch (and every --save-every steps); --resume continues exactly.  Under
[bold]torchrun --nproc-per-node N -m sdrt_cli distill ...[/] the global batch is split across ranks.

Example: sdrt distill --traces runs/traces/docvqa --out runs/adapters/docvqa --loss mse+kl --epochs 3
"""

ADAPTER_DEFAULT_RANK = {"lora": 16}


def register(app: typer.Typer) -> None:
    @app.command("distill", help=HELP)
    def distill_command(
        ctx: typer.Context,
        traces: Path = typer.Option(None, "--traces", help="Trace store written by `sdrt traces` (not with --loss ce).", show_default=False),
        out: Path = typer.Option(None, "--out", help="Output directory for adapters, metrics and checkpoints.", show_default=False),
        adapter: str = typer.Option("reft", "--adapter", help="Registered adapter: reft, loreft or lora (see `sdrt plugins`)."),
        loss: str = typer.Option("mse+kl", "--loss", help="Loss spec: names joined by '+', optional weights, e.g. mse:1+kl:0.5; ce = gold answers."),
        kl_temperature: float = typer.Option(1.0, "--kl-temperature", help="Temperature of the kl loss (scaled by T^2)."),
        mse_scale: str = typer.Option(
            "relative", "--mse-scale", help="mse per layer: relative (÷ the teacher's mean square, scale-free) or raw (the paper's Eq. 6)."
        ),
        prompts: str = typer.Option(None, "--prompts", help="All of the store's prompts if omitted; K = the first K; or comma-separated ids.", show_default=False),
        layers: str = typer.Option(None, "--layers", help="Decoder layers to adapt (negative = from the end); default: the store's layers (--loss ce: every layer).", show_default=False),
        pos: int = typer.Option(None, "--pos", min=1, help="Intervene at the first and last POS prompt positions (default: the store's pos).", show_default=False),
        rank: int = typer.Option(None, "--rank", min=1, help="Adapter rank (default 4 for interventions, 16 for lora).", show_default=False),
        init_std: float = typer.Option(None, "--init-std", help="Std of ReFT's Gaussian A (default hidden_size ** -0.5).", show_default=False),
        skip: bool = typer.Option(False, "--skip/--no-skip", help="Vision-language skip connection (Eq. 8) from an early vision layer."),
        skip_layer: int = typer.Option(None, "--skip-layer", help="Vision-encoder hidden-state index the skip reads (default: the backbone's, a quarter of the way in).", show_default=False),
        skip_pool: str = typer.Option("mean", "--skip-pool", help="Pooling of the early vision features: mean, max or cls."),
        lora_alpha: float = typer.Option(32.0, "--lora-alpha", help="LoRA alpha (scale = alpha / rank)."),
        lora_dropout: float = typer.Option(0.05, "--lora-dropout", help="LoRA dropout."),
        lora_targets: str = typer.Option(
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--lora-targets", help="LoRA: comma-separated projections of each layer to adapt."
        ),
        epochs: int = typer.Option(3, "--epochs", min=1, help="Passes over the training examples."),
        max_steps: int = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps (the schedule spans them).", show_default=False),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Examples per optimizer step (global: each of W processes trains on B/W of them, so B >= W); each adapter sees all of them. Default: 4, or W when more than 4 processes run (so a node of 8 GPUs works without it); give it to get the same batches for any W."),
        micro_batch_size: int = typer.Option(4, "--micro-batch-size", min=1, help="Sequences per forward pass (gradients accumulate)."),
        lr: float = typer.Option(2e-3, "--lr", help="AdamW peak learning rate."),
        weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
        warmup_ratio: float = typer.Option(0.1, "--warmup-ratio", help="Fraction of the steps spent warming the learning rate up linearly."),
        schedule: str = typer.Option("linear", "--schedule", help="After warmup: linear (to 0), cosine or constant."),
        max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Clip each adapter's gradient norm (0 = off)."),
        val_fraction: float = typer.Option(0.0, "--val-fraction", help="Hold out this fraction of examples (chosen by example index) for val mse/kl per epoch."),
        cache_ram_gb: float = typer.Option(8.0, "--cache-ram-gb", help="RAM for the frozen lower layers' outputs, per process: under torchrun each rank has this much (0 = off)."),
        cache_disk_gb: float = typer.Option(50.0, "--cache-disk-gb", help="Disk under OUT/cache beyond the RAM budget, per process like --cache-ram-gb (0 = off; removed at the end)."),
        save_every: int = typer.Option(0, "--save-every", min=0, help="Also checkpoint every N steps (0 = at epoch ends only)."),
        autocast: bool = typer.Option(True, "--autocast/--no-autocast", help="bf16 autocast of the trained layers on CUDA."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run checkpointed in --out (starts fresh if there is none)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Discard a previous run in --out first."),
        init_from: Path = typer.Option(
            None, "--init-from",
            help="Warm start: every adapter starts from the same prompt's adapter of an earlier reft/loreft `sdrt distill` run with the same adapter shape (`sdrt calibrate` chains its iterations so).",
            show_default=False,
        ),
        dataset: str = typer.Option(None, "--dataset", help="Dataset (gold answers for --loss ce; else overrides the store's).", show_default=False),
        data_dir: Path = common.DATA_DIR,
        split: str = common.SPLIT,
        limit: int = common.LIMIT,
        dataset_option: list[str] = common.DATASET_OPTION,
        backbone: str = typer.Option(None, "--backbone", help="Registered backbone (default: the store's; llava-next for --loss ce).", show_default=False),
        model: str = common.MODEL,
        device: str = common.DEVICE,
        model_dtype: str = common.MODEL_DTYPE,
        seed: int = common.SEED,
        config: Path = common.CONFIG,
    ) -> None:
        from sdrt_cli.config import resolve
        from sdrt_cli.locking import run_lock

        opts = resolve(ctx)
        with run_lock(opts["out"], "distill"):
            run_distill(opts)


def _resolve_layers(text: str | None, count: int, flag: str = "--layers") -> list[int]:
    from sdrt_cli.errors import SdrtError

    raw = common.parse_int_list(text, flag)
    if not raw:
        raise SdrtError(f"{flag} is empty; name at least one decoder layer")
    resolved = []
    for layer in raw:
        absolute = layer + count if layer < 0 else layer
        if not 0 <= absolute < count:
            raise SdrtError(f"{flag}: layer {layer} does not exist, the backbone has {count} decoder layers")
        resolved.append(absolute)
    if len(set(resolved)) != len(resolved):
        raise SdrtError(f"{flag} {text!r} names the same decoder layer twice")
    return sorted(resolved)


def _select_prompts(store, selection: str | None) -> list[str]:
    from sdrt_cli.errors import SdrtError

    available = store.prompt_ids
    if selection is None or not str(selection).strip():
        return available
    text = str(selection).strip()
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= len(available):
            raise SdrtError(f"trace store {store.root} has {len(available)} prompts; cannot select {count}")
        return available[:count]
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    for prompt_id in chosen:
        if prompt_id not in available:
            raise SdrtError(f"prompt {prompt_id!r} is not in trace store {store.root} (it has: {', '.join(available)})")
    if len(set(chosen)) != len(chosen):
        raise SdrtError(f"--prompts {text!r} names a prompt twice")
    return chosen


def _check_adapter(name: str) -> None:
    from sdrt_cli.adapters import Intervention
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.plugins import adapters

    value = adapters().get(name)  # unknown names fail with the known ones and a did-you-mean
    if name != "lora" and not (isinstance(value, type) and issubclass(value, Intervention)):
        raise SdrtError(f"adapter {name!r} is neither an intervention kind nor lora, so `sdrt distill` cannot train it")


def run_distill(opts: dict[str, Any]) -> Path:
    from sdrt_cli import distributed
    from sdrt_cli.data import examples_by_index
    from sdrt_cli.distill import (
        CHECKPOINTS_DIR,
        FORMAT_VERSION,
        MANIFEST,
        MANIFEST_KIND,
        Distiller,
        GoldSource,
        StudentSpec,
        TraceSource,
        TrainSettings,
        default_batch_size,
        read_latest,
        write_manifest,
    )
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.losses import compose, parse_loss_spec
    from sdrt_cli.overlap import TRAINED_ON, trained_on
    from sdrt_cli.runinfo import write_run_info
    from sdrt_cli.trace_store import TraceStore

    # -- validate everything before anything is written -----------------------------------------
    if opts["out"] is None:
        raise SdrtError("choose an output directory with --out")
    out = Path(opts["out"])
    _check_adapter(opts["adapter"])
    names = [name for name, _ in parse_loss_spec(opts["loss"])]  # unknown names: did-you-mean
    loss_options: dict[str, dict] = {}
    if "kl" in names and opts["kl_temperature"] != 1.0:
        loss_options["kl"] = {"temperature": opts["kl_temperature"]}
    if "mse" in names:  # always recorded: the default changed from raw to relative
        loss_options["mse"] = {"scale": opts["mse_scale"]}
    terms = compose(opts["loss"], loss_options)
    gold = "ce" in terms.needs
    if gold and terms.needs != {"ce"}:
        raise SdrtError(f"loss spec {opts['loss']!r} mixes ce (gold answers) with trace losses; train them in separate runs")
    settings = TrainSettings(
        epochs=opts["epochs"], max_steps=opts["max_steps"], batch_size=opts["batch_size"] or default_batch_size(distributed.world_size()), micro_batch_size=opts["micro_batch_size"],
        lr=opts["lr"], weight_decay=opts["weight_decay"], warmup_ratio=opts["warmup_ratio"], schedule=opts["schedule"],
        max_grad_norm=opts["max_grad_norm"], val_fraction=opts["val_fraction"], seed=opts["seed"], autocast=opts["autocast"],
        save_every=opts["save_every"], cache_ram_gb=opts["cache_ram_gb"], cache_disk_gb=opts["cache_disk_gb"],
    )
    settings.validate(world=distributed.world_size())
    if opts["resume"] and opts["overwrite"]:
        raise SdrtError("--resume and --overwrite contradict each other; choose one")
    dataset_options = common.parse_key_values(opts["dataset_option"])
    distributed.init(opts["device"])

    store = None
    if gold:
        if opts["traces"] is not None:
            raise SdrtError("--loss ce trains on gold answers, not on traces; drop --traces")
        if not opts["dataset"]:
            raise SdrtError("--loss ce trains on gold answers: choose a dataset with --dataset")
        backbone_name, model, backbone_seed = opts["backbone"] or "llava-next", opts["model"], opts["seed"]
    else:
        if opts["traces"] is None:
            raise SdrtError("choose a trace store with --traces (or --loss ce to train on gold answers)")
        store = TraceStore(opts["traces"])
        stored = store.fingerprint["backbone"]
        backbone_name = opts["backbone"] or stored["backbone"]
        model, backbone_seed = opts["model"], opts["seed"]
        source_name = str(stored.get("source", ""))
        if source_name.startswith("random:"):
            match = re.search(r"seed=(\d+)", source_name)
            if match and backbone_name == stored["backbone"]:
                backbone_seed = int(match.group(1))  # the random weights the store was made with
        elif model is None and opts["backbone"] in (None, stored["backbone"]):
            model = source_name or None
    prompt_ids = _select_prompts(store, opts["prompts"]) if store is not None else None

    backbone = common.open_backbone(backbone_name, model, opts["device"], opts["model_dtype"], backbone_seed)
    identity = backbone.identity()
    count = len(backbone.decoder_layers)
    if store is not None:
        store.check_compatible(identity)
        compare_layers = list(store.fingerprint["settings"]["layers"])
        layers = _resolve_layers(opts["layers"], count) if opts["layers"] is not None else sorted(compare_layers)
        pos = opts["pos"] or int(store.fingerprint["settings"]["pos"])
    else:
        compare_layers = []
        # gold answers: a full fine-tune's layers unless chosen (there is no trace store to take them from)
        layers = _resolve_layers(opts["layers"], count) if opts["layers"] is not None else list(range(count))
        pos = opts["pos"] or 5

    # the dataset: the store's own unless flags name one
    if opts["dataset"]:
        dataset = common.open_dataset(opts["dataset"], opts["data_dir"], opts["split"], None, opts["seed"], dataset_options)
    else:
        recorded = store.fingerprint["dataset"]
        dataset = common.open_dataset(recorded["name"], recorded.get("data_dir"), recorded.get("split"), None, recorded.get("seed", 0), dict(recorded.get("options") or {}))
    if store is not None:
        wanted = set(store.example_indices)
    else:
        wanted = set(range(opts["limit"])) if opts["limit"] else None
    if opts["limit"] and wanted is not None:
        wanted = {i for i in wanted if i < opts["limit"]}
    # compressed images only: an example is decoded when its lower states are computed
    examples = examples_by_index(dataset, wanted)
    if not examples:
        raise SdrtError("no examples to train on: the trace store / dataset selection is empty")
    if store is not None:
        missing = sorted(wanted - set(examples))
        if missing:
            raise SdrtError(f"trace store {store.root} has example {missing[0]} but dataset {dataset.name!r} has only {len(examples)} examples")
        for index in sorted(examples):
            for prompt_id in prompt_ids:
                try:
                    traced = store.meta(index, prompt_id)["example_id"]
                except KeyError:
                    raise SdrtError(f"trace store {store.root} has no record for example {index} and prompt {prompt_id!r}") from None
                if traced != examples.id_of(index):
                    raise SdrtError(
                        f"dataset {dataset.name!r} example {index} is {examples.id_of(index)!r} but trace store {store.root} has "
                        f"{traced!r} there; distill with the dataset the store was made from"
                    )
        source = TraceSource(store, dataset, prompt_ids, examples)
    else:
        source = GoldSource(dataset, examples)

    spec = StudentSpec(
        adapter=opts["adapter"],
        layers=layers,
        compare_layers=compare_layers,
        pos=pos,
        rank=opts["rank"] or ADAPTER_DEFAULT_RANK.get(opts["adapter"], 4),
        init_std=opts["init_std"],
        skip=opts["skip"],
        skip_layer=(opts["skip_layer"] if opts["skip_layer"] is not None else backbone.vision_feature_default_layer) if opts["skip"] else None,
        skip_pool=opts["skip_pool"],
        lora_alpha=opts["lora_alpha"],
        lora_dropout=opts["lora_dropout"],
        lora_targets=[t.strip() for t in str(opts["lora_targets"]).split(",") if t.strip()] if opts["adapter"] == "lora" else None,
    )
    if spec.skip and spec.is_lora:
        raise SdrtError("--skip is part of the intervention adapters; it does not apply to --adapter lora")
    from sdrt_cli.adapters import POOLINGS

    if spec.skip_pool not in POOLINGS:
        raise SdrtError(f"--skip-pool {spec.skip_pool!r} is not one of {', '.join(POOLINGS)}")

    data_identity = dataset.identity()
    data_identity.pop("limit", None)
    data_identity["options"] = dataset_options if opts["dataset"] else dict((store.fingerprint["dataset"].get("options") or {}))
    run_identity: dict[str, Any] = {
        "backbone": identity,
        "dataset": data_identity,
        "examples": sorted(examples),
        "traces": {"path": str(Path(opts["traces"]).resolve()), "fingerprint": store.fingerprint} if store is not None else None,
    }
    warm = None
    if opts.get("init_from") is not None:
        if spec.is_lora:
            raise SdrtError("--init-from warm-starts reft/loreft adapters; it does not apply to --adapter lora")
        warm = warm_start_adapters(Path(opts["init_from"]), backbone, spec, prompt_ids or [])
        # part of the fingerprint: a resume continues only a run warm-started from the same adapters
        run_identity["init_from"] = {"path": str(Path(opts["init_from"]).resolve()), "sha256": {p: sha for p, (_, sha) in warm.items()}}

    # -- the output directory --------------------------------------------------------------------
    problem = None
    if distributed.is_main():
        has_run = out.exists() and ((out / MANIFEST).exists() or read_latest(out) is not None)
        if opts["overwrite"] and out.exists():
            for name in (MANIFEST, "run.json", "metrics.jsonl", "adapters", CHECKPOINTS_DIR, "cache"):
                target = out / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        elif has_run and not opts["resume"]:
            problem = f"{out} already holds a distill run; pass --resume to continue it or --overwrite to start again"
    problem = distributed.broadcast_object(problem)
    if problem:
        raise SdrtError(problem)

    trainer = Distiller(backbone, source, spec, settings, opts["loss"], loss_options, out, run_identity)
    if warm is not None:
        for n, unit in enumerate(trainer.units):  # a checkpoint, when resuming, replaces these
            trainer.student.adapters[n].load_state_dict(warm[unit][0])
    if opts["resume"] and (out / MANIFEST).exists():
        finished = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if finished.get("status") == "complete" and finished.get("fingerprint") == json.loads(json.dumps(trainer.fingerprint())):
            if distributed.is_main():
                typer.echo(f"{out} is already complete; nothing to resume")
            return out
    if distributed.is_main():
        write_run_info(out, "distill", opts, opts["seed"])

    def bar(total: int, done: int):
        return common.progress_bar(f"distill ({len(source.units)} adapters)", total=total, unit="steps", completed=done)

    summary = trainer.run(resume=opts["resume"], progress=bar)
    extra = {"backbone": identity}
    paths = trainer.save_adapters(extra)
    distributed.barrier()
    if distributed.is_main():
        val = summary["val"] or {}
        per_unit_val = val.get("per_unit", {})
        manifest = {
            "kind": MANIFEST_KIND,
            "format_version": FORMAT_VERSION,
            "status": "complete",
            "mode": source.mode,
            "adapter": spec.adapter,
            "loss": {"spec": opts["loss"], "terms": [[n, w] for n, w, _ in trainer.loss.terms], "options": loss_options},
            "layers": spec.layers,
            "compare_layers": spec.compare_layers,
            "pos": spec.pos,
            "rank": spec.rank,
            "skip": {"enabled": spec.skip, "vision_layer": spec.skip_layer, "pooling": spec.skip_pool if spec.skip else None},
            "lora": {"alpha": spec.lora_alpha, "dropout": spec.lora_dropout, "targets": spec.lora_targets} if spec.is_lora else None,
            "prompts": list(source.units),
            "adapters": paths,
            "backbone": identity,
            "traces": run_identity["traces"],
            "dataset": data_identity,
            TRAINED_ON: trained_on(data_identity, (examples[i].id for i in trainer.train_indices)),
            "training": {
                **settings.to_dict(),
                "steps": summary["steps"],
                "world_size": distributed.world_size(),
                "train_examples": trainer.train_indices,
                "val_examples": trainer.val_indices,
            },
            "metrics": {u: {"train_loss": summary["train_loss"].get(u), **{f"val_{k}": v for k, v in per_unit_val.get(u, {}).items()}} for u in source.units},
            "fingerprint": trainer.fingerprint(),
        }
        write_manifest(out, manifest)
        typer.echo(
            f"Trained {len(source.units)} {spec.adapter} adapter(s) on {len(trainer.train_indices)} examples for {summary['steps']} steps; wrote {out}"
        )
    distributed.barrier()
    return out


def warm_start_adapters(run_dir: Path, backbone, spec, prompt_ids: list[str]) -> dict[str, tuple[dict, str]]:
    """Per prompt: the state of ``run_dir``'s adapter for it and that file's sha256; refuses, in one
    sentence, a run that lacks a prompt or whose adapters have another shape than ``spec``'s."""
    from sdrt_cli.ensemble import load_intervention_run
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.io import sha256_file

    manifest, pairs = load_intervention_run(run_dir, backbone)
    loaded = dict(pairs)
    wanted = {"kind": spec.adapter, "rank": spec.rank, "layers": list(spec.layers), "pos": spec.pos, "skip": spec.skip}
    found: dict[str, tuple[dict, str]] = {}
    for prompt in prompt_ids:
        if prompt not in loaded:
            raise SdrtError(f"--init-from {run_dir} has no adapter for prompt {prompt!r} (it has: {', '.join(loaded)})")
        config = loaded[prompt].config
        for field, value in wanted.items():
            have = list(getattr(config, field)) if field == "layers" else getattr(config, field)
            if have != value:
                raise SdrtError(f"--init-from {run_dir}: adapter {prompt!r} has {field} {have!r}, this run trains {value!r}; warm-start from adapters of the same shape")
        found[prompt] = (loaded[prompt].state_dict(), sha256_file(run_dir / manifest["adapters"][prompt] / "adapter.safetensors"))
    return found
