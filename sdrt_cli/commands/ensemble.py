"""``sdrt ensemble``: train the predictor that weights the adapters per input (SDRT §3.2.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from sdrt_cli.commands import common
from sdrt_cli.progress import progress_bar

HELP = """Train a small predictor that weights the N adapters of a `sdrt distill` run per input.

The predictor reads the input of the first intervened decoder layer at the last prompt token
(computed before any intervention) and outputs weights over K member adapters; each training
example's label is the member prompt whose trace had the highest confidence (mean top-token
probability of its answer) in --traces.  At inference (`sdrt eval --method sdrt`) the weights
are computed and applied inside one forward pass.  --members K keeps the first K prompts (pack
order) or names them; --uniform saves an equal-weight ensemble instead (no training).

--label correct-then-confident uses the gold answers the trace store recorded (its own, traced
split; never the split you evaluate on): an example's label is the most confident member among
those whose traces are right, and the most confident of all when none is.  It needs a store made
on a split with answers; docs/selection.md says when it helps.

--kl-epochs N adds a second phase after the paper's cross-entropy training: the predictor is
fine-tuned end to end on KL(most confident teacher ‖ the weighted ensemble) at the teacher's
answer tokens, the backbone and adapters frozen, keeping the epoch with the lowest KL on the
--holdout examples.  It costs a forward and backward pass of the backbone per example and epoch
(the cross-entropy phase needs one forward per example in all); bench/RESULTS.md measures its gain.

Saved beside the adapters: ADAPTERS/ensembles/NAME/ (adapter.safetensors + adapter.json + run.json),
NAME defaulting to kK or uniform-kK.

