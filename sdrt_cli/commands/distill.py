"""``sdrt distill``: train one adapter per prompt on a trace store (or one LoRA on gold answers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from sdrt_cli import defaults
from sdrt_cli.commands import common
from sdrt_cli.options import parse_key_values
from sdrt_cli.progress import progress_bar

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

--adapter projector trains only the backbone's multimodal projector (vision tower and language model
frozen): MmDC's multimodal alignment, on gold answers with --loss ce or per prompt on traces.  Load
the result into the backbone of later commands with --projector DIR (recorded in their manifests).

--select chooses, per prompt, which of its traces train its adapter: all (the paper), correct (the
teacher's answer scores the dataset metric's maximum under the gold answers the store recorded),
beats-student (the teacher scores above the plain single-step student, or both are right: the
teacher adds something), or confident:T (the trace's mean top-token probability over its answer is
at least T).  correct and beats-student need a store traced on a split with answers (beats-student
also its --student-baseline); a prompt left with fewer than --min-records records is refused.  The
manifest records the rule and each prompt's kept/total count.  docs/selection.md: when to use which.

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
        adapter: str = typer.Option("reft", "--adapter", help="Registered adapter: reft, loreft, lora or projector (see `sdrt plugins`)."),
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
        select: str = typer.Option(
            "all", "--select",
            help="Which traces train each prompt's adapter: all (the paper), correct (teacher right), beats-student (teacher scores above the plain student, or both right) or confident:THRESHOLD (mean top-token probability of the answer >= THRESHOLD).",
        ),
        min_records: int = typer.Option(
            1, "--min-records", min=0,
            help="Refuse a prompt that --select leaves with fewer training records than this (0: allow an adapter that learns nothing).",
        ),
        epochs: int = typer.Option(defaults.EPOCHS, "--epochs", min=1, help="Passes over the training examples."),
        max_steps: int = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps (the schedule spans them).", show_default=False),
        batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Examples per optimizer step (global: each of W processes trains on B/W of them, so B >= W); each adapter sees all of them. Default: 4, or W when more than 4 processes run (so a node of 8 GPUs works without it); give it to get the same batches for any W."),
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
        projector: Path = common.PROJECTOR,
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
    from sdrt_cli.adapters import Intervention, WeightsAdapter
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.plugins import adapters

    value = adapters().get(name)  # unknown names fail with the known ones and a did-you-mean
    if not (isinstance(value, type) and issubclass(value, (Intervention, WeightsAdapter))):
        raise SdrtError(f"adapter {name!r} is neither an intervention kind nor a weights adapter (lora, projector), so `sdrt distill` cannot train it")


def run_distill(opts: dict[str, Any]) -> Path:
    from sdrt_cli import distributed
    from sdrt_cli.data import examples_by_index, open_dataset
    from sdrt_cli.distill import (
        Distiller,
        GoldSource,
        StudentSpec,
        TraceSource,
        TrainSettings,
        default_batch_size,
        split_train_val,
    )
    from sdrt_cli.distill.artifacts import clear_run, holds_run, is_finished
    from sdrt_cli.distill.sources import check_store_examples
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.losses import compose, parse_loss_spec
    from sdrt_cli.runinfo import write_run_info
    from sdrt_cli.selection import Selection, check_min_records, record_counts, select_records
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
    dataset_options = parse_key_values(opts["dataset_option"])
    distributed.init(opts["device"])

    store = None
    if gold:
        if opts["traces"] is not None:
            raise SdrtError("--loss ce trains on gold answers, not on traces; drop --traces")
        if not opts["dataset"]:
            raise SdrtError("--loss ce trains on gold answers: choose a dataset with --dataset")
        recorded = None
    else:
        if opts["traces"] is None:
            raise SdrtError("choose a trace store with --traces (or --loss ce to train on gold answers)")
        store = TraceStore(opts["traces"])
        recorded = store.backbone  # rebuilt with the factory options the store was made with
    prompt_ids = _select_prompts(store, opts["prompts"]) if store is not None else None
    selection = Selection.parse(opts.get("select"))
    if gold and selection.rule != "all":
        raise SdrtError(f"--select {selection.spec} chooses among traces; --loss ce trains on gold answers, so drop --select")

    backbone = common.open_recorded_backbone(recorded, opts)
    identity = backbone.record().to_json()
    count = len(backbone.decoder_layers)
    if store is not None:
        store.check_compatible(backbone.record())
        compare_layers = list(store.fingerprint["settings"]["layers"])
        layers = _resolve_layers(opts["layers"], count) if opts["layers"] is not None else sorted(compare_layers)
        pos = opts["pos"] or int(store.fingerprint["settings"]["pos"])
    else:
        compare_layers = []
        # gold answers: a full fine-tune's layers unless chosen (there is no trace store to take them from)
        layers = _resolve_layers(opts["layers"], count) if opts["layers"] is not None else list(range(count))
        pos = opts["pos"] or defaults.POS

    # the dataset: the store's own unless flags name one
    if opts["dataset"]:
        dataset = open_dataset(opts["dataset"], data_dir=opts["data_dir"], split=opts["split"], seed=opts["seed"], **dataset_options)
    else:
        recorded = store.fingerprint["dataset"]
        dataset = open_dataset(recorded["name"], data_dir=recorded.get("data_dir"), split=recorded.get("split"), seed=recorded.get("seed", 0), **dict(recorded.get("options") or {}))
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
        check_store_examples(store, dataset, examples, wanted, prompt_ids)
        # gold comes from the store (its traced split), never from the split eval scores
        kept = select_records(store, sorted(examples), prompt_ids, selection) if selection.rule != "all" else None
        source = TraceSource(store, dataset, prompt_ids, examples, kept)
        # counted on the examples that train (the Distiller's split), refused before --overwrite removes anything
        counts = record_counts(kept, prompt_ids, split_train_val(sorted(examples), settings.val_fraction)[0])
        check_min_records(counts, selection, opts["min_records"])
    else:
        source = GoldSource(dataset, examples)
        counts = None

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
    if spec.skip and spec.changes_weights:
        raise SdrtError(f"--skip is part of the intervention adapters; it does not apply to --adapter {spec.adapter}")
    if spec.changes_weights:
        from sdrt_cli.adapters import weights_adapter

        weights_adapter(spec.adapter).check_backbone(backbone)  # refused before anything is written
    from sdrt_cli.adapters import POOLINGS, check_pooling

    if spec.skip_pool not in POOLINGS:
        raise SdrtError(f"--skip-pool {spec.skip_pool!r} is not one of {', '.join(POOLINGS)}")
    if spec.skip:
        check_pooling(spec.skip_pool, backbone)

    data_identity = dataset.identity()
    data_identity.pop("limit", None)
    data_identity["options"] = dataset_options if opts["dataset"] else dict(store.fingerprint["dataset"].get("options") or {})
    run_identity: dict[str, Any] = {
        "backbone": identity,
        "dataset": data_identity,
        "examples": sorted(examples),
        "traces": {"path": str(Path(opts["traces"]).resolve()), "fingerprint": store.fingerprint} if store is not None else None,
    }
    warm = None
    if opts.get("init_from") is not None:
        if spec.changes_weights:
            raise SdrtError(f"--init-from warm-starts reft/loreft adapters; it does not apply to --adapter {spec.adapter}")
        from sdrt_cli.distill.artifacts import warm_start_adapters

        warm = warm_start_adapters(Path(opts["init_from"]), backbone, spec, prompt_ids or [])
        # part of the fingerprint: a resume continues only a run warm-started from the same adapters
        run_identity["init_from"] = {"path": str(Path(opts["init_from"]).resolve()), "sha256": {p: sha for p, (_, sha) in warm.items()}}

    # -- the output directory --------------------------------------------------------------------
    problem = None
    if distributed.is_main():
        if opts["overwrite"] and out.exists():
            clear_run(out)
        elif holds_run(out) and not opts["resume"]:
            problem = f"{out} already holds a distill run; pass --resume to continue it or --overwrite to start again"
    problem = distributed.broadcast_object(problem)
    if problem:
        raise SdrtError(problem)

    trainer = Distiller(backbone, source, spec, settings, opts["loss"], loss_options, out, run_identity)
    if warm is not None:
        for n, unit in enumerate(trainer.units):  # a checkpoint, when resuming, replaces these
            trainer.student.adapters[n].load_state_dict(warm[unit][0])
    if opts["resume"] and is_finished(out, trainer.fingerprint()):
        if distributed.is_main():
            typer.echo(f"{out} is already complete; nothing to resume")
        return out
    if distributed.is_main():
        write_run_info(out, "distill", opts, opts["seed"])

    def bar(total: int, done: int):
        return progress_bar(f"distill ({len(source.units)} adapters)", total=total, unit="steps", completed=done)

    summary = trainer.run(resume=opts["resume"], progress=bar)
    extra = {"backbone": identity}
    paths = trainer.save_adapters(extra)
    distributed.barrier()
    if distributed.is_main():
        manifest = trainer.manifest(summary, paths)
        if store is not None:
            manifest.details["selection"] = {"rule": selection.spec, "min_records": opts["min_records"], "counts": counts}
        manifest.save(out)
        typer.echo(
            f"Trained {len(source.units)} {spec.adapter} adapter(s) on {len(trainer.train_indices)} examples for {summary['steps']} steps; wrote {out}"
        )
    distributed.barrier()
    return out
