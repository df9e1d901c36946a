"""Built-in losses."""

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_losses(register):
    pass
