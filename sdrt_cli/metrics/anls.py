"""ANLS (average normalised Levenshtein similarity) as the RRC DocVQA/InfographicVQA evaluator computes it.

Per question, for each gold answer: both strings are lower-cased and their whitespace collapsed
(``" ".join(s.strip().lower().split())``); the edit distance of those normalised strings is
divided by the larger of the two *raw* lengths (the official script measures ``len(s.upper())``
of the unnormalised strings, so surrounding or repeated spaces lengthen the denominator).  The
question scores ``1 - min(normalised distance)`` over its gold answers, set to 0 when that is
below the threshold 0.5 — a similarity of exactly 0.5 is kept.  Two empty strings have distance 0.
"""

from __future__ import annotations

import editdistance

from sdrt_cli.data import Example
from sdrt_cli.metrics.base import Metric

ANLS_THRESHOLD = 0.5


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def normalised_distance(prediction: str, answer: str) -> float:
    """Edit distance of the normalised strings over the larger raw length (0 when both are empty)."""
    length = max(len(answer.upper()), len(prediction.upper()))
    if length == 0:
        return 0.0
    return editdistance.eval(_normalise(answer), _normalise(prediction)) / length


def anls_score(prediction: str, answers: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """One question's ANLS: best similarity over gold answers, zeroed below ``threshold``."""
    if not answers:
        raise ValueError("ANLS needs at least one gold answer")
    similarity = 1.0 - min(normalised_distance(prediction, answer) for answer in answers)
    return similarity if similarity >= threshold else 0.0


class ANLS(Metric):
    name = "anls"

    def score_answers(self, prediction: str, answers: list[str], example: Example) -> float:
        return anls_score(prediction, answers)
