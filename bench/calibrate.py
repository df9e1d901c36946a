"""The honest control of `sdrt calibrate`: is MmDC's calibration better than spending the same traced
records on plain dataset examples?

On the fidelity benchmark's data, settings and splits (`bench/fidelity.py`, same --work: its train and
test trace stores are reused), in the paper's distillation setting (reft, mse+kl with raw MSE, rank 4,
3 epochs; K = 4 ensemble with the cross-entropy predictor):

1. `sdrt calibrate` on the first N `train` examples for I iterations (MmDC's loop: instruction tuning,
   assessment by the judge, augmentation, distillation warm-started from the previous iteration);
2. E = the instructions calibration traced beyond the N it started from; the CONTROL distils the same
   paper setting on the first N + E plain `train` examples of the fidelity benchmark's train store (no
   assessment, no augmentation), so both students were taught by the same number of traced records;
3. on the untouched `test` store (256 examples): per student, the KL gap to its own (most confident)
   two-step teacher closed and the extracted-answer accuracy of its greedy single-step answer, with 95%
   bootstrap intervals, and the paired accuracy difference calibrated − control;
4. the seconds each calibration phase cost and the judge's parse rate.

    python bench/calibrate.py [--train-examples 64] [--iterations 2] [--tau 0.33] [--assessor judge] [--work runs/bench-fidelity]
    python bench/calibrate.py --smoke --work /tmp/bench-smoke   # the tiny backbone, a few examples: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity  # noqa: E402  (the shared stores, settings and measurement)

ENSEMBLE = "calibrate"  # the name `sdrt calibrate` gives each iteration's ensemble


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-examples", type=int, default=64, help="N: the train examples calibration starts from.")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--tau", type=float, default=0.33)
    parser.add_argument("--assessor", default="judge", choices=("judge", "metric"))
    parser.add_argument("--store-train-examples", type=int, default=128, help="the fidelity benchmark's train store size (the control's pool)")
    parser.add_argument("--test-examples", type=int, default=256, help="the fidelity benchmark's test store size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-fidelity"), help="the fidelity benchmark's --work (its stores are reused)")
    parser.add_argument("--smoke", action="store_true", help="the tiny backbone, a few examples: only checks that the script runs (never written)")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.smoke:
        fidelity.BACKBONE = "llava-next-tiny"
        fidelity.TRACE_SETTINGS.update(max_new_tokens_step1=4, max_new_tokens_step2=4)
        args.train_examples, args.iterations, args.store_train_examples, args.test_examples = 2, 2, 8, 4
        args.no_write = True
    return args


def calibrate(stages: fidelity.Stages, args) -> Path:
    """`sdrt calibrate` with the fidelity benchmark's trace settings and the paper's distillation."""
    from sdrt_cli.cli import main as sdrt

    sets = [f"traces.{k}={v}" for k, v in fidelity.TRACE_SETTINGS.items() if not k.startswith("max_new_tokens")]
    sets += ["traces.prompts=4"] + [f"distill.{k}={v}" for k, v in fidelity.CONFIGS["paper"]["distill"].items()]
    argv = [
        "calibrate", "--dataset", fidelity.DATASET, "--split", "train", "--limit", args.train_examples,
        *[a for o in fidelity.DATASET_OPTIONS for a in ("--dataset-option", o)], "--backbone", fidelity.BACKBONE,
        "--iterations", args.iterations, "--tau", args.tau, "--assessor", args.assessor,
        "--max-new-tokens", fidelity.TRACE_SETTINGS["max_new_tokens_step2"], "--max-new-tokens-step1", fidelity.TRACE_SETTINGS["max_new_tokens_step1"],
        *[a for s in sets for a in ("--set", s)],
    ]
    out = stages.work / f"calibrate-{fidelity.key_of(argv)}"
    stages.use("calibrate")
    if len(iteration_reports(out)) < args.iterations:
        started = time.perf_counter()
        try:
            sdrt([str(a) for a in [*argv, "--out", out]])
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise SystemExit(f"`sdrt {' '.join(map(str, argv))}` failed") from None
        stages.note("calibrate", time.perf_counter() - started)
    return out


def iteration_reports(run: Path) -> list[dict[str, Any]]:
    """The per-iteration summaries of a calibrate run's report.json (none before its first iteration)."""
    try:
        return json.loads((run / "report.json").read_text())["iterations"]
    except FileNotFoundError:
        return []


