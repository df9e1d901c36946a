"""The generated ``synthetic-charts`` dataset: determinism, splits, correct answers, options."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from sdrt_cli.data import Dataset
from sdrt_cli.errors import SdrtError
from sdrt_cli.plugins import datasets
from sdrt_plugins.datasets.synthetic_charts import CHART_TYPES, QUESTION_TYPES, ChartSpec, SyntheticCharts, render_chart


def image_bytes(example) -> tuple:
    (image,) = example.images
    return image.mode, image.size, image.tobytes()


def test_registered_under_its_name_with_the_chartqa_metric():
    cls = datasets().get("synthetic-charts")
    assert cls is SyntheticCharts and issubclass(cls, Dataset)
    assert cls.metric == "extracted_relaxed_accuracy" and cls.name == "synthetic-charts"


def test_same_seed_gives_identical_examples():
    first = list(SyntheticCharts(split="train", seed=11, size=25))
    second = list(SyntheticCharts(split="train", seed=11, size=25))
    assert [e.id for e in first] == [f"synthetic-charts/train/{i}" for i in range(25)]
    for a, b in zip(first, second):
        assert (a.id, a.question, a.answers, a.metadata) == (b.id, b.question, b.answers, b.metadata)
        assert image_bytes(a) == image_bytes(b)


def test_different_seed_gives_different_examples():
    a = list(SyntheticCharts(split="train", seed=1, size=10))
    b = list(SyntheticCharts(split="train", seed=2, size=10))
    assert sum(image_bytes(x) != image_bytes(y) for x, y in zip(a, b)) >= 9


def test_splits_are_different_streams():
    by_split = {split: list(SyntheticCharts(split=split, seed=0, size=20)) for split in ("train", "validation", "test")}
    for split, examples in by_split.items():
        assert all(e.id.startswith(f"synthetic-charts/{split}/") for e in examples)
    for (s1, e1), (s2, e2) in itertools.combinations(by_split.items(), 2):
        images1, images2 = {image_bytes(e) for e in e1}, {image_bytes(e) for e in e2}
        assert not images1 & images2, f"{s1} and {s2} share an image"


def expected_answer(metadata: dict) -> str:
    """Recompute the answer from the chart's values, independently of the generator."""
    values = metadata["values"]
    query = metadata["query"]
    labels = query["labels"]
    operation = query["operation"]
    if operation == "value":
        return str(values[labels[0]])
    if operation == "max_label":
        return max(values, key=values.get)
    if operation == "min_label":
        return min(values, key=values.get)
    if operation == "compare":
        return labels[0] if values[labels[0]] > values[labels[1]] else labels[1]
    if operation == "difference":
        return str(abs(values[labels[0]] - values[labels[1]]))
    if operation == "count":
        return str(len(values))
    assert operation == "yes_no"
    a = labels[0]
    truth = {
        "greater": lambda: values[a] > values[labels[1]],
        "is_max": lambda: values[a] == max(values.values()),
        "is_min": lambda: values[a] == min(values.values()),
        "above": lambda: values[a] > query["threshold"],
    }[query["form"]]()
    return "Yes" if truth else "No"


def test_every_answer_is_correct_for_every_question_and_chart_type():
    examples = [e for split in ("train", "validation") for e in SyntheticCharts(split=split, seed=5, size=150)]
    seen = Counter((e.metadata["chart_type"], e.metadata["question_type"]) for e in examples)
    assert {q for _, q in seen} == set(QUESTION_TYPES) and {c for c, _ in seen} == set(CHART_TYPES)
    yes_no = Counter(e.answers[0] for e in examples if e.metadata["question_type"] == "yes_no")
    assert set(yes_no) == {"Yes", "No"}
    for example in examples:
        metadata = example.metadata
        values = metadata["values"]
        assert len(set(values.values())) == len(values), "distinct values make every answer unique"
        if metadata["chart_type"] == "pie":
            assert sum(values.values()) == 100
        assert example.answers == [expected_answer(metadata)], example.id
        for label in metadata["query"]["labels"]:
            assert label in example.question, (example.id, example.question)
        assert metadata["question_type"] == metadata["query"]["operation"]
        assert isinstance(metadata["title"], str) and metadata["title"]


def test_images_are_rgb_charts_of_varied_sizes():
    examples = list(SyntheticCharts(split="test", seed=0, size=30))
    sizes = {e.images[0].size for e in examples}
    assert len(sizes) > 10
    for width, height in sizes:
        assert 400 <= width <= 640 and 300 <= height <= 480
    assert all(e.images[0].mode == "RGB" for e in examples)


RED, GREEN, BLUE = (214, 39, 40), (44, 160, 44), (31, 119, 180)


def color_pixels(image, color) -> int:
    return int((np.asarray(image) == np.array(color, dtype=np.uint8)).all(axis=-1).sum())


