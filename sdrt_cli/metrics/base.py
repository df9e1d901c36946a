"""The metric interface and the refusal to score examples whose answers are hidden."""

from __future__ import annotations

import abc
from typing import ClassVar

from sdrt_cli.data import Dataset, Example
from sdrt_cli.errors import SdrtError


class Metric(abc.ABC):
    """A benchmark's official per-question score.

    ``parse`` returns the answer the metric reads out of a model's text (what prediction files
    record); ``score`` returns the question's score in [0, 1].  Both take the whole example
    because some metrics need more than the gold answers (MMMU needs the options).
    """

    name: ClassVar[str] = ""

    def parse(self, prediction: str, example: Example) -> str:
        return prediction.strip()

    def score(self, prediction: str, example: Example) -> float:
        return self.score_answers(prediction, require_answers(example), example)

    @abc.abstractmethod
    def score_answers(self, prediction: str, answers: list[str], example: Example) -> float:
        """Score ``prediction`` against non-empty gold ``answers``."""


def require_answers(example: Example) -> list[str]:
    """The example's gold answers; an example without any cannot be scored."""
    answers = [a for a in example.answers if a is not None]
    if not answers:
        raise SdrtError(
            f"example {example.id!r} has no gold answers (its split hides them), so it cannot be scored; "
            "write a submission file with sdrt_cli.metrics.write_submission and upload it to the benchmark's server"
        )
    return [str(a) for a in answers]


def check_scorable(dataset: Dataset) -> None:
    """Refuse, in one sentence, to score a split whose answers the benchmark hides."""
    if not dataset.has_answers:
        raise SdrtError(
            f"{dataset.name or type(dataset).__name__} split {dataset.split!r} has no answers (the benchmark hides them), "
            "so it cannot be scored here; write a submission file instead (sdrt_cli.metrics.write_submission) "
            "and upload it to the benchmark's evaluation server"
        )


class ExactMatch(Metric):
    """Case-insensitive exact match after collapsing whitespace; max over gold answers.

    The base ``Dataset.metric`` default, for third-party datasets without an official metric.
    """

    name = "exact"

    def score_answers(self, prediction: str, answers: list[str], example: Example) -> float:
        said = " ".join(prediction.lower().split())
        return float(any(" ".join(a.lower().split()) == said for a in answers))
