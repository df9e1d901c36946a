"""Built-in adapters: the ``reft`` and ``loreft`` interventions, the ``lora`` ablation adapter and the
``projector`` adapter (MmDC's multimodal alignment)."""

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    from sdrt_plugins.adapters.lora import LoraAdapter
    from sdrt_plugins.adapters.projector import ProjectorAdapter
    from sdrt_plugins.adapters.reft import LoreftIntervention, ReftIntervention

    register("reft", ReftIntervention)
    register("loreft", LoreftIntervention)
    register("lora", LoraAdapter)
    register("projector", ProjectorAdapter)
