"""MmDC's distillation calibration, the parts that do not need a model: reading the judge's verdict,
Eq. 5 (both orders averaged), the difficult/easy split (Eq. 6 via :mod:`sdrt_cli.assessment`), the
ROUGE-L diversity filter of augmented questions, the difficult/easy balancing and how the two pools
change at the end of an iteration.

The stages of `sdrt calibrate` (:mod:`sdrt_cli.calibration.stages`) drive the models around these.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sdrt_cli.assessment import SCALE_MAX, SCALE_MIN, Assessment
from sdrt_cli.errors import SdrtError

# ---------------------------------------------------------------------------------------------
# The judge's verdict
# ---------------------------------------------------------------------------------------------

_NUMBER = r"\[?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\]?"
# MmDC's required format: "The scores for Assistant 1 and 2 are X and Y, respectively."
_VERDICT = re.compile(
    rf"scores?\s+for\s+assistants?\s*1\s*(?:and|&)\s*(?:assistant\s*)?2\s+(?:are|is|were)\s*:?\s*{_NUMBER}\s*(?:and|&|,)\s*{_NUMBER}",
    re.IGNORECASE,
)
_MARKUP = re.compile(r"[*_`#]")


def parse_judge_scores(text: str) -> tuple[float, float] | None:
    """(Assistant 1's score, Assistant 2's score) from a judgement, or None when it cannot be read.

    Tolerates Markdown emphasis, brackets around the numbers, "8/10", decimals and line breaks inside
    the sentence.  Nothing is guessed: no sentence in the asked-for format, a score outside 1–10,
    or two such sentences that disagree all give None.
    """
    flat = " ".join(_MARKUP.sub("", text).split())
    found = {(float(a), float(b)) for a, b in _VERDICT.findall(flat)}
    if len(found) != 1:
        return None
    scores = found.pop()
    if not all(SCALE_MIN <= s <= SCALE_MAX for s in scores):
        return None
    return scores


@dataclasses.dataclass(frozen=True)
class JudgeResult:
    """Both orders' verdicts of one instruction and, when both parse, the averaged assessment."""

    teacher_first: tuple[float, float] | None  # (teacher, student) as Assistants 1 and 2
    student_first: tuple[float, float] | None  # (student, teacher) as Assistants 1 and 2

    @property
    def parsed(self) -> int:
        """How many of the two judgements could be read (the parse rate counts these)."""
        return (self.teacher_first is not None) + (self.student_first is not None)

    def assessment(self) -> Assessment | None:
        """MmDC's Eq. 5 with positions exchanged and the two runs averaged; None (the instruction is
        excluded) unless both judgements parse, since one order alone carries the position bias the
        second run exists to cancel."""
        if self.teacher_first is None or self.student_first is None:
            return None
        teacher = (self.teacher_first[0] + self.student_first[1]) / 2
        student = (self.teacher_first[1] + self.student_first[0]) / 2
        return Assessment(teacher=teacher, student=student)


def judge(teacher_first_text: str, student_first_text: str) -> JudgeResult:
    return JudgeResult(parse_judge_scores(teacher_first_text), parse_judge_scores(student_first_text))


def is_difficult(assessment: Assessment, tau: float) -> bool:
    """MmDC: S ≥ τ is difficult (τ = 0: everything; τ > 1: nothing, since S ≤ 1 on the 1–10 scale)."""
    return assessment.difficulty() >= tau


# ---------------------------------------------------------------------------------------------
# Augmentation: the diversity filter
# ---------------------------------------------------------------------------------------------

