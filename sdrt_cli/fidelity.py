"""How close the single-step student is to its stored two-step teacher.

Per (example, teacher prompt) of a trace store made on held-out examples, a student (the untouched
model, or the model with an adapter ensemble) is scored at the teacher's answer rows by
KL(teacher ‖ student) (:mod:`sdrt_cli.teacher_forcing`) and by whether its own greedy answer agrees
with the teacher's.  ``sdrt demo`` and ``bench/fidelity.py`` both measure with :func:`measure_students`.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sdrt_cli.errors import SdrtError


def normalise_answer(text: str) -> str:
    """Lower-cased, whitespace collapsed, ends stripped: what exact agreement compares."""
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_agreement(student: str, teacher: str) -> bool:
    return normalise_answer(student) == normalise_answer(teacher)


def prefix_agreement(student_ids: Sequence[int], teacher_ids: Sequence[int], eos_ids: Sequence[int] = ()) -> float:
    """Common token prefix over the longer answer (trailing EOS dropped from both): 1.0 only for
    identical sequences, 0.0 when the first tokens differ; two empty answers agree fully."""
    a = list(student_ids)
    b = list(teacher_ids)
    if a and a[-1] in eos_ids:
        a = a[:-1]
    if b and b[-1] in eos_ids:
        b = b[:-1]
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared / longest


def gap_closed(kl_student: float, kl_base: float) -> float:
    """Fraction of the base model's KL to the teacher that the student removes (1 = all, < 0 = worse)."""
    if kl_base <= 0:
        raise ValueError(f"the base model's KL must be positive to measure a gap, got {kl_base}")
    return 1.0 - kl_student / kl_base


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def most_confident_teachers(records: dict[str, dict[str, Any]]) -> set[str]:
    """Per example, the key of the record whose teacher was most confident (ties: the earlier prompt):
    the trace the ensemble predictor is trained to pick (SDRT 3.2.4), so the K-member ensemble's own teacher."""
    best: dict[str, tuple[float, str]] = {}
    for key, row in records.items():  # records are in prompt order per example
        if row["example"] not in best or row["confidence"] > best[row["example"]][0]:
            best[row["example"]] = (row["confidence"], key)
    return {key for _, key in best.values()}


def summarise(per_record: dict[str, dict[str, dict[str, Any]]], student: str, prompts: Sequence[str], keys: set[str] | None = None) -> dict[str, Any]:
    """Means over the student's records for ``prompts`` (and only ``keys`` when given)."""
    rows = [r for key, r in per_record[student].items() if r["prompt"] in prompts and (keys is None or key in keys)]
    return {
        "records": len(rows),
        "kl": mean(r["kl"] for r in rows),
        "exact": mean(float(r["exact"]) for r in rows),
        "prefix": mean(r["prefix"] for r in rows),
        "first_token": mean(float(r["first_token"]) for r in rows),
    }


@dataclass
class Student:
    """What is measured: ``ensemble`` None is the untouched model; ``prompts`` are the teachers it is compared with;
    ``keys`` (``"<index>:<prompt>"``), when given, limits it to those records (oracle routing measures each
    prompt's adapter only where that prompt's teacher is the one routed to)."""

    ensemble: Any
    prompts: list[str]
    keys: set[str] | None = None


