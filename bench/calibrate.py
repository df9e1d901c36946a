"""The honest control of `sdrt calibrate`: is calibration better than spending the same traced
records on plain dataset examples?

On `llava-smollm2-demo` and `synthetic-charts` (facts stated in the question), the script

1. runs `sdrt calibrate` on the first N `train` examples for I iterations (MmDC's loop: assessment,
   augmentation, distillation warm-started from the previous iteration);
2. counts the instructions calibration traced beyond the N it started from (E), and trains the
   CONTROL: traces of the first N + E plain `train` examples (no assessment, no augmentation), distill
   and ensemble with the same options;
3. on H examples of the untouched `test` split, for the base model, the control and the calibrated
   student: the KL gap closed against the two-step teacher's held-out traces
   (``1 - KL_student / KL_base`` at the answer rows, as `bench/fidelity.py` measures it) and the
   extracted-answer accuracy of `sdrt eval --method sdrt`, each with a 95% bootstrap interval
   (`sdrt_cli/stats.py`), and the paired accuracy difference calibrated - control;
4. reports which wins (or that the intervals overlap), the seconds each phase cost, and the judge's
   parse rate (with --assessor judge).

    python bench/calibrate.py [--train-examples 64] [--iterations 2] [--tau 0.33] [--assessor judge]
        [--heldout-examples 64] [--prompts 4] [--epochs 3] [--work runs/bench-calibrate]
    python bench/calibrate.py --smoke      # the tiny backbone, a few examples: checks the script runs

Every stage is resumable: the same command continues an interrupted bench.  Results:
WORK/results.json and WORK/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

BACKBONE = "llava-smollm2-demo"
DATASET = "synthetic-charts"
DATASET_OPTIONS = ["facts_in_text=true"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--train-examples", type=int, default=64, help="N: the examples calibration starts from.")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--tau", type=float, default=0.33)
    parser.add_argument("--assessor", default="judge", choices=("judge", "metric"))
    parser.add_argument("--heldout-examples", type=int, default=64, help="H: examples of the test split measured.")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-new-tokens-step1", type=int, default=64)
    parser.add_argument("--max-new-tokens-step2", type=int, default=16)
    parser.add_argument("--pos", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-calibrate"))
    parser.add_argument("--smoke", action="store_true", help="The tiny backbone and a few examples: only checks that the script runs.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.train_examples, args.iterations, args.heldout_examples = "llava-next-tiny", 2, 2, 2
        args.prompts, args.epochs, args.max_new_tokens_step1, args.max_new_tokens_step2, args.pos = 2, 1, 4, 4, 3
    return args


def sdrt(*argv: Any) -> None:
    """``sdrt ARGV`` in this process; a failure stops the bench with the command's own message."""
    from sdrt_cli.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise SystemExit(f"`sdrt {' '.join(map(str, argv))}` failed") from None


def trace_options(args) -> list[str]:
    return [
        "--prompts", args.prompts, "--pos", args.pos, "--max-new-tokens-step1", args.max_new_tokens_step1,
        "--max-new-tokens-step2", args.max_new_tokens_step2, "--store-dtype", "fp32",
    ]


def data_options() -> list[str]:
    return [arg for option in DATASET_OPTIONS for arg in ("--dataset-option", option)]


def calibrated(args) -> Path:
    out = args.work / "calibrate"
    sets = [f"traces.{k.lstrip('-').replace('-', '_')}={v}" for k, v in zip(trace_options(args)[::2], trace_options(args)[1::2])]
    sdrt(
        "calibrate", "--dataset", DATASET, "--split", "train", "--limit", args.train_examples, *data_options(),
        "--backbone", args.backbone, "--iterations", args.iterations, "--tau", args.tau, "--assessor", args.assessor,
        "--max-new-tokens", args.max_new_tokens_step2, "--max-new-tokens-step1", args.max_new_tokens_step1,
        *[arg for s in sets for arg in ("--set", s)], "--set", f"distill.epochs={args.epochs}", "--out", out,
    )
    return out


def extra_instructions(run: Path, iterations: int) -> int:
    """Instructions calibration traced beyond the ones it started from."""
    ids: set[str] = set()
    for n in range(1, iterations + 1):
        ids |= {json.loads(line)["id"] for line in (run / f"iter-{n}" / "tuning.jsonl").read_text().splitlines()}
    start = {json.loads(line)["id"] for line in (run / "iter-1" / "tuning.jsonl").read_text().splitlines()}
    return len(ids - start)


def stage(out: Path, action) -> float | None:
    """Run ``action`` unless ``out/.done`` says it finished; its seconds (None when reused)."""
    done = out / ".done"
    if done.exists():
        return json.loads(done.read_text())["seconds"]
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"seconds": seconds}) + "\n")
    return seconds


def control(args, examples: int) -> tuple[Path, dict[str, float | None]]:
    """Traces, distill and ensemble on the first ``examples`` plain train examples."""
    base = args.work / f"control-{examples}"
    traces, adapters = base / "traces", base / "adapters"
    seconds = {
        "traces": stage(base / "stage-traces", lambda: sdrt(
            "traces", "--dataset", DATASET, "--split", "train", "--limit", examples, *data_options(), "--backbone", args.backbone,
            *trace_options(args), "--out", traces)),
        "distill": stage(base / "stage-distill", lambda: sdrt(
            "distill", "--traces", traces, "--epochs", args.epochs, "--out", adapters, *(["--resume"] if adapters.exists() else []))),
        "ensemble": stage(base / "stage-ensemble", lambda: sdrt("ensemble", "--adapters", adapters, "--traces", traces, "--name", "calibrate")),
    }
    return adapters, seconds


