"""An external sdrt plugin, as a third party would write it: nothing but hooks and an entry point."""

from PIL import Image, ImageDraw

from sdrt_cli.data import Dataset, Example
from sdrt_cli.hookspecs import hookimpl


class ShapesQA(Dataset):
    """Count the squares in a picture."""

    name = "example-shapes"
    metric = "relaxed_accuracy"
    default_split = "validation"

    def __iter__(self):
        total = self.limit or 4
        for i in range(total):
            image = Image.new("RGB", (360, 240), "white")
            draw = ImageDraw.Draw(image)
            for k in range(i + 1):
                draw.rectangle((10 + 50 * k, 100, 50 + 50 * k, 140), fill="black")
            yield Example(id=f"shapes/{i}", images=[image], question="How many squares are there?", answers=[str(i + 1)])


def tiny_with_another_seed(**options):
    from sdrt_plugins.backbones.llava_next import build_random

    options.setdefault("seed", 7)
    backbone = build_random("tiny", **options)
    backbone.name = "example-tiny"
    return backbone


@hookimpl
def register_datasets(register):
    register("example-shapes", ShapesQA)


@hookimpl
def register_backbones(register):
    register("example-tiny", tiny_with_another_seed)