ROUGE_L_LIMIT = 0.7


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two instructions (Google's `rouge-score`, tokenised and stemmed as there)."""
    return _rouge_l_scorer().score(a, b)["rougeL"].fmeasure


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def diversity_check(candidate: str, others: Iterable[tuple[str, str]], limit: float = ROUGE_L_LIMIT) -> tuple[bool, str | None]:
    """Whether ``candidate`` may join its image's instructions: its ROUGE-L with every one of
    ``others`` ((id, question) pairs) must be below ``limit``.  Returns (accepted, reason if not)."""
    for other_id, question in others:
        score = rouge_l(candidate, question)
        if score >= limit:
            return False, f"ROUGE-L {score:.2f} >= {limit:g} with {other_id}"
    return True, None


def clean_generated_question(text: str) -> str:
    """The augmentor's question: its first non-empty line, without a "Created Question:" label or
    surrounding quotes (MmDC asks for one sentence and no answer)."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            line = re.sub(r"^(?:created\s+question|question)\s*:\s*", "", line, flags=re.IGNORECASE)
            return line.strip().strip("\"'“”").strip()
    return ""


# ---------------------------------------------------------------------------------------------
# Balancing and the pools' update
# ---------------------------------------------------------------------------------------------


def balance(difficult: int, easy_ids: Sequence[str], seed: int, iteration: int) -> list[str]:
    """The easy instructions trained beside ``difficult`` difficult ones: a seeded sample of
    ``min(difficult, len(easy_ids))`` of them, in their pool order; all of them when nothing is
    difficult (τ = 1 trains on easy instructions alone, MmDC's "w/o diff. Inst.")."""
    if difficult == 0:
        return list(easy_ids)
    count = min(difficult, len(easy_ids))
    chosen = set(random.Random(f"{seed}:{iteration}").sample(list(easy_ids), count))
    return [i for i in easy_ids if i in chosen]


@dataclasses.dataclass
class PoolUpdate:
    tuning: list[dict[str, Any]]
    cache: list[dict[str, Any]]
    sampled_easy: list[str]


def update_pools(tuning: Sequence[dict[str, Any]], cache: Sequence[dict[str, Any]], accepted: Sequence[dict[str, Any]], seed: int, iteration: int) -> PoolUpdate:
    """The pools of the next iteration (MmDC §3.3.3).

    ``cache`` rows carry this iteration's ``label`` (difficult, easy, or None when excluded);
    ``accepted`` are the new instructions that passed the diversity filter, each with ``parent_id``.
    Next tuning pool: every new instruction in place of its parent, the difficult instructions left
    without an accepted replacement, a balanced sample of the easy ones (:func:`balance`), and the
    excluded rows that were in it (an unreadable judgement says nothing either way).  Next cache
    pool: this one plus the new instructions.
    """
    replaced = {row["parent_id"] for row in accepted}
    in_tuning = {row["id"] for row in tuning}
    difficult_kept = [row for row in cache if row.get("label") == "difficult" and row["id"] not in replaced]
    easy = [row for row in cache if row.get("label") == "easy"]
    sampled = balance(len(accepted) + len(difficult_kept), [row["id"] for row in easy], seed, iteration)
    keep = {row["id"] for row in difficult_kept} | set(sampled) | {row["id"] for row in cache if row.get("label") is None and row["id"] in in_tuning}
    next_tuning = [dict(row) for row in cache if row["id"] in keep] + [dict(row) for row in accepted]
    return PoolUpdate(tuning=next_tuning, cache=[dict(row) for row in cache] + [dict(row) for row in accepted], sampled_easy=sampled)


# ---------------------------------------------------------------------------------------------
# Pool files
# ---------------------------------------------------------------------------------------------

ROW_FIELDS = ("id", "image", "question")


def read_pool(path: Path) -> list[dict[str, Any]]:
    """The usable rows of a pool file (rejected ones skipped); a malformed line is one sentence."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SdrtError(f"pool file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SdrtError(f"pool file {path} cannot be read: {exc}") from None
    rows, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise SdrtError(f"pool file {path}, line {number}: not a JSON object") from None
        if not isinstance(row, dict):
            raise SdrtError(f"pool file {path}, line {number}: not a JSON object")
        for key in ROW_FIELDS:
            if key not in row:
                raise SdrtError(f"pool file {path}, line {number}: field {key!r} is missing")
        image = row["image"]
        if not isinstance(image, dict) or not isinstance(image.get("index"), int) or image["index"] < 0:
            raise SdrtError(f"pool file {path}, line {number}: field 'image' must be {{\"index\": N, \"id\": ID}} with N >= 0")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise SdrtError(f"pool file {path}, line {number}: field 'question' must be a non-empty string")
        if row["id"] in seen:
            raise SdrtError(f"pool file {path}, line {number}: id {row['id']!r} appears twice")
        seen.add(row["id"])
        if row.get("status") != "rejected":
            rows.append(row)
    return rows