def measure_students(
    backbone,
    store,
    students: dict[str, Student],
    max_new_tokens: int,
    batch_size: int = 8,
    data_dir=None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score every student against the teacher records of ``store`` (a ``TraceStore`` of held-out examples).

    Returns ``{"prompts", "examples", "per_record": {student: {"<index>:<prompt>": row}}}``; a row holds
    the teacher's confidence, the student's KL at the answer rows, exact / prefix / first-token
    agreement of the student's greedy answer with the teacher's, both answers, and, where the split has
    gold answers, both answers' scores under the dataset's metric (``student_score``, ``teacher_score``).
    """
    import torch

    from sdrt_cli.ensemble import open_store_dataset
    from sdrt_cli.evaluate import GenerationSettings, generate_single_step
    from sdrt_cli.metrics import get_metric
    from sdrt_cli.teacher_forcing import AnswerTarget, answer_logits

    dataset = open_store_dataset(store, data_dir)
    metric = get_metric(dataset.metric) if dataset.has_answers else None
    prompts = store.prompt_ids
    wanted = set(store.example_indices)
    examples = {i: ex for i, ex in enumerate(dataset) if i in wanted}
    indices = sorted(examples)
    records = {(i, p): store.record(i, p) for i in indices for p in prompts}
    for (i, _), rec in records.items():
        if rec.example_id != examples[i].id:
            raise SdrtError(f"trace store {store.root}: example {i} is {rec.example_id!r}, but its dataset's example {i} is {examples[i].id!r}")
    targets = {key: AnswerTarget.of(rec) for key, rec in records.items()}
    eos = list(backbone.eos_token_ids)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)

    per_record: dict[str, dict[str, dict[str, Any]]] = {}
    for name, student in students.items():
        started = time.perf_counter()
        rows: dict[str, dict[str, Any]] = {}
        ensemble = student.ensemble
        context = ensemble.attach(backbone) if ensemble is not None else contextlib.nullcontext()
        measured = [i for i in indices if student.keys is None or any(f"{i}:{p}" in student.keys for p in student.prompts)]
        with context as handle, torch.no_grad():
            vision = ensemble.vision if ensemble is not None else None
            for start in range(0, len(measured), batch_size):
                part = measured[start : start + batch_size]
                exs = [examples[i] for i in part]
                answers = [[targets[(i, p)] for p in student.prompts] for i in part]
                logits = answer_logits(backbone, dataset, exs, answers, steer=handle, vision=vision)
                greedy = generate_single_step(backbone, dataset, exs, settings, "fidelity", steer=handle, vision=vision)
                for b, i in enumerate(part):
                    for a, p in enumerate(student.prompts):
                        if student.keys is not None and f"{i}:{p}" not in student.keys:
                            continue
                        rec = records[(i, p)]
                        rows[f"{i}:{p}"] = {
                            "example": rec.example_id,
                            "prompt": p,
                            "confidence": float(rec.confidence),
                            "kl": float(targets[(i, p)].kl(logits[b][a])),
                            "exact": exact_agreement(greedy[b].output, rec.y2),
                            "prefix": prefix_agreement(greedy[b].output_ids, rec.y2_ids, eos),
                            "first_token": bool(greedy[b].output_ids[:1] == rec.y2_ids[:1]),
                            "student_answer": greedy[b].output,
                            "teacher_answer": rec.y2,
                            "student_score": metric.score(greedy[b].output, exs[b]) if metric else None,
                            "teacher_score": metric.score(rec.y2, exs[b]) if metric else None,
                        }
        per_record[name] = rows
        if log is not None:
            log(f"measured {name}: {time.perf_counter() - started:.0f} s")
    return {"prompts": prompts, "examples": len(indices), "per_record": per_record}


# -- the demo's question: did the single-step student move toward its two-step teacher? --------------


def read_scores(predictions: Path) -> dict[str, float]:
    """Per-example scores of an eval run's ``predictions/METHOD.jsonl`` (example id -> score)."""
    scores: dict[str, float] = {}
    for line in predictions.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("score") is not None:
                scores[row["id"]] = float(row["score"])
    return scores


def compare_with_teacher(backbone, heldout_store, ensemble, eval_dir, max_new_tokens: int, batch_size: int = 8) -> dict[str, Any]:
    """Accuracy of prompt, cot and sdrt (from the eval run ``eval_dir``), and for the plain model and the
    model with ``ensemble``: KL to the most confident two-step teacher of each held-out example and exact
    agreement with that teacher's answer, each with its 95% bootstrap interval."""
    from sdrt_cli.stats import gap_closed_interval, mean_interval

    measured = measure_students(
        backbone, heldout_store, {"prompt": Student(None, heldout_store.prompt_ids), "sdrt": Student(ensemble, heldout_store.prompt_ids)}, max_new_tokens, batch_size
    )
    per = measured["per_record"]
    chosen = sorted(most_confident_teachers(per["prompt"]), key=lambda key: int(key.split(":")[0]))
    rows: dict[str, dict[str, Any]] = {}
    for method in ("prompt", "cot", "sdrt"):
        path = Path(eval_dir) / "predictions" / f"{method}.jsonl"
        scores = read_scores(path) if path.exists() else {}
        rows[method] = {"accuracy": mean_interval(list(scores.values())).as_dict() if scores else None}
    for method in ("prompt", "sdrt"):
        kls = [per[method][key]["kl"] for key in chosen]
        rows[method]["kl"] = mean_interval(kls).as_dict()
        rows[method]["agreement"] = mean_interval([float(per[method][key]["exact"]) for key in chosen]).as_dict()
    gap = gap_closed_interval([per["sdrt"][key]["kl"] for key in chosen], [per["prompt"][key]["kl"] for key in chosen])
    return {"examples": len(chosen), "teacher": "per example, the most confident of the pack's two-step teachers", "rows": rows, "gap_closed": gap.as_dict(), "per_record": per}


def teacher_table_markdown(result: dict[str, Any]) -> str:
    """The demo's comparison table: accuracy for every method, KL and agreement with the teacher for the single-step ones."""
    from sdrt_cli.stats import Estimate

    def cell(value: dict[str, Any] | None, percent: bool = True) -> str:
        if value is None:
            return "–"
        estimate = Estimate(**value)
        if percent:
            return estimate.percent()
        if estimate.low is None:
            return f"{estimate.value:.3f}"
        return f"{estimate.value:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"

    labels = {"prompt": "Prompting (single step)", "cot": "Two-step prompting (cot, first prompt)", "sdrt": "SDRT (single step + adapters)"}
    rows = result["rows"]
    lines = [
        f"Held-out examples: {result['examples']}; teacher: {result['teacher']}; 95% bootstrap intervals.",
        "",
        "| method | accuracy | KL to the teacher (lower is closer) | same answer as the teacher |",
        "|---|---|---|---|",
    ]
    for method in ("prompt", "cot", "sdrt"):
        row = rows[method]
        lines.append(f"| {labels[method]} | {cell(row.get('accuracy'))} | {cell(row.get('kl'), percent=False)} | {cell(row.get('agreement'))} |")
    gap = result["gap_closed"]
    if gap["value"] != gap["value"]:  # NaN: no gap to close
        verdict = "The plain model's KL to the teacher is zero here, so there is no gap to close."
    elif gap["low"] is None:
        verdict = f"SDRT closes {cell(gap)} of the plain model's KL gap to the teacher (too few examples for an interval)."
    elif gap["low"] > 0:
        verdict = f"SDRT closes {cell(gap)} of the plain model's KL gap to the teacher: the single-step student moved toward its two-step teacher."
    else:
        verdict = f"SDRT closes {cell(gap)} of the plain model's KL gap to the teacher: the interval includes 0, so this run does not show the student moving toward its teacher."
    lines += ["", verdict]
    return "\n".join(lines)
