"""``sdrt traces``: run every two-step prompt on every example and store the teacher signal."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import typer

from sdrt_cli import defaults
from sdrt_cli.commands import common
from sdrt_cli.options import parse_key_values
from sdrt_cli.progress import progress_bar

HELP = """Run every two-step prompt of a pack on every example and store what the second step saw.

For each (example, prompt): step 1 asks the prompt's analysis question and generates y1; step 2
continues the conversation and generates the final answer y2.  The store keeps y1/y2, the step-2
decoder-layer outputs at the aligned positions (the last --pos prompt positions and each
teacher-forced y2 token) on --layers, the top-k next-token log-probs there with the tail mass,
and a confidence (mean top-token probability over y2) used as the ensemble label.

On a split with gold answers every record also keeps the teacher's answer as the dataset's official
metric reads it and its score, and (--student-baseline, on by default there) each example's plain
single-step greedy answer of the untouched model with its score: what `sdrt eval --method prompt`
answers, computed on the already-encoded image prefix.  `sdrt distill --select correct|beats-student`
and `sdrt ensemble --label correct-then-confident` read them (docs/selection.md).

Re-running the same command resumes; --overwrite discards the store.  [bold]--plan[/] prints what the
run will cost (records, rows, bytes on disk, time from a one-batch calibration) and stops; a run
refuses to start when the disk has less free space than the store may need (--no-space-check).  Under
[bold]torchrun --nproc-per-node N -m sdrt_cli traces ...[/] examples are split across ranks.

