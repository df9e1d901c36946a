"""The report of a calibration run, per iteration from its files: RUN/report.md, report.json and
report.png (the shape of MmDC's Figure 4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdrt_cli.calibration.pools import Run, read_rows, recorded_configuration


def iteration_summary(run: Run, n: int) -> dict[str, Any] | None:
    """What iteration N did, from its files; None until its assessment is written.  ``heldout``:
    the student's accuracy on --eval-split with its 95% bootstrap interval."""
    assessed_path = run.iteration_dir(n) / "assessed.jsonl"
    if not assessed_path.exists():
        return None
    assessed = [row for row in read_rows(assessed_path) if row.get("assessed_in") == n]
    scored = [row for row in assessed if row.get("difficulty") is not None]
    summary: dict[str, Any] = {
        "iteration": n,
        "tuning_pool": len(read_rows(run.tuning(n))),
        "cache_pool": len(assessed),
        "assessed": len(scored),
        "excluded": len(assessed) - len(scored),
        "difficult": sum(1 for row in scored if row["label"] == "difficult"),
        "easy": sum(1 for row in scored if row["label"] == "easy"),
        "mean_difficulty": round(sum(row["difficulty"] for row in scored) / len(scored), 4) if scored else None,
        "mean_teacher_score": round(sum(row["scores"]["teacher"] for row in scored) / len(scored), 3) if scored else None,
        "mean_student_score": round(sum(row["scores"]["student"] for row in scored) / len(scored), 3) if scored else None,
    }
    if run.opts["assessor"] == "judge":
        parsed = sum(row.get("judgements_parsed") or 0 for row in assessed)
        summary["judgements"] = 2 * len(assessed)
        summary["judgements_parsed"] = parsed
        summary["parse_rate"] = round(parsed / (2 * len(assessed)), 4) if assessed else None
    augmented_path = run.iteration_dir(n) / "augmented.jsonl"
    if augmented_path.exists():
        candidates = read_rows(augmented_path)
        accepted = sum(1 for row in candidates if row["status"] == "accepted")
        summary["new_questions"] = len(candidates)
        summary["accepted"] = accepted
        summary["acceptance_rate"] = round(accepted / len(candidates), 4) if candidates else None
    sampled = run.iteration_dir(n) / "sampled_easy.jsonl"
    if sampled.exists():
        summary["sampled_easy"] = len(read_rows(sampled))
        summary["next_tuning_pool"] = len(read_rows(run.tuning(n + 1)))
    predictions = run.iteration_dir(n) / "heldout" / "predictions" / "sdrt.jsonl"
    if predictions.exists():
        from sdrt_cli.fidelity import read_scores
        from sdrt_cli.stats import mean_interval

        estimate = mean_interval(list(read_scores(predictions).values()))
        summary["heldout_accuracy"] = estimate.as_dict()
        summary["heldout"] = estimate.percent()
    seconds = {}
    for marker in sorted((run.iteration_dir(n) / "stages").glob("*.done")):
        seconds[marker.stem] = json.loads(marker.read_text())["seconds"]
    summary["seconds"] = seconds
    return summary


REPORT_COLUMNS = (
    ("iteration", "Iteration"), ("tuning_pool", "Tuning pool"), ("cache_pool", "Cache pool"), ("difficult", "Difficult"), ("easy", "Easy"),
    ("excluded", "Excluded"), ("mean_difficulty", "Mean S"), ("parse_rate", "Parse rate"), ("new_questions", "New questions"),
    ("acceptance_rate", "Acceptance"), ("sampled_easy", "Easy sampled"), ("next_tuning_pool", "Next tuning pool"),
    ("heldout", "Held-out accuracy (95% CI)"),
)


def alignment_summary(run: Run) -> dict[str, Any] | None:
    """The alignment stage of a finished --align (None otherwise): its projector, steps, examples,
    final training loss and seconds."""
    marker = run.marker(0, "align")
    if run.projector is None or not marker.exists():
        return None
    from sdrt_cli.distill import read_manifest

    manifest = read_manifest(run.align_dir)
    return {
        "projector": run.projector,
        "steps": manifest["training"]["steps"],
        "examples": len(manifest["training"]["train_examples"]),
        "train_loss": manifest["metrics"]["gold"]["train_loss"],
        "seconds": json.loads(marker.read_text())["seconds"],
    }


def write_report(run: Run) -> None:
    from sdrt_cli.io import atomic_write_text

    summaries = [s for s in (iteration_summary(run, n) for n in range(1, run.opts["iterations"] + 1)) if s is not None]
    columns = [(key, label) for key, label in REPORT_COLUMNS if any(key in s for s in summaries)]
    lines = [
        f"# Calibration: {run.opts['dataset']} ({run.opts['split']}), tau {run.opts['tau']:g}, assessor {run.opts['assessor']}, teacher {run.opts['teacher']}",
        "",
        "| " + " | ".join(label for _, label in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for s in summaries:
        lines.append("| " + " | ".join("–" if s.get(key) is None else str(s[key]) for key, _ in columns) + " |")
    lines += ["", "Mean S: mean difficulty (MmDC Eq. 6) of the assessed instructions; parse rate: judgements whose verdict could be read;",
              "excluded: instructions without a usable assessment (unreadable judgement, or no gold answer with --assessor metric)."]
    alignment = alignment_summary(run)
    if alignment is not None:
        lines += ["", f"Alignment (MmDC stage 1, --align): projector {alignment['projector']} trained {alignment['steps']} steps on "
                      f"{alignment['examples']} examples in {alignment['seconds']:.0f} s, final train CE {alignment['train_loss']:.4g}."]
    document = {"configuration": recorded_configuration(run.opts), **({"alignment": alignment} if alignment else {}), "iterations": summaries}
    atomic_write_text(run.out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(run.out / "report.json", json.dumps(document, indent=2) + "\n")
    if summaries:
        plot_iterations(summaries, run.out / "report.png")


def plot_iterations(summaries: list[dict[str, Any]], path: Path) -> None:
    """Difficult/easy counts and mean difficulty over the iterations (the shape of MmDC's Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["iteration"] for s in summaries]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.plot(x, [s["difficult"] for s in summaries], marker="o", label="difficult")
    left.plot(x, [s["easy"] for s in summaries], marker="o", label="easy")
    left.plot(x, [s["tuning_pool"] for s in summaries], marker="s", label="tuning pool")
    left.set_xlabel("iteration")
    left.set_xticks(x)
    left.legend(fontsize=7)
    right.plot(x, [float("nan") if s["mean_difficulty"] is None else s["mean_difficulty"] for s in summaries], marker="o", label="mean difficulty S")
    if any("heldout_accuracy" in s for s in summaries):  # the student's held-out accuracy, as in MmDC's Figure 4
        right.plot(x, [s["heldout_accuracy"]["value"] if "heldout_accuracy" in s else float("nan") for s in summaries], marker="s", label="held-out accuracy")
    right.set_xlabel("iteration")
    right.legend(fontsize=7)
    right.set_xticks(x)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
