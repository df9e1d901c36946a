"""Official benchmark metrics, reusable by any dataset plugin.

A dataset names its metric (``Dataset.metric``), any name registered through the ``register_metrics``
hook (the ones below are the built-in plugin ``sdrt_plugins.metrics``; a dataset plugin may bring its
own); ``get_metric(name)`` returns an object with
``parse(prediction, example) -> str`` (the answer read out of the model's text, recorded in
prediction files) and ``score(prediction, example) -> float`` in [0, 1].  ``aggregate`` turns
per-question scores into overall and per-category means; ``write_submission`` writes the RRC
file for splits whose answers are hidden (scoring those is refused by ``check_scorable``).

==================  ===============================================================
``anls``            DocVQA / InfographicVQA, the RRC evaluator's ANLS (threshold 0.5)
``relaxed_accuracy`` ChartQA, pix2struct's relaxed accuracy (5% on non-zero numbers)
``yes_no_accuracy`` FigureQA, accuracy on yes/no
``mmmu``            MMMU, the official answer extraction (multiple choice and open)
``extracted_relaxed_accuracy`` synthetic-charts: relaxed accuracy on the answer read out of a sentence
``exact``           case-insensitive exact match (the ``Dataset`` default)
==================  ===============================================================
"""

from __future__ import annotations

from sdrt_cli.metrics.anls import anls_score
from sdrt_cli.metrics.base import Metric, check_scorable, require_answers
from sdrt_cli.metrics.relaxed import relaxed_correct
from sdrt_cli.metrics.report import aggregate, write_submission
from sdrt_cli.metrics.yes_no import parse_yes_no

__all__ = [
    "Metric",
    "get_metric",
    "metric_names",
    "aggregate",
    "write_submission",
    "check_scorable",
    "require_answers",
    "anls_score",
    "relaxed_correct",
    "parse_yes_no",
]


def get_metric(name: str) -> Metric:
    """The metric registered as ``name``; an unknown name raises ``SdrtError`` with a did-you-mean."""
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.plugins import metrics

    entry = metrics().entry(name)
    if not (isinstance(entry.value, type) and issubclass(entry.value, Metric)):
        raise SdrtError(f"metric {name!r} registered by plugin {entry.plugin!r} is not a subclass of sdrt_cli.metrics.Metric")
    return entry.value()


def metric_names() -> list[str]:
    from sdrt_cli.plugins import metrics

    return metrics().names()