def test_pie_slices_are_drawn_in_proportion_to_their_values():
    spec = ChartSpec("pie", "Shares", {"A": 50, "B": 30, "C": 20}, 520, 400, "category", (RED, GREEN, BLUE))
    image = render_chart(spec)
    assert image.size == (520, 400)
    legend_swatch = 15 * 15  # each colour also fills one legend square
    counts = [color_pixels(image, color) - legend_swatch for color in (RED, GREEN, BLUE)]
    total = sum(counts)
    for count, value in zip(counts, (50, 30, 20)):
        assert abs(100 * count / total - value) < 1.5


def test_bars_are_drawn_with_heights_proportional_to_their_values():
    spec = ChartSpec("bar", "Bars", {"A": 10, "B": 20, "C": 40}, 480, 360, "category", (BLUE, RED, GREEN))
    image = render_chart(spec)
    width, height = image.size
    pixels = image.load()
    # the tallest run of bar colour in each bar's centre column
    left, right = 56, width - 20
    slot = (right - left) / 3
    heights = [sum(1 for y in range(height) if pixels[int(left + slot * (i + 0.5)), y] == BLUE) for i in range(3)]
    assert heights[0] > 0
    assert abs(heights[1] / heights[0] - 2) < 0.1 and abs(heights[2] / heights[0] - 4) < 0.1


def test_limit_keeps_a_prefix_and_size_is_respected():
    full = list(SyntheticCharts(split="validation", seed=3, size=12))
    limited = list(SyntheticCharts(split="validation", seed=3, size=12, limit=5))
    assert [e.id for e in limited] == [e.id for e in full[:5]]
    assert [e.question for e in limited] == [e.question for e in full[:5]]
    assert len(SyntheticCharts(size=12, limit=5)) == 5
    assert len(SyntheticCharts(size=12, limit=50)) == 12
    assert len(list(SyntheticCharts(size=12, limit=0))) == 0
    assert len(SyntheticCharts()) == 200, "default size"
    # a bigger size extends the same stream
    assert [e.question for e in SyntheticCharts(split="validation", seed=3, size=20)][:12] == [e.question for e in full]


def test_ids_and_shards_match_iteration():
    dataset = SyntheticCharts(split="train", seed=4, size=9)
    examples = list(dataset)
    assert list(dataset.ids()) == [e.id for e in examples]
    shards = [list(dataset.iter_shard(rank, 2)) for rank in range(2)]
    assert [e.id for e in shards[0]] == [e.id for e in examples[0::2]]
    assert [e.id for e in shards[1]] == [e.id for e in examples[1::2]]
    assert image_bytes(shards[1][0]) == image_bytes(examples[1])


def test_facts_in_text_states_the_values_and_keeps_the_question():
    plain = list(SyntheticCharts(split="train", seed=8, size=15))
    with_facts = list(SyntheticCharts(split="train", seed=8, size=15, facts_in_text=True))
    for a, b in zip(plain, with_facts):
        metadata = b.metadata
        unit = "%" if metadata["chart_type"] == "pie" else ""
        facts = ", ".join(f"{label}={value}{unit}" for label, value in metadata["values"].items())
        assert b.question == f"The {metadata['chart_type']} chart '{metadata['title']}' shows: {facts}. {a.question}"
        assert b.answers == a.answers and image_bytes(a) == image_bytes(b)


def test_options_from_strings_and_dashes_as_a_command_line_would_pass_them():
    dataset = SyntheticCharts(split="train", size="7", **{"facts-in-text": "true"})
    assert len(dataset) == 7 and dataset.facts_in_text is True
    assert SyntheticCharts(facts_in_text="no").facts_in_text is False
    identity = dataset.identity()
    assert identity["name"] == "synthetic-charts" and identity["size"] == 7 and identity["facts_in_text"] is True


def test_data_dir_is_ignored(tmp_path):
    a = list(SyntheticCharts(data_dir=tmp_path / "does-not-exist", split="test", size=4))
    b = list(SyntheticCharts(split="test", size=4))
    assert [image_bytes(x) for x in a] == [image_bytes(y) for y in b]


def test_categories_and_format_question():
    dataset = SyntheticCharts(size=3)
    example = next(iter(dataset))
    assert dataset.categories(example) == {"question_type": example.metadata["question_type"], "chart_type": example.metadata["chart_type"]}
    assert dataset.format_question(example) == f"{example.question}\nAnswer the question using a single word or phrase."


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "dev"}, "has no split 'dev'; splits: train, validation, test"),
        ({"sise": 3}, "has no option 'sise'; did you mean 'size'?"),
        ({"size": -1}, "option 'size' must be a non-negative integer, not -1"),
        ({"size": "many"}, "option 'size' must be a non-negative integer, not 'many'"),
        ({"size": True}, "option 'size' must be a non-negative integer"),
        ({"facts_in_text": "maybe"}, "option 'facts_in_text' must be true or false, not 'maybe'"),
        ({"limit": -2}, "limit must be a non-negative integer, not -2"),
    ],
)
def test_bad_arguments_fail_with_one_sentence(kwargs, message):
    with pytest.raises(SdrtError, match=message):
        SyntheticCharts(**kwargs)
