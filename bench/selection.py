"""Which traces should teach? Trace selection measured on train / dev / untouched test (issue 20).

Runs on the fidelity benchmark's stores (`bench/fidelity.py`, same --work: its train, dev and test
trace stores and its paper-setting adapters are reused, not redone). On the same train store, the
paper's setting (`sdrt distill`'s defaults with raw MSE, rank 4, 3 epochs; `sdrt ensemble` K = 4) is
distilled once per selection rule, and the K = 4 ensemble is trained with each label rule:

* `--select all` (the paper), `correct`, `beats-student` (docs/selection.md);
* `--label confident` (the paper) and `correct-then-confident`.

Every student's task accuracy (`extracted_relaxed_accuracy` of its greedy single-step answer, the path
`sdrt eval` uses) is measured on **dev**; the rule with the best dev accuracy is "dev-chosen" (ties go
to the paper's rule) and is what `sdrt demo` uses. Then every student is reported once on **test**
with 95% bootstrap intervals, its paired difference to plain prompting and to the paper's rules, and
the teachers' own accuracy (each two-step prompt, and the most confident of the four).

Goals (issue 20): sdrt with selection is never worse than prompting (the interval of the difference
includes or exceeds 0); where two-step prompting beats prompting (its interval excludes 0), sdrt
recovers at least half of that gain.

    python bench/selection.py [--work runs/bench-fidelity]   # after (or instead of) bench/fidelity.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity  # noqa: E402  (the shared stores, settings and measurement)

# (distill --select, ensemble --label); the first is the paper's
RULES: list[tuple[str, str]] = [
    ("all", "confident"),
    ("correct", "confident"),
    ("beats-student", "confident"),
    ("all", "correct-then-confident"),
]
PAPER = RULES[0]


def rule_name(rule: tuple[str, str]) -> str:
    return f"select {rule[0]} · label {rule[1]}"


def adapters_for(stages: fidelity.Stages, select: str, train_store: Path, examples: int, min_records: int) -> Path:
    config = dict(fidelity.CONFIGS["paper"])
    if select != "all":  # `all` is the fidelity benchmark's own paper-setting run, reused as is
        config = {**config, "distill": {**config["distill"], "select": select, "min_records": min_records}}
    return stages.distill(distill_name(select), config, train_store, examples)


def distill_name(select: str) -> str:
    return "paper" if select == "all" else f"paper-{select}"


def ensemble_name(label: str) -> str:
    return "k4" if label == "confident" else "k4-correct"


def train_ensembles(stages: fidelity.Stages, adapters: dict[str, Path], train_store: Path) -> None:
    # the fidelity benchmark's K = 1 of the paper's run: its measurement cache is keyed by both ensembles
    stages.ensemble("paper", adapters["all"], train_store, "k1", 1, 0)
    from sdrt_cli.ensemble import saved_ensembles

    for select, label in RULES:
        name = ensemble_name(label)
        path = adapters[select]
        stages.timed(
            f"ensemble_{distill_name(select)}_{name}", "ensemble",  # the paper's K = 4 is the fidelity benchmark's own
            {"adapters": str(path), "traces": str(train_store), "backbone": fidelity.BACKBONE, "members": "4", "name": name, "seed": 0, "label": label},
            done=name in saved_ensembles(path) and fidelity.ensemble_training(path, name).get("label", "confident") == label,
        )


def measure(backbone, store_dir: Path, adapters: dict[str, Path], stages: fidelity.Stages) -> dict[str, dict[str, Any]]:
    """Per-record rows of the untouched model and of each rule's K = 4 student on one held-out store (cached)."""
    # the untouched model's and the paper rules' rows are the fidelity benchmark's own (same cache files)
    shared = fidelity.measure_split(backbone, store_dir, {"paper": adapters["all"]}, ["base", "paper:k4"], stages)
    per = {"base": shared["base"], rule_name(PAPER): shared["paper:k4"]}
    for rule in RULES[1:]:
        select, label = rule
        name = ensemble_name(label)
        per[rule_name(rule)] = fidelity.ensemble_rows(backbone, store_dir, f"select-{select}-{name}", adapters[select], name, stages)
    return per


