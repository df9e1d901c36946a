"""An external sdrt plugin, as a third party writes it: hooks and an entry point (group ``sdrt``).

It registers a LLaVA-1.5 style backbone (``example-llava15-tiny``: transformers'
``LlavaForConditionalGeneration``, a CLIP vision tower and a Llama language model, one fixed-size
image tile per image) and a dataset (``example-shapes``).  Both use only sdrt's public API:
``sdrt_cli.backbone``, ``sdrt_cli.hf``, ``sdrt_cli.data`` and ``sdrt_cli.hookspecs``
(docs/backbones.md).
"""

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    from sdrt_example_plugin.backbone import build_tiny

    register("example-llava15-tiny", build_tiny)


@hookimpl
def register_datasets(register):
    from sdrt_example_plugin.dataset import ShapesQA

    register(ShapesQA.name, ShapesQA)
