"""``sdrt calibrate``, the loop: MmDC's distillation calibration on top of self-distillation.

With ``--align``, MmDC's multimodal alignment runs first, in RUN/align/ (``stage_align``: only the
projector trained on the source split's gold answers); every later stage loads the aligned projector.
Each iteration N runs, in RUN/iter-N/, one resumable stage after another (a ``.done`` file or an
atomically written result marks each finished):

1. instruction tuning: ``traces`` of the tuning pool (records of instructions already traced in
   iteration N-1 are copied, only new ones are traced), ``distill`` (warm-started from iteration
   N-1's adapters), ``ensemble``;
2. assessment: ``answers`` (the teacher's and the student's answers to every cache-pool
   instruction), ``judge`` (the assessor scores both answers in both orders; not with
   ``--assessor metric``), ``assess`` (Eq. 5 and Eq. 6: scores, difficulty, difficult or easy);
3. augmentation: ``augment`` (one new question per difficult instruction, ROUGE-L filtered),
   ``update`` (RUN/iter-(N+1)/tuning.jsonl and cache.jsonl).

The instruction-tuning stages run in-process through the CLI commands themselves (``stage_invoker``
of ``sdrt_cli.stages``), so each behaves, resumes and refuses exactly as the command would.  The
``calibrate`` command only parses its options and calls :func:`calibrate`.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import typer

from sdrt_cli.calibration.pools import Run, initial_pools, recorded_configuration
from sdrt_cli.calibration.report import write_report
from sdrt_cli.calibration.stages import STAGES

TUNED_STAGES = ("traces", "distill", "ensemble")
# the options of those stages `sdrt calibrate` sets itself (refused in --set)
SET_BY_CALIBRATE = {
    "traces": {"out", "dataset", "data_dir", "split", "limit", "dataset_option", "pack", "backbone", "model", "device", "model_dtype", "seed", "overwrite", "plan", "projector"},
    "distill": {"traces", "out", "resume", "overwrite", "dataset", "data_dir", "split", "dataset_option", "backbone", "model", "device", "model_dtype", "seed", "init_from", "projector"},
    "ensemble": {"adapters", "traces", "name", "uniform", "backbone", "model", "device", "model_dtype", "seed", "data_dir"},
    # the alignment stage (--align) is a `sdrt distill` run
    "align": {"adapter", "loss", "out", "resume", "overwrite", "traces", "dataset", "data_dir", "split", "limit", "dataset_option", "backbone", "model", "device", "model_dtype", "seed", "init_from", "projector"},
}


def calibrate(opts: dict[str, Any]) -> Path:
    """Run (or resume) the calibration ``opts`` describe (the resolved options of `sdrt calibrate`),
    holding RUN's lock; the run directory."""
    from sdrt_cli.locking import run_lock

    with run_lock(opts["out"], "calibrate"):
        return run_calibrate(opts)


def check_options(opts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Refuse bad options in one sentence before anything is written; the stages' own options."""
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.options import parse_sets
    from sdrt_cli.stages import stage_option_params

    if opts["out"] is None:
        raise SdrtError("choose a run directory with --out")
    if not opts["dataset"]:
        raise SdrtError("choose the dataset the pools start from with --dataset (see `sdrt datasets list`)")
    if opts["assessor"] not in ("judge", "metric"):
        raise SdrtError(f"--assessor {opts['assessor']!r} is not judge or metric")
    if opts["teacher"] not in ("two-step", "single-step"):
        raise SdrtError(f"--teacher {opts['teacher']!r} is not two-step or single-step")
    if opts["eval_split"] is not None and opts["eval_split"] == opts["split"]:
        raise SdrtError(f"--eval-split {opts['eval_split']!r} is the split the pools start from; score the student on an untouched split (e.g. test)")
    params = stage_option_params()
    sets = parse_sets(opts["set_"], {**{stage: params[stage] for stage in TUNED_STAGES}, "align": params["distill"]})
    for stage, options in sets.items():
        for option in options:
            if option in SET_BY_CALIBRATE[stage]:
                raise SdrtError(f"--set {stage}.{option}: `sdrt calibrate` sets this option of the {stage} stage itself; use its own flag or leave it")
    if "align" in sets and not opts.get("align"):
        raise SdrtError(f"--set align.{next(iter(sets['align']))}: there is no alignment stage without --align")
    adapter = sets.get("distill", {}).get("adapter", "reft")
    from sdrt_cli.adapters import weights_adapter

    if weights_adapter(adapter) is not None:
        raise SdrtError(f"--set distill.adapter={adapter}: the student of `sdrt calibrate` is the weighted adapter ensemble, which needs reft or loreft adapters")
    return sets


def check_configuration(out: Path, opts: dict[str, Any]) -> None:
    """Record this run's configuration in RUN/calibrate.json, or refuse another one naming what differs."""
    from sdrt_cli.config import describe_differences
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.io import atomic_write_text

    path = out / "calibrate.json"
    mine = recorded_configuration(opts)
    if path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier != mine:
            raise SdrtError(
                f"{out} holds a calibration with another configuration ({describe_differences(earlier, mine, 'run')}); "
                "rerun with the same options to continue it, or choose another --out"
            )
        return
    atomic_write_text(path, json.dumps(mine, indent=2, sort_keys=True) + "\n")


def run_calibrate(opts: dict[str, Any]) -> Path:
    from sdrt_cli import distributed
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.packs import load_pack
    from sdrt_cli.roles import load_role_pack
    from sdrt_cli.runinfo import write_run_info

    sets = check_options(opts)
    load_pack(opts["pack"])  # a bad pack or role pack is refused before any work
    load_role_pack(opts["roles"])
    distributed.init(opts["device"])
    run = Run(opts, sets)
    # rank 0 reads and writes RUN's own files; every rank learns its verdict, so none waits on a failed peer
    problem = None
    if distributed.is_main():
        try:
            check_configuration(run.out, opts)
            write_run_info(run.out, "calibrate", opts, opts["seed"])
            initial_pools(run)
        except SdrtError as exc:
            problem = str(exc)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise SdrtError(problem)
    from sdrt_cli.stages import stage_invoker

    invoke = stage_invoker(report=False)
    if opts.get("align"):
        from sdrt_cli.calibration.stages import stage_align

        run_stage(run, 0, "align", functools.partial(stage_align, run, invoke))
    for n in range(1, opts["iterations"] + 1):
        for stage, action in STAGES:
            run_stage(run, n, stage, functools.partial(action, run, n, invoke))
        if distributed.is_main():
            write_report(run)
    if distributed.is_main():
        typer.echo(f"Calibration of {opts['iterations']} iterations in {run.out}: pools in {run.out / 'pools'}, report {run.out / 'report.md'}")
    return run.out


def run_stage(run: Run, n: int, stage: str, action) -> float | None:
    """Run one stage unless its marker says it finished; its seconds (None when reused).  Under
    torchrun every rank runs the stage (the generation phases deal their work to the ranks), rank 0
    alone decides whether it runs and marks it finished."""
    from sdrt_cli import distributed
    from sdrt_cli.io import atomic_write_text

    marker = run.marker(n, stage)
    if distributed.broadcast_object(marker.exists()):
        return None
    if distributed.is_main():
        typer.echo(f"iteration {n}: {stage}" if n else stage, err=True)
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    if distributed.is_main():
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"stage": stage, "seconds": round(seconds, 3)}) + "\n")
    distributed.barrier()  # every rank reads what this stage wrote only once it is marked finished
    return seconds
