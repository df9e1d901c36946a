"""``sdrt ablate``: run an ablation grid and write the paper-style tables and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from sdrt_cli.commands import common
from sdrt_cli.options import parse_sets
from sdrt_cli.stages import stage_invoker, stage_option_params

HELP = """Run an ablation grid: traces -> distill -> ensemble -> eval for every variation.

A grid (TOML) names the datasets (table columns), default options per stage, and ablations that
each vary one option of one stage.  The built-in [bold]paper[/] grid reproduces the SDRT paper's
ablations: skip connection on/off (Table 3), loss mse / kl / mse+kl (Table 4), adapter reft / lora
(Table 5) and ensemble size K = 1, 2, 4, 8 (Figure 5), with traces from [bold]train[/] and scores on
[bold]validation[/].  A grid whose eval split equals its traces split is refused unless it sets
eval.allow_train_overlap = true (debugging only; see docs/evaluation.md).

The built-in [bold]mmdc[/] grid holds MmDC's ablations of `sdrt calibrate`: the threshold tau
(Table 4) and the iterations 1-3 (Figure 4), each row one calibration scored on its held-out
calibrate.eval_split (an ablation whose stage is calibrate; see docs/ablate.md).

Every stage whose options and inputs did not change is reused (traces run once per
dataset/backbone/pack); an interrupted grid resumes where it stopped.  Results: OUT/tables/*.md,
*.csv, *.json (one table per ablation) and OUT/plots/*.png.

Example (a small run on the tiny backbone):
  sdrt ablate --grid paper --datasets synthetic-charts --set traces.backbone=llava-next-tiny
      --set traces.limit=4 --set traces.split=train --set eval.split=validation --set eval.limit=4
      --out runs/ablate
"""


def register(app: typer.Typer) -> None:
    @app.command("ablate", help=HELP)
    def ablate_command(
        ctx: typer.Context,
        grid: str = typer.Option("paper", "--grid", help="Built-in grid name or path to a grid TOML."),
        out: Path = typer.Option(None, "--out", help="Output directory (stages, tables, plots).", show_default=False),
        datasets: str = typer.Option(None, "--datasets", help="Comma-separated datasets replacing the grid's columns.", show_default=False),
        set_: list[str] = typer.Option([], "--set", help="Override a stage option: STAGE.OPTION=VALUE (repeatable)."),
        report: bool = common.REPORT,
        config: Path = common.CONFIG,
    ) -> None:
        from sdrt_cli.config import resolve
        from sdrt_cli.locking import run_lock

        opts = resolve(ctx)
        with run_lock(opts["out"], "ablate"):
            run_ablate(opts)


def run_grid(grid, overrides: dict[str, dict[str, Any]], out: Path, report: bool = True):
    """Plan and execute a grid, then (rank 0) write its tables and plots; returns (runs, results, files)."""
    from rich.console import Console

    from sdrt_cli import ablate, distributed

    option_names = {stage: set(p) for stage, p in stage_option_params().items()}
    runs = ablate.plan_runs(grid, overrides)
    console = Console(stderr=True)

    def on_stage(stage: str, key: str, seconds: float | None) -> None:
        if distributed.is_main():
            what = "reused" if seconds is None else f"ran ({seconds:.1f} s)"
            console.print(f"[dim]{what} {stage} stage {key}[/]", highlight=False)

    results = ablate.execute(runs, out, stage_invoker(report), option_names, on_stage)
    written = []
    if distributed.is_main():
        scores = {number: ablate.read_score(result.eval_dir, result.method) for number, result in results.items()}
        written = ablate.write_tables(grid, runs, scores, out)
    distributed.barrier()
    return runs, results, written


def run_ablate(opts: dict[str, Any]) -> Path:
    from rich.console import Console

    from sdrt_cli import ablate, distributed
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.runinfo import write_run_info

    if opts["out"] is None:
        raise SdrtError("choose an output directory with --out")
    out = Path(opts["out"])
    params = stage_option_params()
    grid = ablate.load_grid(opts["grid"], {stage: set(p) for stage, p in params.items()})
    if opts["datasets"]:
        grid.datasets = [d.strip() for d in opts["datasets"].split(",") if d.strip()]
    overrides = parse_sets(opts["set_"], params)
    ablate.plan_runs(grid, overrides)  # refuse a bad plan (e.g. scored on its traces split) before writing anything
    distributed.init()
    if distributed.is_main():
        write_run_info(out, "ablate", opts, None)
    _, _, written = run_grid(grid, overrides, out, opts.get("report", True))
    if distributed.is_main():
        for path in written:
            if path.suffix == ".md":
                Console().print(path.read_text())
        typer.echo(f"Tables in {out / 'tables'}; plots in {out / 'plots'}")
        if opts.get("report", True):
            common.write_and_announce_report(out)
    return out
