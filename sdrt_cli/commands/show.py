"""``sdrt show``: explain an sdrt directory in the terminal."""

from __future__ import annotations

import json
from pathlib import Path

import typer

HELP = """Explain an sdrt directory: its kind (trace store, adapter run, ensemble, eval, ablate, demo),
its status (complete; resumable, re-run the same command; corrupt, naming the file), its key
settings, sizes and headline metrics.

[bold]--example ID[/] on a trace store prints that example's traces (id or index): each prompt's
step-1 and step-2 prompts and answers and the confidence, the most confident one marked.
[bold]--json[/] prints the same as JSON for scripts.

Example: sdrt show runs/traces/docvqa --example 12
"""


def register(app: typer.Typer) -> None:
    @app.command("show", help=HELP)
    def show_command(
        path: Path = typer.Argument(..., help="Any directory an sdrt command wrote.", show_default=False),
        example: str = typer.Option(None, "--example", help="Trace store only: print this example's traces (example id or index).", show_default=False),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    ) -> None:
        from rich.console import Console

        from sdrt_cli.errors import SdrtError
        from sdrt_cli.show import inspect, print_example, render

        summary = inspect(path)
        if example is not None:
            if summary.kind != "trace store":
                raise SdrtError(f"--example needs a trace store; {path} is a {summary.kind}")
            if summary.status != "complete":
                raise SdrtError(f"trace store {path} is {summary.status}: {summary.detail}")
            document = print_example(path, example, None if as_json else Console())
            if as_json:
                typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
            return
        if as_json:
            typer.echo(json.dumps(summary.to_json(), indent=2, ensure_ascii=False, default=str))
        else:
            Console().print(render(summary))
