"""Aggregating per-question scores into reports, and submission files for hidden-answer splits."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from sdrt_cli.data import Dataset
from sdrt_cli.errors import SdrtError
from sdrt_cli.io import atomic_write_text


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(scores: Sequence[float], categories: Sequence[Mapping[str, object]] | None = None) -> dict:
    """Overall and per-category means of per-question scores (micro-averages).

    ``categories[i]`` holds question i's breakdown keys, e.g. ``{"subject": "Math", "domain":
    "Science"}``.  A value may also be a list of strings: the question then counts in each group
    (DocVQA questions carry several question types; the RRC evaluator counts them in each).
    Returns ``{"overall": mean, "count": n, "categories": {key: {value: {"score": mean, "count": n}}}}``;
    a mean over no questions is None.
    """
    scores = [float(s) for s in scores]
    if categories is None:
        categories = [{} for _ in scores]
    if len(categories) != len(scores):
        raise SdrtError(f"aggregate got {len(scores)} scores but {len(categories)} category records")
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for score, keys in zip(scores, categories):
        for key, value in keys.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for item in values:
                if item is None or item == "":
                    continue
                groups[key][str(item)].append(score)
    return {
        "overall": _mean(scores),
        "count": len(scores),
        "categories": {
            key: {value: {"score": _mean(group), "count": len(group)} for value, group in sorted(by_value.items())}
            for key, by_value in sorted(groups.items())
        },
    }


def _question_id(example_id: str) -> int | str:
    # the RRC servers expect the integer questionId they published
    return int(example_id) if example_id.isdigit() else example_id


def write_submission(path: Path | str, dataset: Dataset, predictions: Mapping[str, str] | Sequence[str]) -> Path:
    """Write the RRC submission file ``[{"questionId": ..., "answer": ...}]`` for ``dataset``, atomically.

    ``predictions`` maps example ids to answer text, or lists answers in the dataset's order.
    Every question of the dataset (within its ``limit``) must have an answer.
    """
    path = Path(path)
    ids = list(dataset.ids())
    if isinstance(predictions, Mapping):
        answers = dict(predictions)
    else:
        predictions = list(predictions)
        if len(predictions) != len(ids):
            raise SdrtError(
                f"submission for {dataset.name} {dataset.split!r} needs {len(ids)} answers in dataset order, got {len(predictions)}"
            )
        answers = dict(zip(ids, predictions))
    missing = [example_id for example_id in ids if example_id not in answers]
    if missing:
        raise SdrtError(
            f"submission for {dataset.name} {dataset.split!r} lacks answers for {len(missing)} of {len(ids)} questions "
            f"(first: {missing[0]!r})"
        )
    records = [{"questionId": _question_id(example_id), "answer": str(answers[example_id])} for example_id in ids]
    atomic_write_text(path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    return path
