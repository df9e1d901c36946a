"""``sdrt calibrate``: MmDC's distillation calibration on top of self-distillation.

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

The stages of :mod:`sdrt_cli.ablate` run in-process through the CLI commands themselves
(``stage_invoker``), so each behaves, resumes and refuses exactly as the command would.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

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

Re-running the same command resumes; another configuration on the same RUN is refused.  Options of
the stages: --set traces.OPTION=VALUE, --set distill.OPTION=VALUE, --set ensemble.OPTION=VALUE.

Example (tiny):
  sdrt calibrate --dataset synthetic-charts --split train --limit 8 --backbone llava-next-tiny
      --iterations 2 --tau 0.33 --assessor metric --eval-split test --eval-limit 8
      --set traces.prompts=2 --out runs/calibrate
"""

TUNED_STAGES = ("traces", "distill", "ensemble")
ENSEMBLE_NAME = "calibrate"
# options that change how a run computes but not what it computes: a resume may change them
NOT_RESULT_OPTIONS = ("out", "config", "device", "batch_size", "iterations")


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
        set_: list[str] = typer.Option([], "--set", help="An option of a stage: STAGE.OPTION=VALUE with STAGE traces, distill or ensemble (repeatable)."),
        config: Path = common.CONFIG,
    ) -> None:
        from sdrt_cli.config import resolve
        from sdrt_cli.locking import run_lock

        opts = resolve(ctx)
        with run_lock(opts["out"], "calibrate"):
            run_calibrate(opts)


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def check_options(opts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Refuse bad options in one sentence before anything is written; the stages' own options."""
    from sdrt_cli.commands.ablate import parse_sets, stage_option_params
    from sdrt_cli.errors import SdrtError

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
    sets = parse_sets(opts["set_"], {stage: params[stage] for stage in TUNED_STAGES})
    owned = {"traces": {"out", "dataset", "data_dir", "split", "limit", "dataset_option", "pack", "backbone", "model", "device", "model_dtype", "seed", "overwrite", "plan"},
             "distill": {"traces", "out", "resume", "overwrite", "dataset", "data_dir", "split", "dataset_option", "backbone", "model", "device", "model_dtype", "seed", "init_from"},
             "ensemble": {"adapters", "traces", "name", "uniform", "backbone", "model", "device", "model_dtype", "seed", "data_dir"}}
    for stage, options in sets.items():
        for option in options:
            if option in owned[stage]:
                raise SdrtError(f"--set {stage}.{option}: `sdrt calibrate` sets this option of the {stage} stage itself; use its own flag or leave it")
    adapter = sets.get("distill", {}).get("adapter", "reft")
    if adapter == "lora":
        raise SdrtError("--set distill.adapter=lora: the student of `sdrt calibrate` is the weighted adapter ensemble, which needs reft or loreft adapters")
    return sets


def recorded_configuration(opts: dict[str, Any]) -> dict[str, Any]:
    from sdrt_cli.runinfo import jsonable

    return jsonable({k: v for k, v in sorted(opts.items()) if k not in NOT_RESULT_OPTIONS})


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


class Run:
    """Paths and shared settings of one calibration run."""

    def __init__(self, opts: dict[str, Any], sets: dict[str, dict[str, Any]]):
        self.opts = opts
        self.sets = sets
        self.out = Path(opts["out"])
        self.source_options = common.parse_key_values(opts["dataset_option"])

    def iteration_dir(self, n: int) -> Path:
        return self.out / f"iter-{n}"

    def tuning(self, n: int) -> Path:
        return self.iteration_dir(n) / "tuning.jsonl"

    def cache(self, n: int) -> Path:
        return self.iteration_dir(n) / "cache.jsonl"

    def marker(self, n: int, stage: str) -> Path:
        return self.iteration_dir(n) / "stages" / f"{stage}.done"

    def pool_options(self, pool: Path) -> list[str]:
        """``--dataset-option`` values that read ``pool`` as a dataset over the source."""
        options = [f"pool={pool}", f"source={self.opts['dataset']}", f"source_split={self.opts['split']}"]
        return options + list(self.opts["dataset_option"])

    def open_pool(self, pool: Path):
        return common.open_dataset("pool", self.opts["data_dir"], None, None, self.opts["seed"], common.parse_key_values(self.pool_options(pool)))

    def open_model(self, backbone: str | None = None):
        """The teacher/student backbone, or another role's (with its own default checkpoint)."""
        name = backbone or self.opts["backbone"]
        model = self.opts["model"] if name == self.opts["backbone"] else None
        return common.open_backbone(name, model, self.opts["device"], self.opts["model_dtype"], self.opts["seed"])

    def settings(self, max_new_tokens: int):
        from sdrt_cli.evaluate import GenerationSettings

        return GenerationSettings(
            max_new_tokens=max_new_tokens, max_new_tokens_step1=self.opts["max_new_tokens_step1"],
            batch_size=common.generation_batch_size("eval", self.opts["batch_size"], self.opts["device"]),
        )


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


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
    if distributed.world_size() > 1:
        raise SdrtError("`sdrt calibrate` runs in one process; its traces, distill and ensemble stages are the commands themselves, which you can run under torchrun")
    run = Run(opts, sets)
    check_configuration(run.out, opts)
    write_run_info(run.out, "calibrate", opts, opts["seed"])
    from sdrt_cli.commands.ablate import stage_invoker

    invoke = stage_invoker(report=False)
    initial_pools(run)
    for n in range(1, opts["iterations"] + 1):
        for stage, action in STAGES:
            run_stage(run, n, stage, functools.partial(action, run, n, invoke))
        write_report(run)
    typer.echo(f"Calibration of {opts['iterations']} iterations in {run.out}: pools in {run.out / 'pools'}, report {run.out / 'report.md'}")
    return run.out


def run_stage(run: Run, n: int, stage: str, action) -> float | None:
    """Run one stage unless its marker says it finished; its seconds (None when reused)."""
    from sdrt_cli.io import atomic_write_text

    marker = run.marker(n, stage)
    if marker.exists():
        return None
    typer.echo(f"iteration {n}: {stage}", err=True)
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"stage": stage, "seconds": round(seconds, 3)}) + "\n")
    return seconds