def extra_instructions(run: Path, iterations: int) -> int:
    """Instructions calibration traced beyond the ones it started from."""
    def ids(path: Path) -> set[str]:
        return {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}

    start = ids(run / "iter-1" / "tuning.jsonl")
    traced = set().union(*(ids(run / f"iter-{n}" / "tuning.jsonl") for n in range(1, iterations + 1)))
    return len(traced - start)


def measure(backbone, store_dir: Path, students: dict[str, Path], stages: fidelity.Stages) -> dict[str, Any]:
    """Per-record rows of the untouched model (the fidelity benchmark's, cached) and of each K = 4 student."""
    per = {"base": fidelity.measure_split(backbone, store_dir, {}, ["base"], stages)["base"]}
    for name, (adapters, ensemble) in students.items():
        per[name] = fidelity.ensemble_rows(backbone, store_dir, name, adapters, ensemble, stages)
    return per


ASSESSORS = {
    "judge": "the same backbone judges with MmDC's Table 6 prompt",
    "metric": "the dataset's metric on gold answers, mapped to 1–10; generated questions have no gold and are excluded from assessment",
}


def report(args, command: str, per, prompts, iterations: list[dict[str, Any]], extra: int, stages: fidelity.Stages, seconds: float) -> tuple[str, dict[str, Any]]:
    from _results import machine
    from sdrt_cli.fidelity import most_confident_teachers
    from sdrt_cli.stats import mean_interval

    chosen = most_confident_teachers(per["base"])
    rows = {name: fidelity.fidelity_row(per, name, "own", prompts, chosen) for name in ("control", "calibrated")}
    scores = {name: fidelity.by_example(per[name], None, lambda r: r["student_score"]) for name in ("base", "control", "calibrated")}
    examples = sorted(scores["base"], key=int)
    difference = mean_interval([scores["calibrated"][e] - scores["control"][e] for e in examples]).as_dict()
    prompt = mean_interval([scores["base"][e] for e in examples]).as_dict()
    if difference["low"] > 0:
        verdict = "calibration wins on accuracy (the paired interval lies above 0)"
    elif difference["high"] < 0:
        verdict = "the control wins on accuracy (the paired interval lies below 0)"
    else:
        verdict = "neither wins on accuracy: the paired interval includes 0"
    gaps = {name: rows[name]["gap_closed"] for name in rows}
    if gaps["calibrated"]["low"] > gaps["control"]["high"]:
        kl_verdict = "calibration closes more of the KL gap (the intervals do not overlap)"
    elif gaps["control"]["low"] > gaps["calibrated"]["high"]:
        kl_verdict = "the control closes more of the KL gap (the intervals do not overlap)"
    else:
        kl_verdict = "the KL-gap intervals overlap"
    phases: dict[str, float] = {}
    for it in iterations:
        for stage, value in (it.get("seconds") or {}).items():
            phases[stage] = phases.get(stage, 0.0) + float(value)
    parse_rates = [it.get("parse_rate") for it in iterations]
    lines = [
        "## Calibration (MmDC) vs the same records on plain examples (issue 17)",
        "",
        f"`{command}` (after `python bench/fidelity.py`, whose train and test stores it reuses)",
        "",
        f"Machine: {machine()}. {stages.runtime_line(seconds)}",
        "",
        f"`{fidelity.BACKBONE}`, `{fidelity.DATASET}` with facts in text, the fidelity benchmark's trace settings; both students are K = 4 in "
        f"{fidelity.CONFIGS['paper']['describe']}. **Calibrated**: `sdrt calibrate` on `train` examples 0–{args.train_examples - 1}, "
        f"{args.iterations} iterations, τ = {args.tau:g}, assessor `{args.assessor}` ({ASSESSORS[args.assessor]}); "
        f"it traced {extra} instructions beyond its {args.train_examples} ({extra * len(prompts)} records). **Control**: the same distillation on "
        f"plain `train` examples 0–{args.train_examples + extra - 1}. Test: `test` examples 0–{args.test_examples - 1}, untouched by both.",
        "",
        "| student | gap closed vs its own teacher | same answer as the teacher | accuracy | minus prompt (points) |",
        "|---|---:|---:|---:|---:|",
        f"| prompt (no adapter) | – | – | {fidelity.pct(prompt)} | – |",
    ]
    for name in ("control", "calibrated"):
        row = rows[name]
        minus = mean_interval([scores[name][e] - scores["base"][e] for e in examples]).as_dict()
        lines.append(f"| {name} | {fidelity.pct(row['gap_closed'])} | {fidelity.pct(row['agreement'])} | {fidelity.pct(row['accuracy'])} | {fidelity.signed_pct(minus)} |")
    lines += [
        "",
        f"Paired accuracy difference calibrated − control: {fidelity.signed_pct(difference)} points: **{verdict}**; {kl_verdict}.",
        "",
        "Per iteration (from the run's report): "
        + "; ".join(
            f"{n + 1}: tuning pool {it.get('tuning_pool')}, difficult {it.get('difficult')}, easy {it.get('easy')}, excluded {it.get('excluded')}, "
            f"mean S {it.get('mean_difficulty') if it.get('mean_difficulty') is None else round(it['mean_difficulty'], 3)}, "
            f"new questions {it.get('new_questions', 0)} (accepted {it.get('accepted', 0)})"
            for n, it in enumerate(iterations)
        )
        + ".",
        "",
        ("Judge parse rate (both orders readable) per iteration: " + ", ".join("–" if r is None else f"{100 * r:.0f}%" for r in parse_rates) + ". "
         if args.assessor == "judge" else "")
        + "Seconds per calibration phase, summed over iterations: "
        + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
        + ".",
    ]
    raw = {
        "command": command, "machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}, "extra_instructions": extra,
        "rows": rows, "prompt_accuracy": prompt, "accuracy_difference": difference, "verdict": verdict, "kl_verdict": kl_verdict,
        "iterations": iterations, "phase_seconds": phases, "timings_s": stages.timings, "total_seconds": seconds,
    }
    return "\n".join(lines), raw


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages, command, started = fidelity.start("calibrate", args.work, args.threads)
    test_store = stages.traces("test", args.test_examples)
    train_store = stages.traces("train", args.store_train_examples)
    run = calibrate(stages, args)
    extra = extra_instructions(run, args.iterations)
    if args.train_examples + extra > args.store_train_examples:
        raise SystemExit(f"the control needs {args.train_examples + extra} plain train examples; the train store holds {args.store_train_examples}: raise --store-train-examples")
    control = stages.distill(f"control-{args.train_examples + extra}", fidelity.CONFIGS["paper"], train_store, args.train_examples + extra)
    from sdrt_cli.ensemble import saved_ensembles

    stages.timed(
        "ensemble_control", "ensemble",
        {"adapters": str(control), "traces": str(train_store), "backbone": fidelity.BACKBONE, "members": "4", "name": ENSEMBLE, "seed": 0},
        done=ENSEMBLE in saved_ensembles(control),
    )

    from sdrt_cli.backbone import load_backbone
    from sdrt_cli.trace_store import TraceStore

    backbone = load_backbone(fidelity.BACKBONE, device="cpu", dtype="auto", seed=0)
    students = {"control": (control, ENSEMBLE), "calibrated": (run / f"iter-{args.iterations}" / "adapters", ENSEMBLE)}
    per = measure(backbone, test_store, students, stages)
    prompts = TraceStore(test_store).prompt_ids
    markdown, raw = report(args, command, per, prompts, iteration_reports(run)[: args.iterations], extra, stages, time.perf_counter() - started)
    print(markdown)
    if not args.no_write:
        from _results import write_section

        write_section("calibrate", markdown, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