Example: sdrt ensemble --adapters runs/adapters/docvqa --traces runs/traces/docvqa --members 4
"""


def register(app: typer.Typer) -> None:
    @app.command("ensemble", help=HELP)
    def ensemble_command(
        ctx: typer.Context,
        adapters: Path = typer.Option(None, "--adapters", help="A `sdrt distill` output directory (reft/loreft adapters).", show_default=False),
        traces: Path = typer.Option(None, "--traces", help="The trace store the adapters were trained on (labels).", show_default=False),
        members: str = typer.Option(None, "--members", help="K = the first K prompts, or comma-separated prompt ids (default: all N).", show_default=False),
        name: str = typer.Option(None, "--name", help="Directory name under ADAPTERS/ensembles/ (default kK, uniform-kK).", show_default=False),
        uniform: bool = typer.Option(False, "--uniform", help="Equal weights 1/K, no predictor (the comparison ensemble)."),
        data_dir: Path = typer.Option(None, "--data-dir", help="Where the traced dataset lives now, if it moved since `sdrt traces`.", show_default=False),
        backbone: str = typer.Option(None, "--backbone", help="Registered backbone (default: the one the adapters were trained on).", show_default=False),
        model: str = typer.Option(None, "--model", help="Checkpoint directory or HF cache id (default: the adapters' backbone source).", show_default=False),
        device: str = common.DEVICE,
        model_dtype: str = common.MODEL_DTYPE,
        label: str = typer.Option(
            "confident", "--label",
            help="Which trace labels each training example: confident (the most confident trace, the paper) or correct-then-confident (the most confident right trace, else the most confident).",
        ),
        steps: int = typer.Option(300, "--steps", min=1, help="Predictor training steps (at most; see --holdout)."),
        lr: float = typer.Option(1e-3, "--lr", min=0.0, help="AdamW learning rate."),
        hidden_size: int = typer.Option(128, "--hidden-size", min=1, help="Predictor MLP width."),
        holdout: float = typer.Option(0.2, "--holdout", min=0.0, max=0.9, help="Fraction of examples held out: the step with their lowest cross-entropy is kept (early stopping), and their accuracy is reported."),
        batch_size: int = typer.Option(4, "--batch-size", min=1, help="Examples per feature forward."),
        kl_epochs: int = typer.Option(0, "--kl-epochs", min=0, help="Epochs of end-to-end KL fine-tuning of the predictor after its cross-entropy training (0: none, the paper's predictor)."),
        kl_lr: float = typer.Option(1e-3, "--kl-lr", min=0.0, help="AdamW learning rate of the KL fine-tuning."),
        kl_batch_size: int = typer.Option(8, "--kl-batch-size", min=1, help="Examples per step of the KL fine-tuning (summed over ranks under torchrun)."),
        seed: int = common.SEED,
        config: Path = common.CONFIG,
    ) -> None:
        from sdrt_cli.config import resolve
        from sdrt_cli.locking import run_lock

        opts = resolve(ctx)
        # the ensemble is saved under ADAPTERS/ensembles/: it writes the distill run directory
        with run_lock(opts["adapters"], "ensemble"):
            run_ensemble(opts)


def run_ensemble(opts: dict[str, Any]) -> Path | None:
    from sdrt_cli import distributed
    from sdrt_cli.ensemble import TrainSettings, build_ensemble
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.runinfo import write_run_info

    if opts["adapters"] is None:
        raise SdrtError("choose the adapters to combine with --adapters DIR (a `sdrt distill` output)")
    if not opts["uniform"] and opts["traces"] is None:
        raise SdrtError("choose the trace store the adapters were trained on with --traces (or build a --uniform ensemble)")
    from sdrt_cli.selection import LABELS

    if opts["label"] not in LABELS:
        raise SdrtError(f"--label {opts['label']!r} is not one of {', '.join(LABELS)}")
    if opts["uniform"] and opts["kl_epochs"]:
        raise SdrtError(f"--kl-epochs {opts['kl_epochs']} fine-tunes a predictor, and a --uniform ensemble has none")
    from sdrt_cli.distill import trained_backbone

    recorded = trained_backbone(opts["adapters"])
    distributed.init(opts["device"])
    # the adapters' backbone, rebuilt with the factory options it was loaded with
    model = common.open_recorded_backbone(recorded, opts)
    settings = TrainSettings(
        steps=opts["steps"], lr=opts["lr"], hidden_size=opts["hidden_size"], holdout=opts["holdout"], seed=opts["seed"],
        kl_epochs=opts["kl_epochs"], kl_lr=opts["kl_lr"], kl_batch_size=opts["kl_batch_size"], label=opts["label"],
    )
    directory, report = build_ensemble(
        opts["adapters"], model, opts["traces"], members=opts["members"], name=opts["name"], uniform=opts["uniform"],
        settings=settings, data_dir=opts["data_dir"], batch_size=opts["batch_size"], progress_bar=progress_bar,
    )
    if distributed.is_main() and directory is not None:
        write_run_info(directory, "ensemble", opts, opts["seed"])
        if opts["uniform"]:
            typer.echo(f"Wrote a uniform ensemble to {directory}")
        elif report.get("single_member"):
            typer.echo(f"Wrote a one-member ensemble to {directory} (its member always has weight 1: nothing to train)")
        else:
            held = report["holdout_accuracy"]
            held_text = "no held-out examples" if held is None else f"held-out accuracy {held:.3f} (majority label {report['holdout_majority_accuracy']:.3f})"
            typer.echo(f"Wrote the ensemble predictor to {directory}: {report['examples']} examples, train accuracy {report['train_accuracy']:.3f}, {held_text}")
            tuned = report.get("kl_finetune")
            if tuned:
                if tuned["holdout_kl"] is None:
                    typer.echo(f"KL fine-tuning: {tuned['epochs']} epochs, the last kept (no held-out examples)")
                else:
                    typer.echo(
                        f"KL fine-tuning: held-out KL {tuned['holdout_kl_before']:.4f} -> {tuned['holdout_kl']:.4f} "
                        f"(epoch {tuned['selected_epoch']} of {tuned['epochs']} kept; 0 = the cross-entropy predictor)"
                    )
    distributed.barrier()
    return directory
