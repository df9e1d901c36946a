"""Relaxed accuracy on the answer read out of a sentence, for datasets whose small models answer in prose.

A 135M model says "The pie chart has 4 slices." where the gold answer is "4"; relaxed accuracy on
the raw text scores that 0.  This metric first reads the answer out of the text, the way MMMU's
official open-answer extraction reads numbers and words out of a response, then applies ChartQA's
relaxed accuracy (``relaxed.relaxed_correct``) to what it read.  What is read depends on the kind
of the gold answer:

* a word among the example's candidate words ``example.metadata["candidates"]`` (synthetic-charts:
  every label of the chart): the candidate that the text mentions **first**, matched whole-word and
  case-insensitively, so listing every label is read as the first one listed, not as right;
* a number (``"4"``, ``"12.5"``): the **last** number in the text, thousands separators and a trailing
  ``%`` removed ("It is 1,250." reads ``1250``; "about 23%" reads ``23``, since the gold shares of
  synthetic-charts are written without ``%``);
* yes/no: FigureQA's reading (``yes_no.parse_yes_no``: the first word, else the first stand-alone
  yes/no);
* any other word: the gold answer that the text mentions first.

Text with nothing to read parses to ``""`` and is wrong.  The real benchmarks keep their official
metrics; this one is ``synthetic-charts``' own.
"""

from __future__ import annotations

import re

from sdrt_cli.data import Example
from sdrt_cli.metrics.base import Metric, require_answers
from sdrt_cli.metrics.relaxed import as_float, relaxed_correct
from sdrt_cli.metrics.yes_no import parse_yes_no

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_YES_NO = {"yes", "no"}


def last_number(text: str) -> str:
    """The last number written in ``text`` (commas between thousands removed), or ""."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else ""


def first_mentioned(text: str, candidates: list[str]) -> str:
    """The candidate whose first whole-word, case-insensitive mention comes earliest in ``text``, or ""."""
    best, best_at = "", None
    for candidate in candidates:
        match = re.search(rf"(?<!\w){re.escape(candidate)}(?!\w)", text, flags=re.IGNORECASE)
        # at the same position the longer candidate wins ("New York" over "New")
        if match and (best_at is None or match.start() < best_at or (match.start() == best_at and len(candidate) > len(best))):
            best, best_at = candidate, match.start()
    return best


class ExtractedRelaxedAccuracy(Metric):
    name = "extracted_relaxed_accuracy"

    def parse(self, prediction: str, example: Example) -> str:
        gold = require_answers(example)
        candidates = [str(c) for c in example.metadata.get("candidates") or ()]
        if candidates and all(answer.strip().lower() in {c.lower() for c in candidates} for answer in gold):
            return first_mentioned(prediction, candidates)  # a label answer, even one like "2019"
        if all(answer.strip().lower() in _YES_NO for answer in gold):
            return parse_yes_no(prediction)
        if all(as_float(answer.strip()) is not None for answer in gold):
            return last_number(prediction)
        return first_mentioned(prediction, gold)

    def score_answers(self, prediction: str, answers: list[str], example: Example) -> float:
        said = self.parse(prediction, example)
        return float(bool(said) and any(relaxed_correct(said, answer) for answer in answers))