Example: sdrt traces --backbone llava-next --dataset docvqa --data-dir ~/data/docvqa --out runs/traces/docvqa
"""


def register(app: typer.Typer) -> None:
    @app.command("traces", help=HELP)
    def traces_command(
        ctx: typer.Context,
        out: Path = typer.Option(None, "--out", help="Trace store directory (created; resumed if it exists).", show_default=False),
        pack: str = typer.Option(defaults.PACK, "--pack", help="Prompt pack name or path to a pack TOML."),
        prompts: str = typer.Option(None, "--prompts", help="All prompts if omitted; K = the first K; or comma-separated prompt ids.", show_default=False),
        dataset: str = common.DATASET,
        data_dir: Path = common.DATA_DIR,
        split: str = common.SPLIT,
        limit: int = common.LIMIT,
        dataset_option: list[str] = common.DATASET_OPTION,
        backbone: str = common.BACKBONE,
        model: str = common.MODEL,
        projector: Path = common.PROJECTOR,
        device: str = common.DEVICE,
        model_dtype: str = common.MODEL_DTYPE,
        pos: int = typer.Option(defaults.POS, "--pos", min=1, help="Aligned prompt positions: the last POS positions of the step-2 prompt."),
        layers: str = typer.Option("-3,-2,-1", "--layers", help="Decoder layers whose outputs are stored (negative = from the end)."),
        top_k: int = typer.Option(20, "--top-k", min=1, help="Next-token log-probs kept per row (plus the tail mass)."),
        store_dtype: str = typer.Option("bf16", "--store-dtype", help="dtype of stored hidden states: bf16, fp16 or fp32."),
        max_new_tokens_step1: int = typer.Option(defaults.MAX_NEW_TOKENS_STEP1, "--max-new-tokens-step1", min=1, help="Generation budget of step 1 (the analysis)."),
        max_new_tokens_step2: int = typer.Option(32, "--max-new-tokens-step2", min=1, help="Generation budget of step 2 (the answer)."),
        temperature: float = common.TEMPERATURE,
        top_p: float = common.TOP_P,
        seed: int = common.SEED,
        batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Examples per batch (each brings N prompt rows). Default: 2 on a CPU, 4 on a GPU (32 rows with 8 prompts)."),
        student_baseline: bool | None = typer.Option(
            None, "--student-baseline/--no-student-baseline",
            help="Also store each example's plain single-step greedy answer and its score (what `sdrt distill --select beats-student` compares the teacher with). Default: on when the split has gold answers.",
            show_default=False,
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Discard an existing store in --out first."),
        plan: bool = typer.Option(False, "--plan", help="Print the expected records, rows, bytes on disk and time (from tracing one batch, nothing written), then stop."),
        no_space_check: bool = typer.Option(False, "--no-space-check", help="Start even if the disk of --out has less free space than the store may need."),
        config: Path = common.CONFIG,
    ) -> None:
        from sdrt_cli.config import resolve
        from sdrt_cli.locking import run_lock

        opts = resolve(ctx)
        with run_lock(opts["out"], "traces"):
            run_traces(opts)


def run_traces(opts: dict[str, Any]) -> Path:
    from sdrt_cli import distributed
    from sdrt_cli.data import open_dataset, prefetched
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.generation import Sampling, generation_batch_size
    from sdrt_cli.metrics import get_metric
    from sdrt_cli.packs import alignment_warnings, load_pack
    from sdrt_cli.runinfo import write_run_info
    from sdrt_cli.trace_store import TraceWriter, finalize
    from sdrt_cli.traces import DTYPES, TraceEngine, TraceSettings

    opts["batch_size"] = generation_batch_size("traces", opts["batch_size"], opts["device"])
    if opts["out"] is None:
        raise SdrtError("choose an output directory with --out")
    if opts["store_dtype"] not in DTYPES:
        raise SdrtError(f"--store-dtype {opts['store_dtype']!r} is not one of {', '.join(DTYPES)}")
    out = Path(opts["out"])
    distributed.init(opts["device"])
    pack = load_pack(opts["pack"])
    selected = pack.select(opts["prompts"])
    if distributed.is_main():  # before hours of tracing that distill would refuse
        for warning in alignment_warnings(pack, [p.id for p in selected]):
            typer.echo(f"Warning: {warning}", err=True)
    dataset_options = parse_key_values(opts["dataset_option"])
    data = open_dataset(opts["dataset"], data_dir=opts["data_dir"], split=opts["split"], limit=opts["limit"], seed=opts["seed"], **dataset_options)
    settings = TraceSettings(
        pos=opts["pos"],
        layers=tuple(common.parse_int_list(opts["layers"], "--layers")),
        top_k=opts["top_k"],
        dtype=opts["store_dtype"],
        max_new_tokens_step1=opts["max_new_tokens_step1"],
        max_new_tokens_step2=opts["max_new_tokens_step2"],
        sampling=Sampling(temperature=opts["temperature"], top_p=opts["top_p"], seed=opts["seed"]),
    )
    if not settings.layers:
        raise SdrtError("--layers is empty; name at least one decoder layer")
    # gold answers come from the traced split only; a split that hides them is traced unscored
    metric = get_metric(data.metric) if data.has_answers else None
    student_baseline = data.has_answers if opts.get("student_baseline") is None else bool(opts["student_baseline"])
    model = common.open_recorded_backbone(None, opts)
    engine = TraceEngine(model, data, selected, settings, metric=metric, student_baseline=student_baseline)
    identity = data.identity()
    identity.pop("limit", None)  # a larger --limit extends a store instead of conflicting with it
    if identity.get("data_dir"):
        identity["data_dir"] = str(Path(identity["data_dir"]).resolve())
    fingerprint = {
        "backbone": model.record().to_json(),
        "pack": {"name": pack.name, "version": pack.version, "content_hash": pack.content_hash, "prompts": [p.id for p in selected]},
        "dataset": {**identity, "options": dataset_options},
        "settings": settings.as_dict(len(model.decoder_layers)),
        "scoring": {"metric": data.metric if metric is not None else None, "student_baseline": student_baseline},
    }

    from sdrt_cli import trace_plan
    from sdrt_cli.trace_store import all_progress

    committed = set() if opts["overwrite"] or not (out / "progress").is_dir() else {i for e in all_progress(out) for i in e.examples}
    todo = sum(1 for i, _ in enumerate(data.ids()) if i not in committed)
    cost = trace_plan.plan(todo, len(selected), settings, model.hidden_size, opts["batch_size"], distributed.world_size())
    if opts.get("plan"):
        if distributed.is_main():
            from rich.console import Console

            first = list(itertools.islice(((i, ex) for i, ex in enumerate(data) if i not in committed), opts["batch_size"]))
            calibration = trace_plan.calibrate(engine, first) if first else None
            cost = trace_plan.plan(todo, len(selected), settings, model.hidden_size, opts["batch_size"], distributed.world_size(), calibration)
            Console().print(trace_plan.plan_table(cost, out))
        distributed.barrier()
        return out

    # rank 0 validates the directory; every rank learns the verdict, so none waits on a failed peer
    problem = None
    if distributed.is_main():
        try:
            if not opts.get("no_space_check"):
                trace_plan.check_space(out, cost.upper_bytes)
            TraceWriter(out, fingerprint, rank=0, overwrite=opts["overwrite"], is_main=True)
        except SdrtError as exc:
            problem = str(exc)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise SdrtError(problem)
    writer = TraceWriter(out, fingerprint, rank=distributed.rank(), is_main=False)
    done = writer.done_examples()

    world, rank = distributed.world_size(), distributed.rank()
    # streamed: a few batches of decoded images at a time (the next one decoded on a background thread
    # while this one runs), and none for examples already done
    shard = itertools.islice(data.references(), rank, None, world)
    pending = ((i, ref) for i, ref in zip(itertools.count(rank, world), shard) if i not in done)
    batches = iter(lambda: list(itertools.islice(pending, opts["batch_size"])), [])
    total = sum(1 for i in range(rank, len(data), world) if i not in done)
    with progress_bar(f"traces ({len(selected)} prompts)", total=total) as bar:
        for chunk in prefetched(batches, lambda batch: [(i, ref.materialise()) for i, ref in batch]):
            writer.write(engine.run(chunk))
            bar.advance(len(chunk))
    distributed.barrier()
    if distributed.is_main():
        manifest = finalize(out, {"lm_token_forwards_this_run_rank0": engine.fed_tokens})
        write_run_info(out, "traces", opts, opts["seed"])
        typer.echo(f"Wrote {manifest.num_records} trace records for {manifest.num_examples} examples to {out}")
    distributed.barrier()
    return out
