"""Built-in backbones."""

from functools import partial

from sdrt_cli.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    from sdrt_plugins.backbones import llava_next, smollm2_demo

    register("llava-next", llava_next.load_pretrained)
    register("llava-next-tiny", partial(llava_next.build_random, "tiny"))
    register("llava-next-bench", partial(llava_next.build_random, "bench"))
    register("llava-smollm2-demo", smollm2_demo.build_demo)
