"""Built-in losses: ``mse``, ``kl`` and ``ce`` (see ``sdrt_plugins.losses.distill``)."""

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_losses(register):
    from sdrt_plugins.losses.distill import CELoss, KLLoss, MSELoss

    register("mse", MSELoss)
    register("kl", KLLoss)
    register("ce", CELoss)
