"""Built-in backbones."""

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    pass
