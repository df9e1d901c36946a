"""Check the pipelines `bench/gpu_smoke.sh` ran: finite outputs, agreement with the CPU fp32 reference, throughput.

Each pipeline directory holds ``traces/`` (a trace store), ``adapters/`` (a distill run with its
ensemble), ``eval/`` (predictions) and ``timings.jsonl`` (one line per stage, with the peak GPU memory
nvidia-smi saw).  Checks, per compared pipeline:

* every tensor stored anywhere under it (``*.safetensors``: trace shards, adapters, the ensemble
  predictor) and every loss and score it logged is finite;
* traces: the share of records whose generated tokens (y1 and y2) equal the reference's, and on
  those records the relative difference of the stored hidden states (``‖a − b‖ / ‖b‖``);
* eval: the share of identical answers per method, and each method's score difference, which may not
  exceed the share of answers that differ (a score moves only through a different answer).

Tolerances are per precision (``TOLERANCES``): fp32 on a GPU must reproduce the CPU run up to float
summation order; bf16 only has to stay finite and close where it generated the same tokens, because
with random weights the next-token distributions are nearly flat and bf16 rounding changes argmaxes.

    python bench/gpu_smoke_check.py OUT --reference cpu-fp32 --compare cuda-fp32:fp32 --compare cuda-bf16:bf16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

# what a compared pipeline must meet; None = reported, not enforced
TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {"token_agreement": 0.9, "hidden_relative": 1e-3, "answer_agreement": 0.9},
    "bf16": {"token_agreement": None, "hidden_relative": 0.1, "answer_agreement": None},
}


def nonfinite_tensors(root: Path) -> list[str]:
    """``file: tensor`` for every stored floating-point tensor under ``root`` holding a NaN or an infinity."""
    import torch
    from safetensors import safe_open

    found = []
    for path in sorted(root.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    found.append(f"{path.relative_to(root)}: {name}")
    return found


def nonfinite_numbers(root: Path) -> list[str]:
    """Losses in distill metrics, confidences in trace indexes, scores in eval results that are not finite."""
    found = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            found.append(where)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")

    for path in sorted(root.rglob("*.jsonl")) + sorted(root.rglob("results.json")):
        lines = path.read_text(encoding="utf-8").splitlines() if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]
        for number, line in enumerate(lines, 1):
            if line.strip():
                walk(json.loads(line), f"{path.relative_to(root)}:{number}")
    return found


def compare_traces(reference: Path, other: Path) -> dict[str, Any]:
    from sdrt_cli.trace_store import TraceStore

    ref, run = TraceStore(reference), TraceStore(other)
    same, differences, total = 0, [], 0
    for record in ref.records():
        total += 1
        try:
            mine = run.record(record.example_index, record.prompt_id)
        except KeyError:
            continue
        if (mine.y1_ids, mine.y2_ids) != (record.y1_ids, record.y2_ids):
            continue
        same += 1
        expected = record.hidden.float()
        differences.append(float((mine.hidden.float() - expected).norm() / expected.norm().clamp_min(1e-12)))
    return {
        "records": total,
        "token_agreement": same / total if total else None,
        "hidden_relative": max(differences) if differences else None,
    }


def read_predictions(eval_dir: Path) -> dict[str, dict[str, dict]]:
    return {
        path.stem: {line["id"]: line for line in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if line}
        for path in sorted((eval_dir / "predictions").glob("*.jsonl"))
    }


def compare_eval(reference: Path, other: Path) -> dict[str, Any]:
    ref, run = read_predictions(reference), read_predictions(other)
    methods = {}
    for method, answers in ref.items():
        mine = run.get(method, {})
        same = sum(1 for key, line in answers.items() if key in mine and mine[key]["output"] == line["output"])
        scores = [(line["score"], mine[key]["score"]) for key, line in answers.items() if key in mine and line["score"] is not None]
        methods[method] = {
            "examples": len(answers),
            "answer_agreement": same / len(answers) if answers else None,
            "score_reference": sum(a for a, _ in scores) / len(scores) if scores else None,
            "score": sum(b for _, b in scores) / len(scores) if scores else None,
        }
    return methods


def throughput(pipeline: Path) -> list[dict[str, Any]]:
    path = pipeline / "timings.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []
    for row in rows:
        row["examples_per_s"] = row["examples"] / row["seconds"] if row["seconds"] > 0 else None
    return rows


def check(out: Path, reference: str, compared: list[tuple[str, str]]) -> tuple[dict[str, Any], list[str]]:
    """The report and the list of failures (empty: the smoke test passed)."""
    failures: list[str] = []
    report: dict[str, Any] = {"reference": reference, "pipelines": {}}
    for name in [reference] + [n for n, _ in compared]:
        root = out / name
        if not root.is_dir():
            failures.append(f"{root} does not exist: the pipeline {name!r} did not run")
            continue
        bad = nonfinite_tensors(root) + nonfinite_numbers(root)
        failures += [f"{name}: non-finite {where}" for where in bad]
        report["pipelines"][name] = {"nonfinite": bad, "throughput": throughput(root)}
    for name, precision in compared:
        if precision not in TOLERANCES:
            failures.append(f"--compare {name}:{precision}: the precision is not one of {', '.join(TOLERANCES)}")
            continue
        if name not in report["pipelines"] or reference not in report["pipelines"]:
            continue
        limits = TOLERANCES[precision]
        from sdrt_cli.errors import SdrtError

        try:
            traces = compare_traces(out / reference / "traces", out / name / "traces")
        except SdrtError as exc:  # a store that does not open (corrupt, missing) is a failure of its own
            failures.append(f"{name}: {exc}")
            continue
        evals = compare_eval(out / reference / "eval", out / name / "eval")
        report["pipelines"][name].update(precision=precision, tolerances=limits, traces=traces, eval=evals)
        if limits["token_agreement"] is not None and (traces["token_agreement"] or 0) < limits["token_agreement"]:
            failures.append(f"{name}: {traces['token_agreement']:.0%} of trace records generated the reference's tokens (at least {limits['token_agreement']:.0%})")
        if traces["hidden_relative"] is not None and traces["hidden_relative"] > limits["hidden_relative"]:
            failures.append(f"{name}: stored hidden states differ from the reference by {traces['hidden_relative']:.1e} relative (at most {limits['hidden_relative']:.0e})")
        for method, result in evals.items():
            agreement = result["answer_agreement"] or 0.0
            if limits["answer_agreement"] is not None and agreement < limits["answer_agreement"]:
                failures.append(f"{name}: eval {method}: {agreement:.0%} of answers equal the reference's (at least {limits['answer_agreement']:.0%})")
            if result["score"] is not None and abs(result["score"] - result["score_reference"]) > 1 - agreement + 1e-9:
                failures.append(f"{name}: eval {method}: the score moved by more than the share of differing answers")
    return report, failures


def print_report(report: dict[str, Any], failures: list[str]) -> None:
    print(f"reference: {report['reference']}")
    for name, pipeline in report["pipelines"].items():
        print(f"\n== {name}")
        for row in pipeline["throughput"]:
            memory = f", peak GPU memory {row['peak_gpu_mib'] / 1024:.1f} GiB" if row.get("peak_gpu_mib") else ""
            rate = f"{row['examples_per_s']:.2f}" if row["examples_per_s"] else "-"
            print(f"  {row['stage']:<9} {row['seconds']:7.1f} s  {rate:>7} examples/s ({row['examples']} examples, {row['processes']} process(es)){memory}")
        if "traces" in pipeline:
            traces = pipeline["traces"]
            hidden = f"{traces['hidden_relative']:.1e}" if traces["hidden_relative"] is not None else "-"
            print(f"  traces: {traces['token_agreement']:.0%} of {traces['records']} records with the reference's tokens; hidden states within {hidden} relative")
            for method, result in pipeline["eval"].items():
                score = f", score {result['score']:.3f} vs {result['score_reference']:.3f}" if result["score"] is not None else ""
                print(f"  eval {method}: {result['answer_agreement']:.0%} of {result['examples']} answers equal{score}")
    print()
    if failures:
        print("FAILED:\n" + "\n".join(f"  {f}" for f in failures))
    else:
        print("PASSED: every stored tensor is finite and the compared pipelines are within tolerance")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder gpu_smoke.sh wrote (one subfolder per pipeline)")
    parser.add_argument("--reference", default="cpu-fp32")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME:PRECISION", help="a pipeline and its precision (fp32 or bf16)")
    args = parser.parse_args(argv)
    compared = []
    for item in args.compare:
        name, _, precision = item.partition(":")
        compared.append((name, precision or "fp32"))
    report, failures = check(args.out, args.reference, compared)
    (args.out / "report.json").write_text(json.dumps({**report, "failures": failures}, indent=2) + "\n")
    print_report(report, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