def accuracy_table(per: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
    """Accuracy of prompting, of each two-step teacher and of each rule's student, with paired differences."""
    from sdrt_cli.fidelity import most_confident_teachers
    from sdrt_cli.stats import mean_interval

    base = fidelity.by_example(per["base"], None, lambda r: r["student_score"])
    examples = sorted(base, key=int)
    scores: dict[str, dict[str, float]] = {"prompt": base}
    for p in prompts:
        scores[f"two-step {p}"] = fidelity.by_example(per["base"], {k for k in per["base"] if k.endswith(f":{p}")}, lambda r: r["teacher_score"])
    scores["two-step, most confident of 4"] = fidelity.by_example(per["base"], most_confident_teachers(per["base"]), lambda r: r["teacher_score"])
    for rule in RULES:
        scores[rule_name(rule)] = fidelity.by_example(per[rule_name(rule)], None, lambda r: r["student_score"])
    paper = scores[rule_name(PAPER)]
    table = {}
    for label, values in scores.items():
        table[label] = {
            "accuracy": mean_interval([values[e] for e in examples]).as_dict(),
            "minus_prompt": mean_interval([values[e] - base[e] for e in examples]).as_dict(),
            "minus_paper_rule": mean_interval([values[e] - paper[e] for e in examples]).as_dict() if label in {rule_name(r) for r in RULES} else None,
        }
    return {"examples": len(examples), "rows": table}


def dev_choice(dev: dict[str, Any]) -> tuple[str, str]:
    """The rule with the best dev accuracy; ties keep the paper's (listed first)."""
    best = max(RULES, key=lambda r: (dev["rows"][rule_name(r)]["accuracy"]["value"], -RULES.index(r)))
    return best


def verdicts(test: dict[str, Any], chosen: tuple[str, str], prompts: list[str]) -> list[str]:
    rows = test["rows"]
    lines = []
    student = rows[rule_name(chosen)]
    low = student["minus_prompt"]["low"]
    high = student["minus_prompt"]["high"]
    where = "includes 0" if low <= 0 <= high else "lies above 0" if low > 0 else "lies below 0"
    lines.append(
        f"* **Never worse than prompting** (the dev-chosen rule's difference to prompting: its interval includes or exceeds 0): "
        f"{'MET' if high >= 0 else 'NOT MET'} ({fidelity.signed_pct(student['minus_prompt'])} points; the interval {where})."
    )
    gains = {t: rows[t]["minus_prompt"] for t in [f"two-step {p}" for p in prompts] + ["two-step, most confident of 4"]}
    better = {t: g for t, g in gains.items() if g["low"] > 0}
    if not better:
        lines.append(
            "* **Recovers half of two-step's gain**: does not apply here: no two-step teacher beats prompting on test "
            "(every teacher's difference interval includes or lies below 0): "
            + ", ".join(f"{t} {fidelity.signed_pct(g)}" for t, g in gains.items()) + "."
        )
    else:
        for teacher, gain in better.items():
            recovered = student["minus_prompt"]["value"] / gain["value"]
            lines.append(
                f"* **Recovers half of the gain of {teacher}** ({fidelity.signed_pct(gain)} points over prompting): "
                f"{'MET' if recovered >= 0.5 else 'NOT MET'} on the point estimates ({100 * recovered:.0f}% recovered)."
            )
    return lines


def build_report(args, command: str, stages: fidelity.Stages, dev, test, chosen, counts, prompts, seconds: float) -> tuple[str, dict[str, Any]]:
    from _results import machine

    lines = [
        "## Trace selection: train / dev / test, 95% intervals (issue 20)",
        "",
        f"`{command}` (after `python bench/fidelity.py`, whose stores and paper-setting adapters it reuses)",
        "",
        f"Machine: {machine()}. {stages.runtime_line(seconds)}",
        "",
        f"The fidelity benchmark's data and splits (`{fidelity.BACKBONE}`, `{fidelity.DATASET}` with facts in text; train = `train` "
        f"0–{args.train_examples - 1}, dev = `validation` 0–{args.dev_examples - 1}, test = `test` 0–{args.test_examples - 1}). "
        f"Every student is K = 4 in {fidelity.CONFIGS['paper']['describe']}; only the selection rule changes. "
        "Gold answers come from the train store only.",
        "",
        "Records each rule kept per prompt (of the train store's): "
        + "; ".join(f"`{select}` " + ", ".join(f"{p} {c['kept']}/{c['total']}" for p, c in per_prompt.items()) for select, per_prompt in counts.items())
        + ".",
        "",
        "Decided on dev (accuracy): " + ", ".join(f"{rule_name(r)} {fidelity.pct(dev['rows'][rule_name(r)]['accuracy'])}" for r in RULES)
        + f" → **{rule_name(chosen)}**.",
        "",
        f"### Test: {test['examples']} examples",
        "",
        "| method | cost | accuracy | minus prompt (points) | minus the paper's rules (points) |",
        "|---|---|---:|---:|---:|",
    ]
    for label, row in test["rows"].items():
        cost = {"prompt": "1 step", "two-step, most confident of 4": "8 steps"}.get(label, "2 steps" if label.startswith("two-step") else "1 step + adapters")
        mark = " (dev-chosen)" if label == rule_name(chosen) else " (the paper)" if label == rule_name(PAPER) else ""
        lines.append(
            f"| {label}{mark} | {cost} | {fidelity.pct(row['accuracy'])} | {fidelity.signed_pct(row['minus_prompt']) if label != 'prompt' else '–'} | "
            f"{fidelity.signed_pct(row['minus_paper_rule']) if row['minus_paper_rule'] and label != rule_name(PAPER) else '–'} |"
        )
    lines += ["", *verdicts(test, chosen, prompts), ""]
    lines += [
        f"Dev ({dev['examples']} examples), the rows the choice was made from:",
        "",
        "| method | accuracy | minus prompt (points) |",
        "|---|---:|---:|",
    ]
    for label, row in dev["rows"].items():
        lines.append(f"| {label} | {fidelity.pct(row['accuracy'])} | {fidelity.signed_pct(row['minus_prompt']) if label != 'prompt' else '–'} |")
    lines += [
        "",
        "Accuracy: `extracted_relaxed_accuracy` of the greedy answer (16 tokens; docs/metrics.md). Paired differences and "
        "95% intervals: percentile bootstrap over examples (2,000 resamplings, seeded). Dev has only "
        f"{dev['examples']} examples, so the choice between rules whose dev accuracies differ by a few examples is weak; the "
        "test table is what to read.",
    ]
    raw = {
        "command": command, "machine": machine(), "settings": vars(args), "rules": [list(r) for r in RULES], "timings_s": stages.timings,
        "selection_counts": counts, "dev_chosen": list(chosen), "dev": dev, "test": test, "total_seconds": seconds,
    }
    return "\n".join(lines), raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-examples", type=int, default=128)
    parser.add_argument("--dev-examples", type=int, default=32)
    parser.add_argument("--test-examples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/bench-fidelity", help="the fidelity benchmark's --work (its stores are reused)")
    parser.add_argument("--smoke", action="store_true", help="end to end in minutes on the tiny random backbone (numbers meaningless; never written)")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write bench/RESULTS.md")
    args = parser.parse_args()
    if args.smoke:
        fidelity.BACKBONE = "llava-next-tiny"
        fidelity.TRACE_SETTINGS.update(max_new_tokens_step1=4, max_new_tokens_step2=4)
        args.no_write = True  # a random model answers nothing right: --min-records 0 lets `correct` train empty adapters
    stages, command, started = fidelity.start("selection", Path(args.work), args.threads)
    stores = {role: stages.traces(role, limit) for role, limit in (("test", args.test_examples), ("dev", args.dev_examples), ("train", args.train_examples))}
    adapters = {select: adapters_for(stages, select, stores["train"], args.train_examples, 0 if args.smoke else 1) for select in dict.fromkeys(s for s, _ in RULES)}
    train_ensembles(stages, adapters, stores["train"])
    from sdrt_cli.distill import read_manifest

    counts = {select: read_manifest(path).get("selection", {}).get("counts") or {} for select, path in adapters.items() if select != "all"}

    from sdrt_cli.backbone import load_backbone
    from sdrt_cli.trace_store import TraceStore

    backbone = load_backbone(fidelity.BACKBONE, device="cpu", dtype="auto", seed=0)
    prompts = TraceStore(stores["test"]).prompt_ids
    dev = accuracy_table(measure(backbone, stores["dev"], adapters, stages), prompts)
    chosen = dev_choice(dev)
    test = accuracy_table(measure(backbone, stores["test"], adapters, stages), prompts)
    markdown, raw = build_report(args, command, stages, dev, test, chosen, counts, prompts, time.perf_counter() - started)
    print(markdown)
    if not args.no_write:
        from _results import write_section

        write_section("selection", markdown, raw)


if __name__ == "__main__":
    main()
