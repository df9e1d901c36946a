"""MMMU scoring, reimplemented from the benchmark's official ``mmmu/utils/eval_utils.py``.

Multiple choice (official tiers, first tier with any hit wins; with several hits the one that
occurs *last* in the response wins, ties going to the earlier letter):

1. strip the edge characters ``, . ! ? ; : '`` (one kind after another, not whitespace), pad
   the response with a space on each side;
2. a letter in brackets, "(B)";
3. a letter between spaces, " B ";
4. only if the response has more than 5 words: an option's text inside the response
   (case-insensitive);
5. otherwise a uniformly random letter.  The official script draws it from Python's global
   ``random`` seeded once with 42, so its choice depends on every earlier fallback of the run;
   here each example has its own generator seeded with 42 and the example id, which keeps the
   same distribution but makes a question's parse independent of order, sharding and resumes.

Open answers: the lower-cased response is split on newlines (the official sentence split looks
for ". " before a capital letter *after* lower-casing, so it never fires; kept as is); in each
piece the shortest tail after a key indicator ("could be ", "so ", "is ", "thus ", "therefore ",
"final ", "answer ", "result ", and "=" in the last piece) is a key response; with none, the
whole response is.  Numbers (with thousands commas, scientific, plain) are extracted from the
key responses; everything is normalised (numbers -> float rounded to 2 decimals, commas
dropped; text -> lower case, a single character padded with a space on either side).  A
question is right if any numeric candidate equals a normalised gold number, or any normalised
gold text occurs inside a text candidate.  The whole candidate list is kept: lmms-eval's
current wrapper keeps only its first element (stringified), which makes ``eval_open`` iterate
characters and under-scores open questions; that is not copied.

Accuracy is micro-averaged: overall, per subject and per the six official domains is the mean
of per-question 0/1 scores over the questions in each group (``sdrt_cli.metrics.aggregate``).
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from sdrt_cli.data import Example
from sdrt_cli.metrics.base import Metric

FALLBACK_SEED = 42

DOMAIN_SUBJECTS: dict[str, tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ),
}
DOMAIN_OF_SUBJECT = {subject: domain for domain, subjects in DOMAIN_SUBJECTS.items() for subject in subjects}


def domain_of(subject: str) -> str | None:
    """The official domain of an MMMU subject ("Math" -> "Science"); None for an unknown subject."""
    return DOMAIN_OF_SUBJECT.get(subject)


def option_letters(options: Sequence[str]) -> list[str]:
    return [chr(ord("A") + i) for i in range(len(options))]


# ---------------------------------------------------------------- multiple choice

_EDGE_MARKS = (",", ".", "!", "?", ";", ":", "'")


def parse_multiple_choice(response: str, options: Sequence[str], rng: random.Random) -> str:
    """The chosen letter ("" only when there are no options at all)."""
    letters = option_letters(options)
    text_of = dict(zip(letters, (str(o) for o in options)))
    trimmed = response
    for mark in _EDGE_MARKS:
        trimmed = trimmed.strip(mark)
    padded = f" {trimmed} "

    hits = [letter for letter in letters if f"({letter})" in padded]
    if hits:
        last_position = {letter: padded.rfind(f"({letter})") for letter in hits}
    else:
        hits = [letter for letter in letters if f" {letter} " in padded]
        last_position = {letter: padded.rfind(f" {letter} ") for letter in hits}
        if not hits and len(padded.split()) > 5:
            lowered = padded.lower()
            hits = [letter for letter in letters if text_of[letter].lower() in lowered]
            last_position = {letter: lowered.rfind(text_of[letter].lower()) for letter in hits}
    if not hits:
        return rng.choice(letters) if letters else ""
    # max() keeps the first of equal positions, as numpy.argmax does in the official script
    return max(hits, key=lambda letter: last_position[letter])


# ---------------------------------------------------------------- open answers

_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_TAILS = {":", ",", ".", "!", "?", ";", "'"}

_NUMBER_WITH_COMMAS = re.compile(r"-? \b \d{1,3} (?: , \d{3} )+ \b", re.VERBOSE)
_NUMBER_SCIENTIFIC = re.compile(r"-? \d+ (?: \. \d+ )? [eE] [+-]? \d+", re.VERBOSE)
_NUMBER_PLAIN = re.compile(
    r"""-? (?: \d+ \. \d+ | \. \d+ | \d+ \b )   # 12.5, .5 or 12
        (?! [eE] [+-]? \d+ )                    # not the mantissa of 1e5
        (?! [,\d] )                             # not the head of 1,000""",
    re.VERBOSE,
)


def extract_numbers(text: str) -> list[str]:
    """Every number in ``text``: comma-grouped ones, then scientific, then plain (official order)."""
    return _NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_PLAIN.findall(text)


def normalise_answer(text: str) -> list[str | float]:
    """A number becomes one float rounded to 2 decimals; text is lower-cased, and a single
    character becomes " c" and "c " so that it only matches as a separate token."""
    text = text.strip()
    try:
        number = float(text.replace(",", ""))
    except ValueError:
        lowered = text.lower()
        return [" " + lowered, lowered + " "] if len(lowered) == 1 else [lowered]
    return [round(number, 2)]


def _key_responses(response: str) -> list[str]:
    text = response.strip().strip(".").lower()
    pieces = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys: list[str] = []
    for index, piece in enumerate(pieces):
        indicators = _KEY_INDICATORS + (("=",) if index == len(pieces) - 1 else ())
        shortest: str | None = None
        for indicator in indicators:
            if indicator in piece:
                tail = piece.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL_TAILS:
            keys.append(shortest)
    return keys or [text]


def parse_open(response: str) -> list[str | float]:
    """Normalised answer candidates of an open response, in first-seen order without repeats."""
    keys = _key_responses(response)
    raw = keys + [number for key in keys for number in extract_numbers(key)]
    candidates: list[str | float] = []
    for piece in raw:
        for value in normalise_answer(piece):
            if value not in candidates:
                candidates.append(value)
    return candidates


def open_correct(candidates: Sequence[str | float], gold_answers: Sequence[str]) -> bool:
    gold = [value for answer in gold_answers for value in normalise_answer(answer)]
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(g, str) and g in candidate for g in gold):
                return True
        elif candidate in gold:
            return True
    return False


# ---------------------------------------------------------------- metric


def fallback_rng(example_id: str, seed: int = FALLBACK_SEED) -> random.Random:
    # a string seed is hashed with SHA-512 by random.Random: stable across processes and runs
    return random.Random(f"{seed}:{example_id}")


def is_multiple_choice(example: Example) -> bool:
    kind = example.metadata.get("question_type")
    if kind is None:
        return bool(example.metadata.get("options"))
    return kind == "multiple-choice"


class MMMUAccuracy(Metric):
    """Official MMMU answer extraction; needs ``metadata["question_type"]`` and ``metadata["options"]``."""

    name = "mmmu"

    def parse(self, prediction: str, example: Example) -> str:
        if is_multiple_choice(example):
            return parse_multiple_choice(prediction, example.metadata.get("options") or [], fallback_rng(example.id))
        return " | ".join(str(c) for c in parse_open(prediction))

    def score_answers(self, prediction: str, answers: list[str], example: Example) -> float:
        if is_multiple_choice(example):
            letter = parse_multiple_choice(prediction, example.metadata.get("options") or [], fallback_rng(example.id))
            return float(letter in answers)
        return float(open_correct(parse_open(prediction), answers))
