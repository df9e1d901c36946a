"""``sdrt calibrate``: the options; the loop is :mod:`sdrt_cli.calibration.run`."""

from __future__ import annotations

from pathlib import Path

import typer

from sdrt_cli.commands import common

HELP = """MmDC's distillation calibration: distill, find where the student still fails its teacher,
write new questions there, distill again.

Every iteration: [bold]instruction tuning[/] (traces of the tuning pool, reusing the records of
instructions traced before; distill, warm-started from the previous iteration's adapters; ensemble;
with --eval-split, the student scored on that untouched split), [bold]assessment[/] (teacher and
student answer every cache-pool instruction; the assessor scores both answers in both orders with
MmDC's prompt and the scores are averaged (Eq. 5); difficulty S = (|R_S - R_T| + 1) / max(R_S, R_T)
(Eq. 6); S >= --tau is difficult; an unreadable judgement is counted and excluded) and
[bold]augmentation[/] (the augmentor writes one new question per difficult instruction, kept only if
its ROUGE-L with every other question of the image is below 0.7; new questions replace their
originals in the tuning pool and join the cache pool; easy instructions are sampled so difficult and
easy are balanced).

--assessor metric scores both answers with the dataset's metric instead (0 -> 1, 1 -> 10), where a
gold answer exists: generated questions have none and are left unassessed.  The teacher is SDRT's
two-step teacher (the pack's first prompt) or, with --teacher single-step, the plain model.  The
assessor's and augmentor's prompts are MmDC's (--roles FILE replaces them).

Pools (JSONL, images referenced, never copied): RUN/pools/tuning.jsonl, RUN/pools/cache.jsonl; any
pool reads as a dataset: --dataset pool --dataset-option pool=FILE --dataset-option source=D.
Report per iteration: RUN/report.md, RUN/report.json, RUN/report.png.  The student of iteration N is
RUN/iter-N/adapters (ensemble "calibrate").  Details: docs/calibrate.md.

--align first runs MmDC's multimodal alignment (its stage 1): `sdrt distill --adapter projector
--loss ce` trains only the backbone's multimodal projector on the source split's gold answers
(RUN/align); every later stage of the run then uses the aligned projector.

Re-running the same command resumes; another configuration on the same RUN is refused.  Options of
the stages: --set traces.OPTION=VALUE, --set distill.OPTION=VALUE, --set ensemble.OPTION=VALUE,
--set align.OPTION=VALUE (an option of `sdrt distill`, for the alignment stage).

Example (tiny):
  sdrt calibrate --dataset synthetic-charts --split train --limit 8 --backbone llava-next-tiny
      --iterations 2 --tau 0.33 --assessor metric --eval-split test --eval-limit 8
      --set traces.prompts=2 --out runs/calibrate
"""


def register(app: typer.Typer) -> None:
    @app.command("calibrate", help=HELP)
    def calibrate_command(
        ctx: typer.Context,
        out: Path = typer.Option(None, "--out", help="Run directory (created; resumed if it exists).", show_default=False),
        dataset: str = common.DATASET,
        data_dir: Path = common.DATA_DIR,
        split: str = typer.Option("train", "--split", help="Split the pools start from (never the split you evaluate on)."),
        limit: int = common.LIMIT,
        dataset_option: list[str] = common.DATASET_OPTION,
        pack: str = typer.Option("visual_reasoning", "--pack", help="Prompt pack of the traces (and of the two-step teacher)."),
        backbone: str = common.BACKBONE,
        model: str = common.MODEL,
        device: str = common.DEVICE,
        model_dtype: str = common.MODEL_DTYPE,
        seed: int = common.SEED,
        align: bool = typer.Option(
            False, "--align/--no-align",
            help="First train only the multimodal projector on the source split's gold answers (MmDC's alignment stage); every later stage uses it.",
        ),
        iterations: int = typer.Option(3, "--iterations", min=1, help="Calibration iterations (MmDC: 3); raising it continues a finished run."),
        tau: float = typer.Option(0.33, "--tau", min=0.0, help="Difficulty threshold: S >= tau is difficult (MmDC: 0.33; 0 = all, above 1 = none)."),
        assessor: str = typer.Option("judge", "--assessor", help="judge (MmDC's assessor prompt, both orders) or metric (the dataset's metric on gold answers)."),
        teacher: str = typer.Option("two-step", "--teacher", help="two-step (SDRT's teacher: the pack's first prompt) or single-step (MmDC's plain teacher)."),
        assessor_backbone: str | None = typer.Option(None, "--assessor-backbone", help="Backbone of the assessor (default: --backbone with --model).", show_default=False),
        augmentor_backbone: str | None = typer.Option(None, "--augmentor-backbone", help="Backbone of the augmentor (default: --backbone with --model).", show_default=False),
        roles: str = typer.Option("mmdc", "--roles", help="Role templates (assessor, augmentor): a shipped pack name or a TOML file."),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Answer budget of teacher (step 2) and student."),
        max_new_tokens_step1: int = typer.Option(96, "--max-new-tokens-step1", min=1, help="Budget of the two-step teacher's analysis."),
        judge_max_new_tokens: int = typer.Option(64, "--judge-max-new-tokens", min=1, help="Budget of each judgement."),
        augment_max_new_tokens: int = typer.Option(48, "--augment-max-new-tokens", min=1, help="Budget of each new question."),
        batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Examples generated together in the assessment and augmentation phases.", show_default=False),
        eval_split: str | None = typer.Option(None, "--eval-split", help="Score each iteration's student on this untouched split of --dataset (sdrt eval --method sdrt); none if omitted.", show_default=False),
        eval_limit: int | None = typer.Option(None, "--eval-limit", min=1, help="Only the first N examples of --eval-split.", show_default=False),
        set_: list[str] = typer.Option([], "--set", help="An option of a stage: STAGE.OPTION=VALUE with STAGE traces, distill, ensemble or align (repeatable)."),
        config: Path = common.CONFIG,
    ) -> None:
        from sdrt_cli.calibration.run import calibrate
        from sdrt_cli.config import resolve

        calibrate(resolve(ctx))
