"""Built-in subcommands.  Each module has ``register(app)``."""

from __future__ import annotations

import importlib

import typer

BUILTIN_COMMAND_MODULES = ("plugins_cmd", "packs", "datasets", "traces", "distill", "ensemble", "evaluate", "ablate", "calibrate", "demo", "report", "show")


def register_builtin_commands(app: typer.Typer) -> None:
    for module_name in BUILTIN_COMMAND_MODULES:
        module = importlib.import_module(f"sdrt_cli.commands.{module_name}")
        module.register(app)
