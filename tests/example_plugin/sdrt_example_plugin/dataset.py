"""``example-shapes``: count the black squares in a picture (answers are exact)."""

from PIL import Image, ImageDraw

from sdrt_cli.data import Dataset, Example
from sdrt_cli.errors import SdrtError


class ShapesQA(Dataset):
    """``size`` pictures with 1..size squares (``train`` draws them higher up than ``validation``).
    ``limit`` is left to sdrt, which applies it."""

    name = "example-shapes"
    metric = "relaxed_accuracy"
    instruction = "Answer with a number."
    default_split = "validation"
    splits = ("train", "validation")

    def __init__(self, data_dir=None, split=None, limit=None, seed=0, size=6, **options):
        super().__init__(data_dir=data_dir, split=split, limit=limit, seed=seed, **options)
        if self.split not in self.splits:
            raise SdrtError(f"dataset {self.name!r} has no split {self.split!r}; splits: {', '.join(self.splits)}")
        if options:
            raise SdrtError(f"dataset {self.name!r} has no option {sorted(options)[0]!r}; its only option is size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise SdrtError(f"dataset {self.name!r}: option size must be a positive integer, not {size!r}")
        self.size = size

    def __iter__(self):
        top = 8 if self.split == "train" else 40
        for i in range(self.size):
            image = Image.new("RGB", (96, 64), "white")
            draw = ImageDraw.Draw(image)
            for k in range(i + 1):
                draw.rectangle((4 + 12 * k, top, 12 + 12 * k, top + 8), fill="black")
            yield Example(id=f"shapes/{self.split}/{i}", images=[image], question="How many squares are there?", answers=[str(i + 1)])

    def identity(self):
        return {**super().identity(), "size": self.size}