def write_pool(path: Path, rows: list[dict[str, Any]]) -> None:
    from sdrt_cli.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def initial_pools(run: Run) -> None:
    """Both pools start as the source split's questions without their answers (MmDC's D_sin)."""
    if run.tuning(1).exists() and run.cache(1).exists():
        return
    opts = run.opts
    source = common.open_dataset(opts["dataset"], opts["data_dir"], opts["split"], opts["limit"], opts["seed"], run.source_options)
    rows = []
    for index, example in enumerate(source):
        rows.append({
            "id": example.id, "parent_id": None, "image": {"index": index, "id": example.id}, "question": example.question,
            "origin": "dataset", "iteration": 0, "status": "accepted", "reason": None,
            "scores": None, "difficulty": None, "label": None,
        })
    if not rows:
        from sdrt_cli.errors import SdrtError

        raise SdrtError(f"dataset {opts['dataset']!r} split {opts['split']!r} has no examples to start the pools from")
    write_pool(run.cache(1), rows)
    write_pool(run.tuning(1), rows)  # written last: both files present = the pools are there


# -- instruction tuning ---------------------------------------------------------------------


def stage_traces(run: Run, n: int, invoke) -> None:
    store = run.iteration_dir(n) / "traces"
    args = {
        **run.sets.get("traces", {}),
        "out": str(store), "dataset": "pool", "data_dir": run.opts["data_dir"], "dataset_option": run.pool_options(run.tuning(n)),
        "pack": run.opts["pack"], "backbone": run.opts["backbone"], "model": run.opts["model"], "device": run.opts["device"],
        "model_dtype": run.opts["model_dtype"], "seed": run.opts["seed"],
    }
    previous = run.iteration_dir(n - 1) / "traces"
    if n > 1:
        seed_store(previous, store, run.tuning(n))
    invoke("traces", args)


def seed_store(previous: Path, store: Path, pool: Path, chunk: int = 8) -> int:
    """Copy into ``store`` the records of ``previous`` whose instructions are in ``pool`` (re-indexed
    to their rows there), so `sdrt traces` on the new pool traces only new instructions.  The copy
    carries the fingerprint `sdrt traces` gives the new pool (the previous one with the pool file
    changed); a copy interrupted half-way continues where it stopped.  Returns the examples copied."""
    import copy
    import dataclasses

    from sdrt_cli.calibration import read_pool
    from sdrt_cli.trace_store import TraceStore, TraceWriter

    old = TraceStore(previous)
    fingerprint = copy.deepcopy(old.fingerprint)
    fingerprint["dataset"]["options"]["pool"] = str(pool)
    first_prompt = old.prompt_ids[0]
    by_id = {old.meta(index, first_prompt)["example_id"]: index for index in old.example_indices}
    wanted = [(row_index, by_id[row["id"]]) for row_index, row in enumerate(read_pool(pool)) if row["id"] in by_id]
    writer = TraceWriter(store, fingerprint, rank=0, is_main=True)
    done = writer.done_examples()
    todo = [(new, old_index) for new, old_index in wanted if new not in done]
    for start in range(0, len(todo), chunk):
        records = [
            dataclasses.replace(old.record(old_index, prompt), example_index=new)
            for new, old_index in todo[start : start + chunk]
            for prompt in old.prompt_ids
        ]
        writer.write(records)
    return len(todo)


