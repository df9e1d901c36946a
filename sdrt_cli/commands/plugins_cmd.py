"""``sdrt plugins``: what each plugin registered."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    @app.command("plugins")
    def plugins_command(
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """List installed plugins, their versions and what each registered."""
        from sdrt_cli.plugins import plugin_infos

        infos = plugin_infos()
        if as_json:
            typer.echo(json.dumps([info.__dict__ for info in infos], indent=2))
            return
        table = Table(title="sdrt plugins")
        table.add_column("plugin")
        table.add_column("version")
        table.add_column("registered")
        for info in infos:
            what = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in sorted(info.registered.items()))
            table.add_row(info.name, info.version or "-", what or "-")
        Console().print(table)
