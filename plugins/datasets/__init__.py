"""Built-in datasets."""

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    pass