def stage_distill(run: Run, n: int, invoke) -> None:
    adapters = run.iteration_dir(n) / "adapters"
    args = {
        **run.sets.get("distill", {}),
        "traces": str(run.iteration_dir(n) / "traces"), "out": str(adapters), "device": run.opts["device"],
        "model_dtype": run.opts["model_dtype"], "seed": run.opts["seed"], "resume": adapters.exists(),
        # warm start: the student of iteration N starts from the adapters of iteration N-1
        "init_from": str(run.iteration_dir(n - 1) / "adapters") if n > 1 else None,
    }
    invoke("distill", args)


def stage_ensemble(run: Run, n: int, invoke) -> None:
    args = {
        **run.sets.get("ensemble", {}),
        "adapters": str(run.iteration_dir(n) / "adapters"), "traces": str(run.iteration_dir(n) / "traces"), "name": ENSEMBLE_NAME,
        "device": run.opts["device"], "model_dtype": run.opts["model_dtype"], "seed": run.opts["seed"],
    }
    invoke("ensemble", args)


def stage_heldout(run: Run, n: int, invoke) -> None:
    """The student of iteration N scored on the untouched --eval-split (MmDC's Figure 4)."""
    if run.opts["eval_split"] is None:
        return
    out = run.iteration_dir(n) / "heldout"
    args = {
        "method": "sdrt", "adapters": str(run.iteration_dir(n) / "adapters"), "ensemble": ENSEMBLE_NAME, "out": str(out),
        "dataset": run.opts["dataset"], "data_dir": run.opts["data_dir"], "split": run.opts["eval_split"], "limit": run.opts["eval_limit"],
        "dataset_option": list(run.opts["dataset_option"]), "backbone": run.opts["backbone"], "model": run.opts["model"],
        "device": run.opts["device"], "model_dtype": run.opts["model_dtype"], "seed": run.opts["seed"],
        "max_new_tokens": run.opts["max_new_tokens"], "overwrite": out.exists(), "report": False,
    }
    invoke("eval", args)


# -- assessment -----------------------------------------------------------------------------


def _generate_missing(path: Path, items, batch_size: int, total: int, done: int, description: str, generate) -> None:
    """``generate(batch)`` for ``items`` (those not in ``path`` yet) batch by batch, appending each
    batch's records to ``path`` in one write (a kill loses at most the batch in flight)."""
    import itertools

    from sdrt_cli.io import append_jsonl

    stream = iter(items)
    with common.progress_bar(description, total=total, completed=done) as bar:
        while True:
            batch = list(itertools.islice(stream, batch_size))
            if not batch:
                break
            append_jsonl(path, *generate(batch))
            bar.advance(len(batch))


def stage_answers(run: Run, n: int, invoke=None) -> None:
    """The teacher's and the student's answers to every cache-pool instruction."""
    from sdrt_cli.ensemble import load_ensemble
    from sdrt_cli.evaluate import CotMethod, PromptMethod, SdrtMethod
    from sdrt_cli.io import read_jsonl
    from sdrt_cli.packs import load_pack

    data = run.open_pool(run.cache(n))
    model = run.open_model()
    adapters = run.iteration_dir(n) / "adapters"
    if run.opts["teacher"] == "two-step":
        pack = load_pack(run.opts["pack"])
        teacher = CotMethod(pack, pack.prompts[0])
    else:
        teacher = PromptMethod()
    student = SdrtMethod(adapters, load_ensemble(adapters, model, ENSEMBLE_NAME))
    settings = run.settings(run.opts["max_new_tokens"])
    for role, method in (("teacher", teacher), ("student", student)):
        path = run.iteration_dir(n) / "answers" / f"{role}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        done = {record["index"] for record in read_jsonl(path)}
        items = ((i, ref.materialise()) for i, ref in enumerate(data.references()) if i not in done)

        def generate(batch, method=method):
            # not evaluate_method: that also parses and scores, and a generated question has no gold answer
            outputs = method.generate(model, data, [example for _, example in batch], settings)
            return [{"index": i, "id": example.id, "method": method.name, "output": out.output} for (i, example), out in zip(batch, outputs)]

        with method.active(model):
            _generate_missing(path, items, settings.batch_size, len(data), len(done), f"answers of the {role}", generate)


