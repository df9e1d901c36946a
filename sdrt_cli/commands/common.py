"""Options and helpers shared by several commands (one definition each)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sdrt_cli import distributed
from sdrt_cli.errors import SdrtError

CONFIG = typer.Option(None, "--config", help="TOML run config; flags > config file > defaults.", show_default=False)
BACKBONE = typer.Option("llava-next", "--backbone", help="Registered backbone name (see `sdrt plugins`).")
MODEL = typer.Option(None, "--model", help="Checkpoint: local directory or Hugging Face cache id (backbone default if omitted).", show_default=False)
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


def parse_key_values(pairs: list[str] | str | None, flag: str = "--dataset-option") -> dict[str, Any]:
    """``["size=10", "facts_in_text=true"]`` -> {"size": 10, "facts_in_text": True}."""
    if not pairs:
        return {}
    if isinstance(pairs, str):
        pairs = [p for p in pairs.split(",") if p]
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SdrtError(f"{flag} {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = _coerce(value.strip())
    return out


def _coerce(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def open_recorded_backbone(recorded, opts: dict[str, Any]):
    """The backbone a run recorded (``recorded``, a :class:`~sdrt_cli.backbone.BackboneRecord`, or None),
    rebuilt with its factory options; --backbone and --model override it, --device and --model-dtype
    place it.  Without a record, --backbone (default llava-next) loads from the flags."""
    from sdrt_cli.backbone import load_recorded_backbone

    name = opts.get("backbone") or (None if recorded is not None else "llava-next")
    return load_recorded_backbone(recorded, name, opts.get("model"), device=opts["device"], dtype=opts["model_dtype"], seed=opts["seed"])


def open_dataset(name: str | None, data_dir: Path | None, split: str | None, limit: int | None, seed: int, options: dict[str, Any]):
    from sdrt_cli.data import open_dataset as instantiate

    if not name:
        raise SdrtError("choose a dataset with --dataset (see `sdrt datasets list`)")
    try:
        return instantiate(name, data_dir=data_dir, split=split, limit=limit, seed=seed, **options)
    except TypeError as exc:
        raise SdrtError(f"dataset {name!r} does not accept these options {sorted(options)}: {exc}") from None


def parse_int_list(text: str | None, flag: str) -> list[int]:
    if text is None or str(text).strip() == "":
        return []
    try:
        return [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise SdrtError(f"{flag} {text!r} is not a comma-separated list of integers") from None


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "examples", completed: int = 0) -> Iterator[Any]:
    """A Rich progress bar with rate and ETA on rank 0; a silent stand-in on other ranks.
    ``completed`` starts a resumed run's bar where it stopped."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not distributed.is_main(),
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, completed=completed, rate="")

        class Bar:
            def advance(self, n: int = 1) -> None:
                progress.advance(task, n)
                speed = progress.tasks[0].speed
                if speed:
                    progress.update(task, rate=f"{speed:.2f} {unit}/s")

        yield Bar()


# Examples generated together when --batch-size is not given: (on a CPU, on a GPU).  The GPU numbers
# fill a 40-80 GB card with LLaVA-1.6 7B at ~3k-token prompts (its KV cache is 128 KiB per token and
# row): eval's 32 rows take ~13 GiB, traces' 4 examples x 8 prompts ~14 GiB, beside 15 GB of weights.
GENERATION_BATCH = {"traces": (2, 4), "eval": (4, 32)}


def generation_batch_size(command: str, requested: int | None, device: str) -> int:
    """``requested``, or the command's default for the device the run will use."""
    if requested is not None:
        return requested
    import torch

    on_cpu, on_gpu = GENERATION_BATCH[command]
    if device in (None, "auto"):
        return on_gpu if torch.cuda.is_available() else on_cpu
    try:
        kind = torch.device(device).type
    except RuntimeError:  # a bad --device is refused, in one sentence, where the backbone loads
        kind = "cpu"
    return on_gpu if kind == "cuda" else on_cpu


def write_and_announce_report(out: Path) -> Path:
    """Write ``OUT/report.html`` with a progress bar and print its path (how eval, ablate and demo end)."""
    from sdrt_cli.report import write_report

    path = write_report(out, progress_factory=progress_bar)
    typer.echo(f"Report: {path}")
    return path