def heldout(args) -> tuple[Path, Path]:
    store = args.work / "heldout-traces"
    stage(args.work / "stage-heldout", lambda: sdrt(
        "traces", "--dataset", DATASET, "--split", "test", "--limit", args.heldout_examples, *data_options(),
        "--backbone", args.backbone, *trace_options(args), "--out", store))
    return store, args.work / "eval"


def accuracy(args, name: str, adapters: Path) -> dict[str, float]:
    from sdrt_cli.fidelity import read_scores

    out = args.work / "eval" / name
    stage(out.parent / f"stage-{name}", lambda: sdrt(
        "eval", "--dataset", DATASET, "--split", "test", "--limit", args.heldout_examples, *data_options(), "--backbone", args.backbone,
        "--method", "sdrt", "--adapters", adapters, "--ensemble", "calibrate", "--max-new-tokens", args.max_new_tokens_step2,
        "--no-report", "--out", out))
    return read_scores(out / "predictions" / "sdrt.jsonl")


def per_example_kl(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """A student's KL per held-out example (mean over the prompts' teachers)."""
    sums: dict[str, list[float]] = {}
    for row in rows.values():
        sums.setdefault(row["example"], []).append(row["kl"])
    return {example: sum(v) / len(v) for example, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from sdrt_cli.backbone import load_backbone
    from sdrt_cli.ensemble import load_ensemble
    from sdrt_cli.fidelity import Student, measure_students
    from sdrt_cli.stats import bootstrap, gap_closed_interval, mean_interval
    from sdrt_cli.trace_store import TraceStore

    started = time.perf_counter()
    run = calibrated(args)
    extra = extra_instructions(run, args.iterations)
    control_adapters, control_seconds = control(args, args.train_examples + extra)
    calibrated_adapters = run / f"iter-{args.iterations}" / "adapters"
    store_dir, _ = heldout(args)

    store = TraceStore(store_dir)
    backbone = load_backbone(args.backbone, seed=0)
    students = {
        "base": Student(None, store.prompt_ids),
        "control": Student(load_ensemble(control_adapters, backbone, "calibrate"), store.prompt_ids),
        "calibrated": Student(load_ensemble(calibrated_adapters, backbone, "calibrate"), store.prompt_ids),
    }
    measured = measure_students(backbone, store, students, args.max_new_tokens_step2)
    kl = {name: per_example_kl(rows) for name, rows in measured["per_record"].items()}
    examples = sorted(kl["base"])
    scores = {"control": accuracy(args, "control", control_adapters), "calibrated": accuracy(args, "calibrated", calibrated_adapters)}
    common = sorted(set(scores["control"]) & set(scores["calibrated"]))
    result: dict[str, Any] = {
        "backbone": args.backbone, "dataset": DATASET, "dataset_options": DATASET_OPTIONS,
        "train_examples": args.train_examples, "iterations": args.iterations, "tau": args.tau, "assessor": args.assessor,
        "extra_instructions": extra, "extra_records": extra * args.prompts, "control_examples": args.train_examples + extra,
        "heldout_examples": len(examples),
        "kl_gap_closed": {name: gap_closed_interval([kl[name][e] for e in examples], [kl["base"][e] for e in examples]).as_dict() for name in ("control", "calibrated")},
        "accuracy": {name: mean_interval([scores[name][e] for e in common]).as_dict() for name in ("control", "calibrated")},
        "accuracy_difference": bootstrap([(scores["calibrated"][e], scores["control"][e]) for e in common], lambda pairs: sum(a - b for a, b in pairs) / len(pairs)).as_dict(),
        "seconds": {
            "calibrate": json.loads((run / "report.json").read_text())["iterations"],
            "control": control_seconds,
            "total": time.perf_counter() - started,
        },
    }
    report = json.loads((run / "report.json").read_text())["iterations"]
    result["judge_parse_rate"] = [s.get("parse_rate") for s in report]
    difference = result["accuracy_difference"]
    if difference["low"] is not None and difference["low"] > 0:
        verdict = "calibration wins on accuracy (the paired 95% interval lies above 0)"
    elif difference["high"] is not None and difference["high"] < 0:
        verdict = "the control wins on accuracy (the paired 95% interval lies below 0)"
    else:
        verdict = "no winner on accuracy: the paired 95% interval contains 0"
    result["verdict"] = verdict
    (args.work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Calibration vs the same records on plain examples ({args.backbone}, {DATASET} facts_in_text, test split)",
        "",
        (
            f"Calibration: {args.train_examples} train examples, {args.iterations} iterations, tau {args.tau:g}, assessor {args.assessor}; "
            f"it traced {extra} extra instructions ({extra * args.prompts} records). Control: the first {args.train_examples + extra} plain train examples."
        ),
        "",
        "| Student | KL gap closed (95% CI) | Accuracy (95% CI) |",
        "|---|---|---|",
    ]
    for name in ("control", "calibrated"):
        gap, acc = result["kl_gap_closed"][name], result["accuracy"][name]
        lines.append(f"| {name} | {fmt(gap)} | {fmt(acc)} |")
    lines += ["", f"Paired accuracy difference (calibrated - control): {fmt(difference)}. {verdict}.",
              f"Judge parse rate per iteration: {result['judge_parse_rate']}. Total time {result['seconds']['total']:.0f} s."]
    (args.work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def fmt(estimate: dict[str, Any]) -> str:
    value, low, high = estimate["value"], estimate["low"], estimate["high"]
    if low is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


if __name__ == "__main__":
    sys.exit(main())