class RolePrompts:
    """What `generate_single_step` needs of a dataset to send a role's rendered text as the user turn."""

    def format_question(self, example) -> str:
        return example.question


def role_generator(run: Run, backbone: str | None, max_new_tokens: int):
    """A role's batch generator ([(key fields, Example with the rendered text)] -> records) and its batch size."""
    from sdrt_cli.evaluate import generate_single_step

    model = run.open_model(backbone)
    settings = run.settings(max_new_tokens)

    def generate(batch):
        outputs = generate_single_step(model, RolePrompts(), [example for _, example in batch], settings, "role")
        return [{**key, "output": out.output} for (key, _), out in zip(batch, outputs)]

    return generate, settings.batch_size


def answers_by_index(run: Run, n: int, role: str) -> dict[int, dict[str, Any]]:
    from sdrt_cli.io import read_jsonl

    return {record["index"]: record for record in read_jsonl(run.iteration_dir(n) / "answers" / f"{role}.jsonl")}


def stage_judge(run: Run, n: int, invoke=None) -> None:
    """Each cache instruction judged twice, teacher's answer first and student's answer first."""
    from sdrt_cli.data import Example
    from sdrt_cli.io import read_jsonl
    from sdrt_cli.roles import load_role_pack

    if run.opts["assessor"] != "judge":
        return
    roles = load_role_pack(run.opts["roles"])
    data = run.open_pool(run.cache(n))
    teacher, student = answers_by_index(run, n, "teacher"), answers_by_index(run, n, "student")
    path = run.iteration_dir(n) / "judge.jsonl"
    done = {(record["index"], record["order"]) for record in read_jsonl(path)}

    def items():
        for i, ref in enumerate(data.references()):
            orders = [order for order in ("teacher-first", "student-first") if (i, order) not in done]
            if not orders:
                continue
            example = ref.materialise()
            question = data.question_text(example)
            for order in orders:
                first, second = (teacher[i], student[i]) if order == "teacher-first" else (student[i], teacher[i])
                text = roles.assessor.render(question=question, answer_1=first["output"], answer_2=second["output"])
                yield {"index": i, "id": example.id, "order": order}, Example(id=f"{example.id}#{order}", images=example.images, question=text)

    generate, batch_size = role_generator(run, run.opts["assessor_backbone"], run.opts["judge_max_new_tokens"])
    _generate_missing(path, items(), batch_size, 2 * len(data), len(done), "judgements", generate)


def stage_assess(run: Run, n: int, invoke=None) -> None:
    """Scores, difficulty (Eq. 6) and difficult/easy for every cache instruction: RUN/iter-N/assessed.jsonl."""
    from sdrt_cli import calibration
    from sdrt_cli.assessment import Assessment
    from sdrt_cli.io import read_jsonl
    from sdrt_cli.metrics import get_metric

    tau = run.opts["tau"]
    rows = read_rows(run.cache(n))
    data = run.open_pool(run.cache(n))
    position = {example_id: i for i, example_id in enumerate(data.ids())}
    teacher, student = answers_by_index(run, n, "teacher"), answers_by_index(run, n, "student")
    verdicts: dict[int, dict[str, str]] = {}
    for record in read_jsonl(run.iteration_dir(n) / "judge.jsonl"):
        verdicts.setdefault(record["index"], {})[record["order"]] = record["output"]
    metric = get_metric(data.metric) if run.opts["assessor"] == "metric" else None
    examples = {i: ex for i, ex in enumerate(data)} if metric is not None else {}
    assessed = []
    for row in rows:
        row = {**row, "assessed_in": None, "scores": None, "difficulty": None, "label": None, "excluded": None, "judgements_parsed": None}
        i = position.get(row["id"])
        if i is None:  # a rejected augmentation: not part of the pool
            assessed.append(row)
            continue
        row["assessed_in"] = n
        row["answers"] = {"teacher": teacher[i]["output"], "student": student[i]["output"]}
        if metric is not None:
            example = examples[i]
            if not example.answers:
                row["excluded"] = "no gold answer to score with the metric"
                assessed.append(row)
                continue
            assessment = Assessment.from_metric(metric.score(teacher[i]["output"], example), metric.score(student[i]["output"], example))
        else:
            orders = verdicts.get(i, {})
            result = calibration.judge(orders.get("teacher-first", ""), orders.get("student-first", ""))
            row["judgements_parsed"] = result.parsed
            row["judgements"] = orders
            assessment = result.assessment()
            if assessment is None:
                row["excluded"] = "unparseable judgement"
                assessed.append(row)
                continue
        row["scores"] = {"teacher": assessment.teacher, "student": assessment.student}
        row["difficulty"] = assessment.difficulty()
        row["label"] = "difficult" if calibration.is_difficult(assessment, tau) else "easy"
        assessed.append(row)
    write_pool(run.iteration_dir(n) / "assessed.jsonl", assessed)


