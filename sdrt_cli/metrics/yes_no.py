"""Accuracy on yes/no questions (FigureQA).

FigureQA's official metric is plain accuracy on its binary answers; a generative model answers
in words, so the answer is read as follows: the first word decides when it is yes/no (or
true/false), otherwise the first stand-alone "yes" or "no" anywhere in the text; anything else
parses to "" and is wrong.  Gold answers may be "yes"/"no" or FigureQA's raw 1/0.
"""

from __future__ import annotations

import re

from sdrt_cli.data import Example
from sdrt_cli.metrics.base import Metric

_YES = {"yes", "true", "1"}
_NO = {"no", "false", "0"}
_WORD = re.compile(r"[a-z0-9]+")


def parse_yes_no(text: str) -> str:
    """"yes", "no", or "" when the text commits to neither."""
    words = _WORD.findall(text.lower())
    if not words:
        return ""
    first = words[0]
    if first in ("yes", "true"):
        return "yes"
    if first in ("no", "false"):
        return "no"
    for word in words[1:]:
        if word in ("yes", "no"):
            return word
    return ""


def _gold(answer: str) -> str:
    value = answer.strip().lower()
    if value in _YES:
        return "yes"
    if value in _NO:
        return "no"
    return value


class YesNoAccuracy(Metric):
    name = "yes_no_accuracy"

    def parse(self, prediction: str, example: Example) -> str:
        return parse_yes_no(prediction)

    def score_answers(self, prediction: str, answers: list[str], example: Example) -> float:
        said = parse_yes_no(prediction)
        return float(bool(said) and any(_gold(a) == said for a in answers))
