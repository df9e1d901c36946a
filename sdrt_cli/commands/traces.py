"""`sdrt traces`."""

from __future__ import annotations

import typer

from sdrt_cli.errors import SdrtError


def register(app: typer.Typer) -> None:
    @app.command("traces")
    def traces_command(
        ctx: typer.Context,
        config: str = typer.Option(None, "--config", help="TOML run config (flags > config > defaults)."),
    ) -> None:
        """Not implemented yet."""
        raise SdrtError("`sdrt traces` is not implemented yet (issue 4)")
