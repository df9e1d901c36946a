"""The ``sdrt`` command line: a Typer app whose subcommands live in ``sdrt_cli.commands``.

Plugins add subcommands through the ``register_commands(app)`` hook.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from sdrt_cli.errors import SdrtError

err_console = Console(stderr=True)

HELP = """Self-distillation with diverse reasoning traces (SDRT) for vision-language models.

Pipeline: [bold]traces[/] (two-step prompting, stores teacher states) → [bold]distill[/] (one adapter
per prompt) → [bold]ensemble[/] (weights over adapters) → [bold]eval[/] (methods side by side) →
[bold]ablate[/] (paper-style grids); [bold]calibrate[/] runs MmDC's loop (assess the student, write
new questions where it fails, distill again).  Every command takes [bold]--config FILE.toml[/]
(flags > config file > defaults).  Run any command under
[bold]torchrun --nproc-per-node N -m sdrt_cli COMMAND[/] to use several processes.
"""


def build_app() -> typer.Typer:
    from sdrt_cli import commands
    from sdrt_cli.plugins import get_plugin_manager

    app = typer.Typer(
        name="sdrt",
        help=HELP,
        no_args_is_help=True,
        rich_markup_mode="rich",
        add_completion=False,
        pretty_exceptions_show_locals=False,
    )
    commands.register_builtin_commands(app)
    get_plugin_manager().hook.register_commands(app=app)
    return app


def main(argv: list[str] | None = None) -> None:
    try:
        app = build_app()
        app(args=argv, prog_name="sdrt")
    except SdrtError as exc:
        # escaped: messages quote user text and token strings such as "[/INST]", never Rich markup
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        from sdrt_cli.io import is_write_error, os_error

        if not is_write_error(exc):
            raise
        err_console.print(f"[bold red]Error:[/] {os_error(exc)}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]Interrupted.[/]")
        sys.exit(130)
