"""``sdrt eval``: score prompting, visual CoT, gold-answer LoRA and SDRT side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import typer

from sdrt_cli import defaults
from sdrt_cli.commands import common
from sdrt_cli.options import parse_key_values
from sdrt_cli.progress import progress_bar

HELP = """Score methods side by side with the dataset's official metric (the paper's Table 1).

Methods: [bold]prompt[/] (plain single-step prompt), [bold]cot[/] (two-step prompting with one pack
prompt, --cot-prompt; y2 is the answer), [bold]lora[/] (single step with the gold-answer LoRA of
--lora DIR, from `sdrt distill --adapter lora --loss ce`), [bold]sdrt[/] (single step with the
weighted adapter ensemble of --adapters DIR, see `sdrt ensemble`).  Give several (--method prompt
--method sdrt, or --method prompt,cot,lora,sdrt) for one comparison table.  --projector DIR loads a
trained multimodal projector (`sdrt distill --adapter projector`, MmDC's alignment) into the backbone
first: every method then runs on the aligned model (--method prompt scores the projector alone).

Writes OUT/predictions/METHOD.jsonl (prompt, raw output, parsed answer, score per example),
OUT/results.json and OUT/results.md (overall and per-category scores), OUT/run.json.  Splits with
hidden answers are not scored; OUT/submission/METHOD.json is written for the benchmark server.
Under [bold]torchrun --nproc-per-node N -m sdrt_cli eval ...[/] examples are split across ranks.
Each rank appends its predictions to OUT/partial/ as it goes: rerunning an interrupted eval with the
same options continues where it stopped (--overwrite starts again).

lora and sdrt are refused on any example their runs were trained on (the adapters, the ensemble's
predictor, the LoRA run record them in their manifests), every method on those of the projector
run the backbone loads: train on [bold]train[/], score
[bold]validation[/] (or test).  See docs/evaluation.md.

Example: sdrt eval --dataset docvqa --data-dir ~/data/docvqa --method prompt,sdrt --adapters runs/adapters/docvqa --out runs/eval/docvqa
"""


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP)
    def evaluate_command(
        ctx: typer.Context,
        method: list[str] = typer.Option([], "--method", help="prompt, cot, lora, sdrt (repeatable or comma-separated).", show_default=False),
        out: Path = typer.Option(None, "--out", help="Output directory for predictions and results.", show_default=False),
        dataset: str = common.DATASET,
        data_dir: Path = common.DATA_DIR,
        split: str = common.SPLIT,
        limit: int = common.LIMIT,
        dataset_option: list[str] = common.DATASET_OPTION,
        backbone: str = typer.Option(
            None, "--backbone", help="Registered backbone (default: the one --adapters, else --lora, was trained on; llava-next without either).", show_default=False
        ),
        model: str = common.MODEL,
        projector: Path = common.PROJECTOR,
        device: str = common.DEVICE,
        model_dtype: str = common.MODEL_DTYPE,
        pack: str = typer.Option(defaults.PACK, "--pack", help="cot: prompt pack name or path to a pack TOML."),
        cot_prompt: str = typer.Option(None, "--cot-prompt", help="cot: the pack prompt to use (default: the pack's first).", show_default=False),
        adapters: Path = typer.Option(None, "--adapters", help="sdrt: a `sdrt distill` output directory (reft/loreft).", show_default=False),
        ensemble: str = typer.Option(None, "--ensemble", help="sdrt: a saved ensemble of --adapters (default: the only one saved).", show_default=False),
        lora: Path = typer.Option(None, "--lora", help="lora: a `sdrt distill --adapter lora` output directory.", show_default=False),
        lora_adapter: str = typer.Option(None, "--lora-adapter", help="lora: which adapter of --lora (default: gold).", show_default=False),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Answer budget (cot: of step 2)."),
        max_new_tokens_step1: int = typer.Option(defaults.MAX_NEW_TOKENS_STEP1, "--max-new-tokens-step1", min=1, help="cot: budget of the analysis step."),
        temperature: float = common.TEMPERATURE,
        top_p: float = common.TOP_P,
        seed: int = common.SEED,
        batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Examples generated together. Default: 4 on a CPU, 32 on a GPU (answers do not depend on it)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier eval in --out."),
        allow_train_overlap: bool = typer.Option(
            False, "--allow-train-overlap",
            help="Debugging only: score lora/sdrt even on examples they were trained on (refused otherwise); results.md and results.json then carry a warning.",
        ),
        report: bool = common.REPORT,
        config: Path = common.CONFIG,
    ) -> None:
        from sdrt_cli.config import resolve
        from sdrt_cli.locking import run_lock

        opts = resolve(ctx)
        with run_lock(opts["out"], "eval"):
            run_eval(opts)


def parse_methods(values: list[str] | str | None) -> list[str]:
    from sdrt_cli.errors import SdrtError, did_you_mean
    from sdrt_cli.evaluate import METHOD_NAMES

    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for value in values or []:
        for part in str(value).split(","):
            name = part.strip()
            if not name:
                continue
            if name not in METHOD_NAMES:
                hint = did_you_mean(name, METHOD_NAMES)
                raise SdrtError(f"unknown method {name!r}: use {', '.join(METHOD_NAMES)}{hint}")
            if name in names:
                raise SdrtError(f"--method names {name!r} twice")
            names.append(name)
    if not names:
        raise SdrtError(f"choose what to evaluate with --method ({', '.join(METHOD_NAMES)})")
    return names


# options that do not change any prediction: a rerun may change them and still continue
NOT_PREDICTION_SETTINGS = ("out", "overwrite", "config", "batch_size", "method")


def prepare_partial(partial: Path, opts: dict[str, Any]) -> str | None:
    """Rank 0: start OUT/partial/ afresh (--overwrite) or check that the predictions an earlier,
    interrupted run left there were made with the same settings; the refusal, if any."""
    from sdrt_cli.config import describe_differences
    from sdrt_cli.io import atomic_write_text

    settings = json.loads(json.dumps({k: v for k, v in sorted(opts.items()) if k not in NOT_PREDICTION_SETTINGS}, default=str))
    recorded = partial / "settings.json"
    if opts["overwrite"]:
        shutil.rmtree(partial, ignore_errors=True)
    elif recorded.exists():
        earlier = json.loads(recorded.read_text(encoding="utf-8"))
        if earlier != settings:
            return (
                f"{partial} holds predictions of an interrupted eval with other settings ({describe_differences(earlier, settings, 'earlier')}); "
                "rerun with the same options to continue it, or use --overwrite"
            )
        return None
    atomic_write_text(recorded, json.dumps(settings, indent=2) + "\n")
    return None


def read_partial(partial: Path, method: str) -> dict[int, dict]:
    """The predictions every rank has appended for ``method``, by example index."""
    from sdrt_cli.io import read_jsonl

    return {record["index"]: record for path in sorted((partial / method).glob("r*.jsonl")) for record in read_jsonl(path)}


# options that do not change what a finished eval wrote
NOT_RESULT_SETTINGS = ("overwrite", "config", "report")


def _finished_with_the_same_options(out: Path, opts: dict[str, Any]) -> bool:
    from sdrt_cli.runinfo import RUN_INFO, jsonable

    try:
        recorded = json.loads((out / RUN_INFO).read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    mine = jsonable({k: v for k, v in opts.items() if k not in NOT_RESULT_SETTINGS})
    return {k: v for k, v in recorded.items() if k not in NOT_RESULT_SETTINGS} == mine


def _trained_backbone(opts: dict[str, Any]):
    """The backbone recorded by --adapters, else by --lora (None without either): eval loads it
    unless --backbone/--model say otherwise."""
    from sdrt_cli.distill import trained_backbone

    for run_dir in (opts["adapters"], opts["lora"]):
        if run_dir is not None:
            return trained_backbone(run_dir)
    return None


def run_eval(opts: dict[str, Any]) -> Path:
    from rich.console import Console

    from sdrt_cli import distributed
    from sdrt_cli.data import open_dataset
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.evaluate import (
        CotMethod,
        GenerationSettings,
        LoraMethod,
        PromptMethod,
        SdrtMethod,
        build_results,
        evaluate_method,
        lora_checkpoint,
        results_table,
        write_outputs,
    )
    from sdrt_cli.generation import Sampling, generation_batch_size
    from sdrt_cli.io import append_jsonl
    from sdrt_cli.overlap import check_train_overlap, eval_training_runs
    from sdrt_cli.runinfo import write_run_info

    opts["batch_size"] = generation_batch_size("eval", opts["batch_size"], opts["device"])
    # everything that can be refused is checked before the model loads or anything is written
    names = parse_methods(opts["method"])
    if opts["out"] is None:
        raise SdrtError("choose an output directory with --out")
    if "sdrt" in names and opts["adapters"] is None:
        raise SdrtError("--method sdrt needs --adapters DIR (a `sdrt distill` output with a saved `sdrt ensemble`)")
    if "lora" in names and opts["lora"] is None:
        raise SdrtError("--method lora needs --lora DIR (a `sdrt distill --adapter lora --loss ce` output)")
    out = Path(opts["out"])
    # results.json is written last: without it, predictions are what a killed run left, and are replaced
    if not opts["overwrite"] and (out / "results.json").exists():
        if not _finished_with_the_same_options(out, opts):
            raise SdrtError(f"{out} already holds the results of an eval with other options; use another --out or --overwrite")
        # the same command again (e.g. after a kill during the report): nothing to score
        if distributed.is_main():
            typer.echo(f"{out} already holds the results of this eval")
            if opts.get("report", True) and not (out / "report.html").exists():
                common.write_and_announce_report(out)
        return out
    cot = None
    if "cot" in names:
        from sdrt_cli.packs import load_pack

        pack = load_pack(opts["pack"])
        cot = CotMethod(pack, pack.get(opts["cot_prompt"]) if opts["cot_prompt"] else pack.prompts[0])
    distributed.init(opts["device"])
    dataset_options = parse_key_values(opts["dataset_option"])
    data = open_dataset(opts["dataset"], data_dir=opts["data_dir"], split=opts["split"], limit=opts["limit"], seed=opts["seed"], **dataset_options)
    recorded = _trained_backbone(opts)
    # the trained projector the backbone will load (given, or recorded by the adapters it serves)
    projector = opts["projector"] or ((recorded.options.get("projector") or {}).get("path") if recorded is not None else None)
    trained = eval_training_runs(names, adapters=opts["adapters"], ensemble=opts["ensemble"], lora=opts["lora"], projector=projector)
    overlap_warning = check_train_overlap(data, trained, opts["allow_train_overlap"])
    scorable = data.has_answers
    model = common.open_recorded_backbone(recorded, opts)
    methods = []
    for name in names:
        if name == "prompt":
            methods.append(PromptMethod())
        elif name == "cot":
            methods.append(cot)
        elif name == "lora":
            methods.append(LoraMethod(opts["lora"], lora_checkpoint(opts["lora"], model, opts["lora_adapter"])))
        else:
            from sdrt_cli.ensemble import load_ensemble

            methods.append(SdrtMethod(opts["adapters"], load_ensemble(opts["adapters"], model, opts["ensemble"])))
    settings = GenerationSettings(
        max_new_tokens=opts["max_new_tokens"],
        max_new_tokens_step1=opts["max_new_tokens_step1"],
        batch_size=opts["batch_size"],
        sampling=Sampling(temperature=opts["temperature"], top_p=opts["top_p"], seed=opts["seed"]),
    )

    # once nothing else can be refused: an earlier interrupted run's predictions, or a fresh start
    partial = out / "partial"
    problem = None
    if distributed.is_main():
        problem = prepare_partial(partial, opts)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise SdrtError(problem)
    earlier = {method.name: read_partial(partial, method.name) for method in methods}
    distributed.barrier()  # every rank has read what earlier runs left before any rank appends
    world, rank = distributed.world_size(), distributed.rank()
    share = len(range(rank, len(data), world))
    gathered: dict[str, list[dict]] = {}
    timing: dict[str, dict] = {}
    with progress_bar(f"eval ({', '.join(names)})", total=share * len(methods)) as bar:
        for method in methods:
            done = earlier[method.name]
            bar.advance(sum(1 for i in range(rank, len(data), world) if i in done))
            items = ((i, ex) for i, ex in zip(range(rank, 1 << 62, world), data.iter_shard(rank, world)) if i not in done)
            mine = partial / method.name / f"r{rank:03d}.jsonl"

            def keep(records: list[dict], mine: Path = mine) -> None:
                append_jsonl(mine, *records)  # one write and one fsync per batch

            _, clock = evaluate_method(method, model, data, items, settings, scorable, on_batch=bar.advance, on_records=keep)
            # every rank's records are on disk once its clock arrives
            parts = distributed.gather_objects(clock)
            if distributed.is_main():
                gathered[method.name] = sorted(read_partial(partial, method.name).values(), key=lambda r: r["index"])
            timing[method.name] = {
                "seconds": max(c["seconds"] for c in parts),  # ranks run in parallel: the slowest one
                "examples": sum(c["examples"] for c in parts),
                "new_tokens": sum(c["new_tokens"] for c in parts),
                "processes": len(parts),
                "resumed": len(done),  # predictions an interrupted earlier run had already made
            }
    if distributed.is_main():
        results = build_results(data, methods, gathered, timing, settings, scorable)
        if overlap_warning:
            results["warning"] = overlap_warning
        (out / "results.json").unlink(missing_ok=True)  # the finished mark goes first
        for sub in ("predictions", "submission"):  # an earlier or interrupted eval's files
            shutil.rmtree(out / sub, ignore_errors=True)
        write_run_info(out, "eval", opts, opts["seed"])  # before results.json: a finished run names its options
        write_outputs(out, data, results, gathered)
        shutil.rmtree(partial, ignore_errors=True)  # all of it is in predictions/ now
        console = Console()
        console.print(results_table(results))
        if overlap_warning:
            Console(stderr=True).print(f"[bold red]{overlap_warning}[/]", highlight=False, soft_wrap=True)
        if not scorable:
            from sdrt_cli.metrics import check_scorable

            try:
                check_scorable(data)
            except SdrtError as refusal:
                Console(stderr=True).print(f"[yellow]Not scored:[/] {refusal}", highlight=False, soft_wrap=True)
            typer.echo(f"Wrote predictions and submission files for {len(methods)} methods to {out}")
        else:
            typer.echo(f"Wrote predictions and results for {len(methods)} methods to {out}")
        if opts.get("report", True):
            common.write_and_announce_report(out)
    distributed.barrier()
    return out
