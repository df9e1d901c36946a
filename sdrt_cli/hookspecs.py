"""Plugin hook specifications.

Every hook receives a ``register`` callback; call it once per thing the plugin provides.
Built-in plugins (``sdrt_plugins``) use exactly these hooks through the ``sdrt`` entry-point group.
"""

import pluggy

hookspec = pluggy.HookspecMarker("sdrt")
hookimpl = pluggy.HookimplMarker("sdrt")


@hookspec
def register_backbones(register):
    """Register model backbones: ``register(name, factory)``, factory(**options) -> Backbone."""


@hookspec
def register_adapters(register):
    """Register adapter types: ``register(name, adapter_class)``."""


@hookspec
def register_losses(register):
    """Register distillation losses: ``register(name, loss_class)``; see ``sdrt_cli.losses`` for the contract."""


@hookspec
def register_datasets(register):
    """Register datasets: ``register(name, dataset_class)``, a subclass of ``sdrt_cli.data.Dataset``."""


@hookspec
def register_metrics(register):
    """Register answer metrics: ``register(name, metric_class)``, a subclass of ``sdrt_cli.metrics.Metric``."""


@hookspec
def register_prompt_packs(register):
    """Register prompt packs: ``register(name, path_to_toml)``."""


@hookspec
def register_commands(app):
    """Add subcommands to the Typer ``app``."""
