"""Pipeline stages run in this process: ``sdrt STAGE`` from an option dict, as ablate, demo,
calibrate and the benchmarks chain them (so torchrun distributes each stage as usual).

The stage commands are the one definition of each stage's options, so this module reads them from
the CLI app, imported when called (the commands import this module, not the reverse)."""

from __future__ import annotations

from typing import Any, Callable


def stage_option_params() -> dict[str, dict[str, Any]]:
    """Each stage command's click parameters by option name (what a grid or ``--set`` may set)."""
    import typer.main

    from sdrt_cli.ablate import STAGES
    from sdrt_cli.cli import build_app

    root = typer.main.get_command(build_app())
    return {stage: {p.name: p for p in root.commands[stage].params if p.name not in ("config", "ctx")} for stage in STAGES}


def stage_invoker(report: bool = True) -> Callable[[str, dict[str, Any]], None]:
    """``invoke(stage, args)`` runs ``sdrt STAGE`` in this process with ``args`` as its options;
    ``report`` False also keeps eval stages from writing their report (outside the stage key)."""
    import typer.main

    from sdrt_cli import ablate
    from sdrt_cli.cli import build_app

    root = typer.main.get_command(build_app())
    params = stage_option_params()

    def invoke(stage: str, args: dict[str, Any]) -> None:
        if stage == "eval" and not report:
            args = {**args, "report": False}
        argv = ablate.to_argv(stage, args, params[stage])
        root.main(args=argv, prog_name="sdrt", standalone_mode=False)

    return invoke