# -- augmentation ---------------------------------------------------------------------------


def stage_augment(run: Run, n: int, invoke=None) -> None:
    """One new question per difficult instruction, kept when ROUGE-L < 0.7 against every other
    question of its image: RUN/iter-N/augmented.jsonl (accepted and rejected, with the reason)."""
    from sdrt_cli import calibration
    from sdrt_cli.data import Example
    from sdrt_cli.io import read_jsonl
    from sdrt_cli.roles import load_role_pack

    assessed = read_rows(run.iteration_dir(n) / "assessed.jsonl")
    difficult = [row for row in assessed if row.get("label") == "difficult"]
    raw_path = run.iteration_dir(n) / "augment.jsonl"
    done = {record["id"] for record in read_jsonl(raw_path)}
    if len(done) < len(difficult):
        roles = load_role_pack(run.opts["roles"])
        data = run.open_pool(run.cache(n))
        wanted = {row["id"] for row in difficult} - done

        def items():
            for ref in data.references():
                if ref.id in wanted:
                    example = ref.materialise()
                    text = roles.augmentor.render(question=data.question_text(example))
                    yield {"id": example.id}, Example(id=f"{example.id}#augment", images=example.images, question=text)

        generate, batch_size = role_generator(run, run.opts["augmentor_backbone"], run.opts["augment_max_new_tokens"])
        _generate_missing(raw_path, items(), batch_size, len(difficult), len(done), "new questions", generate)
    written = {record["id"]: record["output"] for record in read_jsonl(raw_path)}
    present = [row for row in assessed if row.get("status") != "rejected"]
    candidates: list[dict[str, Any]] = []
    for row in difficult:
        question = calibration.clean_generated_question(written[row["id"]])
        same_image = [(r["id"], r["question"]) for r in present + [c for c in candidates if c["status"] == "accepted"] if r["image"]["index"] == row["image"]["index"]]
        if not question:
            accepted, reason = False, "empty question"
        else:
            accepted, reason = calibration.diversity_check(question, same_image)
        candidates.append({
            "id": f"{row['id']}~a{n}", "parent_id": row["id"], "image": row["image"], "question": question or written[row["id"]],
            "origin": "augmented", "iteration": n, "status": "accepted" if accepted else "rejected", "reason": reason,
            "scores": None, "difficulty": None, "label": None,
        })
    write_pool(run.iteration_dir(n) / "augmented.jsonl", candidates)


def stage_update(run: Run, n: int, invoke=None) -> None:
    """The pools of iteration N+1 (and RUN/pools/, the latest pools)."""
    from sdrt_cli import calibration

    tuning = read_rows(run.tuning(n))
    assessed = read_rows(run.iteration_dir(n) / "assessed.jsonl")
    candidates = read_rows(run.iteration_dir(n) / "augmented.jsonl")
    accepted = [row for row in candidates if row["status"] == "accepted"]
    update = calibration.update_pools(tuning, assessed, accepted, run.opts["seed"], n)
    cache = update.cache + [row for row in candidates if row["status"] == "rejected"]
    write_pool(run.iteration_dir(n) / "sampled_easy.jsonl", [{"id": i} for i in update.sampled_easy])
    write_pool(run.cache(n + 1), cache)
    write_pool(run.tuning(n + 1), update.tuning)
    write_pool(run.out / "pools" / "cache.jsonl", cache)
    write_pool(run.out / "pools" / "tuning.jsonl", update.tuning)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


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
    atomic_write_text(run.out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(run.out / "report.json", json.dumps({"configuration": recorded_configuration(run.opts), "iterations": summaries}, indent=2) + "\n")
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


# every phase of an iteration, in order: (name, function(run, n, invoke))
STAGES = (
    ("traces", stage_traces), ("distill", stage_distill), ("ensemble", stage_ensemble), ("heldout", stage_heldout),
    ("answers", stage_answers), ("judge", stage_judge), ("assess", stage_assess),
    ("augment", stage_augment), ("update", stage_update),
)
