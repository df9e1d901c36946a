"""``synthetic-charts``: generated bar, line and pie charts with questions whose answers are known.

Every example is drawn with PIL from its own seeded random generator, keyed by (seed, split,
index), so the data is deterministic, needs no download (``data_dir`` is accepted and ignored),
and any size can be generated.  The splits "train", "validation" and "test" are separate random
streams.  Example ``i`` is the same whatever ``size`` or ``limit`` is, so a limit keeps a prefix.

Question types: ``value`` (read one value), ``max_label`` / ``min_label`` (which label has the
highest / lowest value), ``compare`` (which of two labels is greater), ``difference`` (by how much
one exceeds another), ``count`` (how many bars / points / slices) and ``yes_no``.  Values within
one chart are distinct integers, so every question has exactly one right answer.

Options: ``size`` (examples per split, default 200) and ``facts_in_text`` (default false; when
true the question also states the chart's values in words, so a language model whose vision is
untrained can still answer -- the CPU demo uses this).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Any, Iterator

from PIL import Image, ImageDraw, ImageFont

from sdrt_cli.data import Dataset, Example
from sdrt_cli.errors import SdrtError, did_you_mean

SPLITS = ("train", "validation", "test")
CHART_TYPES = ("bar", "line", "pie")
QUESTION_TYPES = ("value", "max_label", "min_label", "compare", "difference", "count", "yes_no")
YES_NO_FORMS = ("greater", "is_max", "is_min", "above")
OPTIONS = ("size", "facts_in_text")
# bump when the generator changes what it draws or asks, so run manifests tell the data apart
GENERATOR_VERSION = 1

# (title, labels) themes for bar and pie charts; labels are short so up to 7 fit under the bars
BAR_THEMES = (
    ("Sales by region", ("North", "South", "East", "West", "Central", "Coast", "Islands")),
    ("Fruit harvest (tonnes)", ("Apples", "Pears", "Plums", "Cherries", "Grapes", "Figs", "Lemons")),
    ("Club members", ("Chess", "Drama", "Robotics", "Choir", "Tennis", "Art", "Debate")),
    ("Downloads by platform", ("Windows", "macOS", "Linux", "Android", "iOS", "Web")),
    ("Visitors by country", ("France", "Spain", "Italy", "Japan", "Brazil", "Canada", "Kenya")),
    ("Power generation", ("Solar", "Wind", "Hydro", "Gas", "Coal", "Nuclear")),
    ("Books sold by genre", ("Fantasy", "Crime", "Poetry", "History", "Science", "Travel")),
    ("Cars by colour", ("Red", "Blue", "Black", "White", "Silver", "Green")),
)
PIE_THEMES = (
    ("Household budget", ("Rent", "Food", "Transport", "Savings", "Leisure", "Energy")),
    ("Market share", ("Alpha", "Beta", "Gamma", "Delta", "Omega", "Sigma")),
    ("Survey answers", ("Agree", "Neutral", "Disagree", "Unsure", "No reply")),
    ("Time spent per day", ("Sleep", "Work", "Meals", "Sport", "Reading", "Commute")),
    ("Energy mix", ("Solar", "Wind", "Hydro", "Gas", "Nuclear", "Coal")),
)
LINE_TITLES = ("Monthly revenue", "Average temperature", "Website visitors", "Rainfall", "Units produced", "Active users")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


@dataclass
class ChartSpec:
    chart_type: str
    title: str
    values: dict[str, int]  # label -> value, in drawing order
    width: int
    height: int
    axis_name: str  # what a label is called in questions: "category", "year", "month"
    colors: tuple[tuple[int, int, int], ...]
    color_each_bar: bool = False


class SyntheticCharts(Dataset):
    """Generated charts with exactly known answers; relaxed accuracy on the answer read out of the text."""

    name = "synthetic-charts"
    # small models answer in sentences: read the number / label / yes-no out of the text first
    metric = "extracted_relaxed_accuracy"
    default_split = "validation"

    def __init__(self, data_dir=None, split=None, limit=None, seed=0, **options: Any) -> None:
        super().__init__(data_dir=data_dir, split=split, limit=limit, seed=seed, **options)
        if self.split not in SPLITS:
            raise SdrtError(f"dataset {self.name!r} has no split {self.split!r}; splits: {', '.join(SPLITS)}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0):
            raise SdrtError(f"dataset {self.name!r}: limit must be a non-negative integer, not {self.limit!r}")
        normalized = {key.replace("-", "_"): value for key, value in options.items()}
        for key in normalized:
            if key not in OPTIONS:
                hint = did_you_mean(key, OPTIONS) or f"; options: {', '.join(OPTIONS)}"
                raise SdrtError(f"dataset {self.name!r} has no option {key!r}{hint}")
        self.size = _int_option("size", normalized.get("size", 200))
        self.facts_in_text = _bool_option("facts_in_text", normalized.get("facts_in_text", False))

    def __len__(self) -> int:
        return self.size if self.limit is None else min(self.size, self.limit)

    def __iter__(self) -> Iterator[Example]:
        for index in range(len(self)):
            yield self.example(index)

    def ids(self) -> Iterator[str]:
        for index in range(len(self)):
            yield self._id(index)

    def iter_shard(self, rank: int, world_size: int) -> Iterator[Example]:
        # examples are independent, so a rank draws only its own
        for index in range(rank, len(self), world_size):
            yield self.example(index)

    def references(self) -> Iterator[ChartRef]:
        for index in range(len(self)):
            yield ChartRef(self, index)

    def _id(self, index: int) -> str:
        return f"{self.name}/{self.split}/{index}"

    def example(self, index: int) -> Example:
        """Example ``index`` of this split; depends only on (seed, split, index, facts_in_text)."""
        # a string seed is hashed with sha512 by random.Random, so it is stable across runs/platforms
        rng = random.Random(f"{self.name}/{self.seed}/{self.split}/{index}")
        spec = _make_spec(rng)
        question, answer, question_type, query = _make_question(rng, spec)
        if self.facts_in_text:
            question = f"{_facts_sentence(spec)} {question}"
        image = render_chart(spec)
        return Example(
            id=self._id(index),
            images=[image],
            question=question,
            answers=[answer],
            metadata={
                "chart_type": spec.chart_type,
                "question_type": question_type,
                "title": spec.title,
                "values": dict(spec.values),
                "query": query,
                "axis_name": spec.axis_name,
                # the words a label answer is read from (metrics.extracted)
                "candidates": list(spec.values),
            },
        )

    def categories(self, example: Example) -> dict[str, str]:
        return {"question_type": example.metadata["question_type"], "chart_type": example.metadata["chart_type"]}

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info.update(size=self.size, facts_in_text=self.facts_in_text, generator_version=GENERATOR_VERSION)
        return info


@dataclass
class ChartRef:
    """Example ``index`` before it is drawn: a chart is redrawn from its seed rather than kept decoded."""

    dataset: SyntheticCharts
    index: int

    @property
    def id(self) -> str:
        return self.dataset._id(self.index)

    def materialise(self) -> Example:
        return self.dataset.example(self.index)


def _int_option(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SdrtError(f"dataset 'synthetic-charts': option {name!r} must be a non-negative integer, not {value!r}")
    return value


def _bool_option(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SdrtError(f"dataset 'synthetic-charts': option {name!r} must be true or false, not {value!r}")


# -- generation ---------------------------------------------------------------------------------

def _make_spec(rng: random.Random) -> ChartSpec:
    chart_type = rng.choice(CHART_TYPES)
    width = rng.randrange(400, 641, 8)
    height = rng.randrange(300, 481, 8)
    if chart_type == "pie":
        title, pool = rng.choice(PIE_THEMES)
        labels = rng.sample(pool, rng.randint(3, min(6, len(pool))))
        values = _distinct_parts_of_100(rng, len(labels))
        axis_name = "category"
    else:
        if chart_type == "bar":
            title, pool = rng.choice(BAR_THEMES)
            # narrow images get fewer bars so the labels under them do not collide
            labels = rng.sample(pool, rng.randint(3, min(len(pool), width // 80)))
            axis_name = "category"
        else:
            title = rng.choice(LINE_TITLES)
            count = rng.randint(4, min(8, width // 60))
            if rng.random() < 0.5:
                start = rng.randint(2000, 2024 - count)
                labels = [str(year) for year in range(start, start + count)]
                axis_name = "year"
            else:
                start = rng.randint(0, 12 - count)
                labels = list(MONTHS[start:start + count])
                axis_name = "month"
        top = rng.choice((20, 50, 100, 200, 500, 1000))
        values = rng.sample(range(max(1, top // 20), top + 1), len(labels))
    colors = tuple(rng.sample(PALETTE, len(PALETTE)))
    color_each_bar = chart_type == "bar" and rng.random() < 0.3
    return ChartSpec(chart_type, title, dict(zip(labels, values)), width, height, axis_name, colors, color_each_bar)


def _distinct_parts_of_100(rng: random.Random, count: int) -> list[int]:
    """``count`` distinct integers, each at least 4 (a visible slice), summing to 100."""
    while True:
        cuts = sorted(rng.sample(range(1, 100), count - 1))
        parts = [b - a for a, b in zip([0] + cuts, cuts + [100])]
        if min(parts) >= 4 and len(set(parts)) == count:
            return parts


def _make_question(rng: random.Random, spec: ChartSpec) -> tuple[str, str, str, dict[str, Any]]:
    """(question, answer, question_type, query) where ``query`` records the operation and operands."""
    values = spec.values
    labels = list(values)
    kind = spec.chart_type
    thing = {"bar": "value", "line": "value", "pie": "share"}[kind]
    question_type = rng.choice(QUESTION_TYPES)
    highest = max(labels, key=values.__getitem__)
    lowest = min(labels, key=values.__getitem__)
    pct = "%" if kind == "pie" else ""

    if question_type == "value":
        label = rng.choice(labels)
        text = {
            "bar": f"What is the value of {label}?",
            "line": f"What is the value in {label}?",
            "pie": f"What percentage of the total is {label}?",
        }[kind]
        return text, str(values[label]), question_type, {"operation": "value", "labels": [label]}
    if question_type in ("max_label", "min_label"):
        word = {"max_label": ("highest", "largest"), "min_label": ("lowest", "smallest")}[question_type]
        text = {
            "bar": f"Which category has the {word[0]} value?",
            "line": f"In which {spec.axis_name} is the value {word[0]}?",
            "pie": f"Which category has the {word[1]} share?",
        }[kind]
        answer = highest if question_type == "max_label" else lowest
        return text, answer, question_type, {"operation": question_type, "labels": []}
    if question_type == "compare":
        a, b = rng.sample(labels, 2)
        text = f"Which has a larger {thing}, {a} or {b}?" if kind == "pie" else f"Which is greater, the value of {a} or the value of {b}?"
        return text, a if values[a] > values[b] else b, question_type, {"operation": "compare", "labels": [a, b]}
    if question_type == "difference":
        a, b = sorted(rng.sample(labels, 2), key=values.__getitem__, reverse=True)
        text = f"By how many percentage points does {a} exceed {b}?" if kind == "pie" else f"By how much does the value of {a} exceed the value of {b}?"
        return text, str(values[a] - values[b]), question_type, {"operation": "difference", "labels": [a, b]}
    if question_type == "count":
        text = {
            "bar": "How many bars are in the chart?",
            "line": "How many data points does the line have?",
            "pie": "How many slices does the pie chart have?",
        }[kind]
        return text, str(len(labels)), question_type, {"operation": "count", "labels": []}

    # yes/no: choose the answer first so yes and no are equally likely
    want_yes = rng.random() < 0.5
    form = rng.choice(YES_NO_FORMS)
    if form == "greater":
        a, b = rng.sample(labels, 2)
        if (values[a] > values[b]) != want_yes:
            a, b = b, a
        text = f"Is the {thing} of {a} greater than the {thing} of {b}?"
        query = {"operation": "yes_no", "form": form, "labels": [a, b]}
    elif form in ("is_max", "is_min"):
        extreme = highest if form == "is_max" else lowest
        a = extreme if want_yes else rng.choice([label for label in labels if label != extreme])
        word = ("highest" if form == "is_max" else "lowest") if kind != "pie" else ("largest" if form == "is_max" else "smallest")
        text = f"Does {a} have the {word} {thing}?"
        query = {"operation": "yes_no", "form": form, "labels": [a]}
    else:
        a = rng.choice(labels)
        value = values[a]
        # a threshold strictly on the wanted side of the value (values are at least 1)
        threshold = rng.randint(0, value - 1) if want_yes else rng.randint(value + 1, value * 2 + 5)
        text = f"Is the {thing} of {a} more than {threshold}{pct}?"
        query = {"operation": "yes_no", "form": form, "labels": [a], "threshold": threshold}
    return text, "Yes" if want_yes else "No", question_type, query


def _facts_sentence(spec: ChartSpec) -> str:
    unit = "%" if spec.chart_type == "pie" else ""
    facts = ", ".join(f"{label}={value}{unit}" for label, value in spec.values.items())
    return f"The {spec.chart_type} chart '{spec.title}' shows: {facts}."


# -- drawing ------------------------------------------------------------------------------------

@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_chart(spec: ChartSpec) -> Image.Image:
    """Draw ``spec`` as an RGB image of ``spec.width`` x ``spec.height`` pixels."""
    image = Image.new("RGB", (spec.width, spec.height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((spec.width / 2, 18), spec.title, font=_font(18), fill="black", anchor="mm")
    if spec.chart_type == "pie":
        _draw_pie(draw, spec)
    else:
        _draw_axes_chart(draw, spec)
    return image


def _nice_axis_top(largest: int) -> tuple[int, int]:
    """(axis maximum, tick step) with a 1/2/5 x 10^k step and about five ticks."""
    rough = largest * 1.15 / 5
    magnitude = 10 ** math.floor(math.log10(rough)) if rough >= 1 else 1
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
    return int(math.ceil(largest * 1.15 / step) * step), int(step)


def _draw_axes_chart(draw: ImageDraw.ImageDraw, spec: ChartSpec) -> None:
    small = _font(12)
    left, right, top, bottom = 56, spec.width - 20, 44, spec.height - 44
    axis_top, step = _nice_axis_top(max(spec.values.values()))

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * value / axis_top

    for tick in range(0, axis_top + 1, step):
        y = y_of(tick)
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.text((left - 6, y), str(tick), font=small, fill=(90, 90, 90), anchor="rm")
    draw.line((left, top, left, bottom), fill="black")
    draw.line((left, bottom, right, bottom), fill="black")

    slot = (right - left) / len(spec.values)
    centers = [left + slot * (i + 0.5) for i in range(len(spec.values))]
    if spec.chart_type == "bar":
        for i, (x, value) in enumerate(zip(centers, spec.values.values())):
            half = slot * 0.3
            draw.rectangle((x - half, y_of(value), x + half, bottom), fill=spec.colors[i] if spec.color_each_bar else spec.colors[0])
            draw.text((x, y_of(value) - 4), str(value), font=small, fill="black", anchor="mb")
    else:
        points = [(x, y_of(value)) for x, value in zip(centers, spec.values.values())]
        draw.line(points, fill=spec.colors[0], width=3)
        for (x, y), value in zip(points, spec.values.values()):
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=spec.colors[0])
            # a white halo keeps the number readable where the line passes through it
            draw.text((x, y - 8), str(value), font=small, fill="black", anchor="mb", stroke_width=2, stroke_fill="white")
    for x, label in zip(centers, spec.values):
        draw.text((x, bottom + 8), label, font=small, fill="black", anchor="mt")
    draw.text(((left + right) / 2, spec.height - 8), spec.axis_name.capitalize(), font=small, fill=(90, 90, 90), anchor="mb")


def _draw_pie(draw: ImageDraw.ImageDraw, spec: ChartSpec) -> None:
    small = _font(13)
    diameter = min(spec.width * 0.55, spec.height - 70)
    cx, cy = 20 + diameter / 2, 40 + (spec.height - 40) / 2
    box = (cx - diameter / 2, cy - diameter / 2, cx + diameter / 2, cy + diameter / 2)
    angle = -90.0  # start at 12 o'clock, go clockwise
    legend_x = cx + diameter / 2 + 24
    legend_y = cy - 11 * len(spec.values)
    for i, (label, value) in enumerate(spec.values.items()):
        sweep = 360.0 * value / 100
        draw.pieslice(box, angle, angle + sweep, fill=spec.colors[i], outline="white")
        angle += sweep
        y = legend_y + 22 * i
        draw.rectangle((legend_x, y, legend_x + 14, y + 14), fill=spec.colors[i])
        draw.text((legend_x + 20, y + 7), f"{label} ({value}%)", font=small, fill="black", anchor="lm")
