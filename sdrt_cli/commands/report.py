"""``sdrt report``: a self-contained HTML page of an eval run, a trace store or an ablate/demo run."""

from __future__ import annotations

from pathlib import Path

import typer

from sdrt_cli.progress import progress_bar

HELP = """Write one self-contained HTML page (no network needed) for a run directory.

[bold]eval[/] output: the comparison table (overall and per category, each cell linking to its
examples), then one card per example: image thumbnail (click to enlarge), question, gold answers,
each method's raw output, parsed answer and score, cot's step-1 analysis, sdrt's ensemble weights;
filters (each method right/wrong, sdrt right but another method wrong and the reverse, category)
and a search box.  [bold]trace store[/]: per example and prompt, the step-1 and step-2 prompts and
answers, the confidence, and the most confident trace (the ensemble's label).  [bold]ablate / demo[/]:
the tables and plots, linking to the stage reports.

Thumbnails are JPEG, longest side --thumb-px (0: no images), at most --image-budget-mb in all, so a
5,000-example eval stays a file a browser opens in seconds (see docs/report.md).

Example: sdrt report runs/eval/docvqa   (writes runs/eval/docvqa/report.html)
"""


def register(app: typer.Typer) -> None:
    @app.command("report", help=HELP)
    def report_command(
        run_dir: Path = typer.Argument(..., help="An eval output, a trace store, or an ablate / demo run directory.", show_default=False),
        out: Path = typer.Option(None, "--out", help="Where to write the page (default: RUN_DIR/report.html).", show_default=False),
        thumb_px: int = typer.Option(384, "--thumb-px", min=0, help="Longest side of embedded image thumbnails, in pixels (0: no images)."),
        image_budget_mb: int = typer.Option(64, "--image-budget-mb", min=0, help="Total size cap of embedded thumbnails; later images are left out."),
    ) -> None:
        from sdrt_cli.report import ReportSettings, write_report

        path = write_report(run_dir, out, ReportSettings(thumb_px=thumb_px, image_budget_bytes=image_budget_mb << 20), progress_bar)
        typer.echo(f"Wrote {path}")
