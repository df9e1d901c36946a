"""Built-in adapters."""

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    pass
