"""Options and helpers shared by several commands (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from sdrt_cli.errors import SdrtError

CONFIG = typer.Option(None, "--config", help="TOML run config; flags > config file > defaults.", show_default=False)
BACKBONE = typer.Option("llava-next", "--backbone", help="Registered backbone name (see `sdrt plugins`).")
MODEL = typer.Option(None, "--model", help="Checkpoint: local directory or Hugging Face cache id (backbone default if omitted).", show_default=False)
PROJECTOR = typer.Option(
    None, "--projector",
    help="Load a trained multimodal projector into the backbone: a `sdrt distill --adapter projector` output or one of its adapter directories (MmDC's aligned model; recorded, so later stages reuse it).",
    show_default=False,
)
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (auto = this rank's GPU, else CPU).")
MODEL_DTYPE = typer.Option("auto", "--model-dtype", help="Weights dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.")
SEED = typer.Option(0, "--seed", help="Seed for random backbones, sampling and training.")
DATASET = typer.Option(None, "--dataset", help="Registered dataset name, e.g. docvqa, chartqa, mmmu, synthetic-charts.", show_default=False)
DATA_DIR = typer.Option(None, "--data-dir", help="Local directory or file of the dataset (formats: see README).", show_default=False)
SPLIT = typer.Option(None, "--split", help="Dataset split (the dataset's default if omitted).", show_default=False)
LIMIT = typer.Option(None, "--limit", min=1, help="Use only the first N examples.", show_default=False)
DATASET_OPTION = typer.Option([], "--dataset-option", help="Extra dataset option KEY=VALUE (repeatable), e.g. facts_in_text=true.")
TEMPERATURE = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy; > 0 samples (seeded per example from --seed, independent of batching).")
REPORT = typer.Option(True, "--report/--no-report", help="Write report.html (a self-contained page of the results, see `sdrt report`) at the end.")
TOP_P = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0).")


def open_recorded_backbone(recorded, opts: dict[str, Any]):
    """The backbone a run recorded (``recorded``, a :class:`~sdrt_cli.backbone.BackboneRecord`, or None),
    rebuilt with its factory options and its trained projector, if any; --backbone, --model and
    --projector override it, --device and --model-dtype place it.  Without a record, --backbone
    (default llava-next) loads from the flags."""
    from sdrt_cli.backbone import load_recorded_backbone

    name = opts.get("backbone") or (None if recorded is not None else "llava-next")
    return load_recorded_backbone(
        recorded, name, opts.get("model"), opts.get("projector"), device=opts["device"], dtype=opts["model_dtype"], seed=opts["seed"]
    )


def parse_int_list(text: str | None, flag: str) -> list[int]:
    if text is None or str(text).strip() == "":
        return []
    try:
        return [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise SdrtError(f"{flag} {text!r} is not a comma-separated list of integers") from None


def write_and_announce_report(out: Path) -> Path:
    """Write ``OUT/report.html`` with a progress bar and print its path (how eval, ablate and demo end)."""
    from sdrt_cli.progress import progress_bar
    from sdrt_cli.report import write_report

    path = write_report(out, progress_factory=progress_bar)
    typer.echo(f"Report: {path}")
    return path
