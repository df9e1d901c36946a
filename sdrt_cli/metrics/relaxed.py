"""ChartQA relaxed accuracy, as pix2struct defines it (Masry et al. 2022, end of section 5.1).

Both strings are read as floats, a trailing ``%`` meaning "divide by 100" (so "45%" equals
"0.45").  When the prediction is a number and the target a non-zero number, the answer is right
if the relative error is at most 5%.  Otherwise (a word, a zero target, "1,000" — Python's
``float`` refuses thousands separators, as in pix2struct) the strings must match exactly,
ignoring case.  A question with several gold answers takes the best of them.

One deliberate difference: surrounding whitespace of both strings is stripped first, as the
LLaVA/Qwen-VL evaluation scripts do, because decoded generations often carry a leading space
or trailing newline that pix2struct's T5 outputs never had.
"""

from __future__ import annotations

from sdrt_cli.data import Example
from sdrt_cli.metrics.base import Metric

MAX_RELATIVE_CHANGE = 0.05


def as_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    prediction, target = prediction.strip(), target.strip()
    predicted_number = as_float(prediction)
    target_number = as_float(target)
    if predicted_number is not None and target_number:  # a zero target falls through to string match
        return abs(predicted_number - target_number) / abs(target_number) <= max_relative_change
    return prediction.lower() == target.lower()


class RelaxedAccuracy(Metric):
    name = "relaxed_accuracy"

    def score_answers(self, prediction: str, answers: list[str], example: Example) -> float:
        return float(any(relaxed_correct(prediction, answer) for answer in answers))
