"""Ablation grids: traces -> distill -> ensemble -> eval for every variation, each stage reused
whenever its inputs did not change, and paper-style tables and plots at the end.

A grid is a TOML file (the built-in ``paper`` grid is ``sdrt_cli/grids/paper.toml``)::

    name = "paper"
    datasets = ["docvqa", "infographicvqa"]      # table columns
    [defaults.traces]                            # options of any stage, by stage
    prompts = "8"
    [defaults.distill]
    loss = "mse+kl"
    [datasets_options.docvqa.traces]             # optional per-dataset options
    data_dir = "~/data/docvqa"
    [[ablations]]
    name = "loss"                                # one table per ablation
    title = "Table 4: self-distillation loss"
    stage = "distill"                            # the stage whose option varies
    option = "loss"
    values = ["mse", "kl", "mse+kl"]
    labels = ["MSE", "KL", "KL&MSE"]             # row labels (default: the values)
    plot = false                                 # true: also a line plot over the values
    note = "..."                                 # printed under the table
    fixed = { distill = { skip = false } }       # options every row of this table uses
    reference = "Full method"                    # adds a row run with the grid's defaults alone

An ablation whose ``stage`` is ``calibrate`` (the built-in ``mmdc`` grid) runs one ``sdrt calibrate``
per row instead, scored by its student's held-out eval after its last iteration (see
:func:`calibrate_options` for the options it gets).

A grid is scored on another split than the one its traces (and so its adapters and predictor) were
made from: set ``traces.split`` and ``eval.split`` apart.  A grid whose eval split equals its traces
split is refused unless it sets ``[defaults.eval] allow_train_overlap = true`` (debugging only; the
eval stage then warns in every results file).

Every stage runs in a directory named by the hash of its own options and its upstream stage's
key, under ``OUT/stages/``; a ``.done`` file marks it finished, so an interrupted grid resumes and a
stage shared by several runs (the traces of one dataset, the adapters of every K) runs once.
Stages run in-process through the CLI commands themselves, so ``torchrun ... -m sdrt_cli ablate``
distributes each stage exactly as the command would.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from sdrt_cli import distributed
from sdrt_cli.config import load_toml
from sdrt_cli.errors import SdrtError, did_you_mean
from sdrt_cli.io import atomic_write_text

STAGES = ("traces", "distill", "ensemble", "eval", "calibrate")  # the commands a grid sets options of
SDRT_STAGES = ("traces", "distill", "ensemble", "eval")  # a run of SDRT's pipeline
# a run of an ablation of a calibrate option: one `sdrt calibrate`, which drives its own traces,
# distill, ensemble and held-out eval
CALIBRATE_STAGES = ("calibrate",)
GRID_FIELDS = {"name", "description", "datasets", "defaults", "datasets_options", "ablations"}
ABLATION_FIELDS = {"name", "title", "stage", "option", "values", "labels", "header", "plot", "note", "fixed", "reference"}


@dataclass
class Ablation:
    name: str
    title: str
    stage: str
    option: str
    values: list[Any]
    labels: list[str]
    header: str
    plot: bool = False
    note: str = ""
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)  # options of every row
    reference: str = ""  # label of an extra row with the grid's defaults alone

    @property
    def row_labels(self) -> list[str]:
        return self.labels + ([self.reference] if self.reference else [])


@dataclass
class Grid:
    name: str
    description: str
    datasets: list[str]
    defaults: dict[str, dict[str, Any]]
    datasets_options: dict[str, dict[str, dict[str, Any]]]
    ablations: list[Ablation]
    source: str = ""


def builtin_grids() -> dict[str, str]:
    folder = resources.files("sdrt_cli") / "grids"
    return {item.name[:-5]: str(item) for item in folder.iterdir() if item.name.endswith(".toml")}


def load_grid(name_or_path: str, stage_options: dict[str, set[str]]) -> Grid:
    """A built-in grid by name or a grid file by path, validated against the stages' real options."""
    grids = builtin_grids()
    if name_or_path in grids:
        path = Path(grids[name_or_path])
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            hint = did_you_mean(name_or_path, sorted(grids), sentence=True)
            raise SdrtError(f"unknown grid {name_or_path!r}: not a built-in grid ({', '.join(sorted(grids))}) nor an existing file.{hint}")
    raw = load_toml(path, "grid file")
    where = f"grid file {path}"
    unknown = set(raw) - GRID_FIELDS
    if unknown:
        raise SdrtError(f"{where}: unknown field {sorted(unknown)[0]!r}; fields are {', '.join(sorted(GRID_FIELDS))}")
    for required in ("name", "datasets", "ablations"):
        if required not in raw:
            raise SdrtError(f"{where}: missing field {required!r}")

    def check_stage_table(table: Any, label: str) -> dict[str, dict[str, Any]]:
        if not isinstance(table, dict):
            raise SdrtError(f"{where}: {label} must be a table of stages")
        for stage, options in table.items():
            if stage not in STAGES:
                raise SdrtError(f"{where}: {label}.{stage} is not a stage; stages are {', '.join(STAGES)}")
            if not isinstance(options, dict):
                raise SdrtError(f"{where}: {label}.{stage} must be a table of options")
            for option in options:
                if option.replace("-", "_") not in stage_options[stage]:
                    raise SdrtError(f"{where}: {label}.{stage}.{option} is not an option of `sdrt {stage}`")
        return {stage: {k.replace("-", "_"): v for k, v in options.items()} for stage, options in table.items()}

    defaults = check_stage_table(raw.get("defaults", {}), "defaults")
    per_dataset = {name: check_stage_table(table, f"datasets_options.{name}") for name, table in raw.get("datasets_options", {}).items()}
    ablations = []
    if not isinstance(raw["ablations"], list) or not raw["ablations"]:
        raise SdrtError(f"{where}: ablations must be a non-empty array of tables ([[ablations]])")
    for i, item in enumerate(raw["ablations"]):
        label = f"ablations[{i}]"
        extra = set(item) - ABLATION_FIELDS
        if extra:
            raise SdrtError(f"{where}: {label} has unknown field {sorted(extra)[0]!r}")
        for required in ("name", "stage", "option", "values"):
            if required not in item:
                raise SdrtError(f"{where}: {label} is missing field {required!r}")
        if item["stage"] not in STAGES:
            raise SdrtError(f"{where}: {label}.stage {item['stage']!r} is not a stage; stages are {', '.join(STAGES)}")
        option = item["option"].replace("-", "_")
        if option not in stage_options[item["stage"]]:
            raise SdrtError(f"{where}: {label}.option {item['option']!r} is not an option of `sdrt {item['stage']}`")
        values = item["values"]
        if not isinstance(values, list) or not values:
            raise SdrtError(f"{where}: {label}.values must be a non-empty array")
        labels = [str(v) for v in item.get("labels", values)]
        fixed = check_stage_table(item.get("fixed", {}), f"{label}.fixed")
        if len(labels) != len(values):
            raise SdrtError(f"{where}: {label}.labels has {len(labels)} entries for {len(values)} values")
        ablations.append(
            Ablation(
                name=item["name"], title=item.get("title", item["name"]), stage=item["stage"], option=option,
                values=values, labels=labels, header=item.get("header", item["option"]), plot=bool(item.get("plot", False)),
                note=item.get("note", ""), fixed=fixed, reference=str(item.get("reference", "")),
            )
        )
    datasets = raw["datasets"]
    if not isinstance(datasets, list) or not datasets:
        raise SdrtError(f"{where}: datasets must be a non-empty array of dataset names")
    return Grid(
        name=raw["name"], description=raw.get("description", ""), datasets=list(datasets), defaults=defaults,
        datasets_options=per_dataset, ablations=ablations, source=str(path),
    )


@dataclass
class RunResult:
    eval_dir: Path
    method: str
    stage_dirs: dict[str, Path]


@dataclass
class Run:
    """One cell of a table: an ablation's value on one dataset, as options per stage."""

    ablation: Ablation
    value_index: int
    dataset: str
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def stages(self) -> tuple[str, ...]:
        return CALIBRATE_STAGES if self.ablation.stage == "calibrate" else SDRT_STAGES


def plan_runs(grid: Grid, overrides: dict[str, dict[str, Any]]) -> list[Run]:
    """Every cell of every table with its options per stage; refuses a plan scored on its traces split."""
    runs = []
    for ablation in grid.ablations:
        for index in range(len(ablation.row_labels)):
            for dataset in grid.datasets:
                options: dict[str, dict[str, Any]] = {stage: {} for stage in STAGES}
                reference = index == len(ablation.values)  # the grid's defaults alone
                sources = (grid.defaults, grid.datasets_options.get(dataset, {}), overrides) + (() if reference else (ablation.fixed,))
                for source in sources:
                    for stage, values in source.items():
                        options[stage].update(values)
                if not reference:
                    options[ablation.stage][ablation.option] = ablation.values[index]
                options["traces"]["dataset"] = dataset
                runs.append(Run(ablation, index, dataset, options))
    check_eval_splits(grid, runs)
    return runs


def check_eval_splits(grid: Grid, runs: Sequence[Run]) -> None:
    """Refuse a grid that would score methods on the split their traces were made from (the examples
    the adapters and the predictor learned from) unless it sets ``eval.allow_train_overlap``."""
    from sdrt_cli.plugins import datasets

    for run in runs:
        if run.stages == CALIBRATE_STAGES:
            check_calibrate_split(grid, run)
            continue
        traces, evaluation = run.options["traces"], run.options["eval"]
        if evaluation.get("allow_train_overlap"):
            continue
        traces_split = traces.get("split") or datasets().get(run.dataset).default_split
        eval_split = evaluation.get("split") or traces_split  # data options flow from traces to eval
        if eval_split == traces_split:
            raise SdrtError(
                f"grid {grid.name!r} would score {run.dataset!r} on split {eval_split!r}, the split its traces were made from "
                "(the examples the adapters learned from); set traces.split and eval.split apart (e.g. train and validation) "
                "or set eval.allow_train_overlap = true to debug"
            )


@functools.lru_cache(maxsize=1)
def calibrate_params() -> dict[str, Any]:
    """The options of `sdrt calibrate` by name (the command is their one definition)."""
    from sdrt_cli.stages import stage_option_params

    return stage_option_params()["calibrate"]


def calibrate_default(option: str) -> Any:
    return calibrate_params()[option].default


def check_calibrate_split(grid: Grid, run: Run) -> None:
    """A calibrate entry is scored by its student's accuracy on ``calibrate.eval_split`` after each
    iteration, which must be another split than the one the pools start from (``calibrate.split``)."""
    options = calibrate_options(run, set(calibrate_params()))
    split = options.get("split") or calibrate_default("split")
    eval_split = options.get("eval_split")
    if eval_split is None:
        raise SdrtError(
            f"grid {grid.name!r}: ablation {run.ablation.name!r} is scored by the held-out accuracy `sdrt calibrate` measures on "
            f"calibrate.eval_split, which is not set; set it to a split other than {split!r} (e.g. validation)"
        )
    if eval_split == split:
        raise SdrtError(
            f"grid {grid.name!r} would score {run.dataset!r} on split {eval_split!r}, the split its calibration starts from "
            "(the examples its student learned from); set calibrate.split and calibrate.eval_split apart (e.g. train and validation)"
        )


def calibrate_options(run: Run, calibrate_names: set[str]) -> dict[str, Any]:
    """The options of a calibrate run's `sdrt calibrate`: its own; the traces options it has a flag of
    its own for (the data, the pack, the backbone), unless it sets them; every other traces, distill
    and ensemble option as a ``--set`` of its stages (one it sets itself is refused)."""
    from sdrt_cli.calibration.run import SET_BY_CALIBRATE, TUNED_STAGES

    options = dict(run.options["calibrate"])
    options["dataset"] = run.dataset
    sets = list(options.pop("set_", None) or [])
    for stage in TUNED_STAGES:
        for name, value in sorted(run.options[stage].items()):
            if stage == "traces" and name in SET_BY_CALIBRATE[stage] and name in calibrate_names:
                options.setdefault(name, value)
            elif name in SET_BY_CALIBRATE[stage]:
                raise SdrtError(
                    f"{stage}.{name} cannot be set for ablation {run.ablation.name!r}: it runs `sdrt calibrate`, which sets that option of its "
                    f"{stage} stage itself"
                )
            else:
                sets.append(f"{stage}.{name}={str(value).lower() if isinstance(value, bool) else value}")
    if sets:
        options["set_"] = sets
    return options


def stage_key(stage: str, options: dict[str, Any], upstream: str | None) -> str:
    text = json.dumps({"stage": stage, "options": options, "upstream": upstream}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


# how a stage finds its upstream outputs: stage -> (flag, upstream stage)
UPSTREAM_FLAGS: dict[str, list[tuple[str, str]]] = {
    "traces": [],
    "distill": [("traces", "traces")],
    "ensemble": [("adapters", "distill"), ("traces", "traces")],
    "eval": [("adapters", "distill"), ("traces", "traces")],
}
# options of the traces stage that later stages need to see the same data
DATA_OPTIONS = ("dataset", "data_dir", "split", "limit", "dataset_option", "backbone", "model", "device", "model_dtype", "seed")


def stage_chain(run: Run, stage_options: dict[str, set[str]]) -> list[tuple[str, dict[str, Any]]]:
    """The stages of a run with their options (data options flow from traces to later stages)."""
    if run.stages == CALIBRATE_STAGES:
        return [("calibrate", calibrate_options(run, stage_options["calibrate"]))]
    chain = []
    shared = {k: v for k, v in run.options["traces"].items() if k in DATA_OPTIONS}
    for stage in SDRT_STAGES:
        opts = dict(run.options[stage])
        for key, value in shared.items():
            if key in stage_options[stage] and key not in opts:
                opts[key] = value
        chain.append((stage, opts))
    return chain


Invoke = Callable[[str, dict[str, Any]], None]


def execute(runs: Sequence[Run], out: Path, invoke: Invoke, stage_options: dict[str, set[str]], on_stage: Callable[[str, str, float | None], None] | None = None) -> dict[int, RunResult]:
    """Run every stage of every run, skipping finished ones; returns where each run's stages are.

    ReFT/LoReFT adapters are evaluated as the weighted ensemble (`sdrt` method).  LoRA adapters
    cannot be weighted per input in one forward pass, so a LoRA run skips the ensemble stage and
    evaluates its first prompt's adapter (`lora` method) — the tables say so.

    A calibrate run's score is its student's held-out eval after its last iteration.  Calibrations
    differing only in ``iterations`` share one directory: a run of more iterations continues one of
    fewer (``sdrt calibrate`` does), and a run of fewer reads its iteration from one of more.
    """
    stages_dir = out / "stages"
    results: dict[int, RunResult] = {}
    for number, run in enumerate(runs):
        keys: dict[str, str] = {}
        upstream = None
        lora = run.options["distill"].get("adapter") == "lora"
        for stage, opts in stage_chain(run, stage_options):
            if stage == "ensemble" and lora:
                continue
            if stage == "distill" and lora:
                opts = {k: v for k, v in opts.items() if k != "skip"}  # the skip connection is part of ReFT adapters
            if stage == "eval":
                opts = dict(opts)
                opts.pop("method", None)
            iterations = None
            key_options = opts
            if stage == "calibrate":
                iterations = opts.get("iterations") or calibrate_default("iterations")
                # an option given at its default is the same calibration as one left out (a row
                # `align = false` is the tau = 0.33 row's calibration)
                params = calibrate_params()
                key_options = {k: v for k, v in opts.items() if k != "iterations" and not (k in params and v == params[k].default)}
            key = stage_key(stage, key_options, upstream)
            keys[stage] = key
            directory = stages_dir / key
            done = directory / ".done"
            started = time.perf_counter()
            skipped = done.exists() and (iterations is None or calibrated_iterations(done) >= iterations)
            if not skipped:
                args = dict(opts)
                distill_dir = stages_dir / keys.get("distill", "")
                if stage == "distill":
                    args.update(traces=str(stages_dir / keys["traces"]), out=str(directory))
                elif stage == "ensemble":
                    args.update(adapters=str(distill_dir), traces=str(stages_dir / keys["traces"]), name=key)
                elif stage == "eval" and lora:
                    first = json.loads((distill_dir / "manifest.json").read_text())["prompts"][0]
                    args.update(method="lora", lora=str(distill_dir), lora_adapter=first, out=str(directory))
                elif stage == "eval":
                    args.update(method="sdrt", adapters=str(distill_dir), ensemble=keys["ensemble"], out=str(directory))
                else:
                    args["out"] = str(directory)
                if directory.exists():
                    # an interrupted stage: traces resume by themselves, distill continues from its
                    # checkpoint, a partial eval is replaced
                    if stage == "distill":
                        args["resume"] = True
                    elif stage == "eval":
                        args["overwrite"] = True
                invoke(stage, args)
                if distributed.is_main():
                    directory.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(done, json.dumps({"stage": stage, "options": opts}, default=str) + "\n")
                distributed.barrier()
            if on_stage:
                on_stage(stage, key, None if skipped else time.perf_counter() - started)
            upstream = key
        stage_dirs = {stage: stages_dir / key for stage, key in keys.items()}
        if "calibrate" in keys:
            results[number] = RunResult(stage_dirs["calibrate"] / f"iter-{iterations}" / "heldout", "sdrt", stage_dirs)
        else:
            results[number] = RunResult(stage_dirs["eval"], "lora" if lora else "sdrt", stage_dirs)
    return results


def calibrated_iterations(done: Path) -> int:
    """The iterations a finished calibrate stage ran (from its ``.done`` marker)."""
    options = json.loads(done.read_text(encoding="utf-8"))["options"]
    return options.get("iterations") or calibrate_default("iterations")


def read_score(eval_dir: Path, method: str) -> float | None:
    from sdrt_cli.formats import RESULTS_JSON, EvalResults

    if not (eval_dir / RESULTS_JSON).exists():
        return None
    return EvalResults.load(eval_dir).score(method)


def to_argv(stage: str, args: dict[str, Any], flags: dict[str, Any]) -> list[str]:
    """Option dict -> command-line arguments of ``sdrt STAGE`` (booleans as --x/--no-x)."""
    argv = [stage]
    for name, value in args.items():
        param = flags.get(name)
        if param is None:
            raise SdrtError(f"`sdrt {stage}` has no option {name!r}")
        if value is None:
            continue
        if param.is_flag:
            on, off = param.opts[0], (param.secondary_opts[0] if param.secondary_opts else None)
            if value:
                argv.append(on)
            elif off:
                argv.append(off)
            continue
        values = value if isinstance(value, list) else [value]
        for item in values:
            argv += [param.opts[0], str(item)]
    return argv


def write_tables(grid: Grid, runs: Sequence[Run], scores: dict[int, float | None], out: Path) -> list[Path]:
    """One table per ablation, rows = values, columns = datasets (Markdown, CSV, JSON); plots as PNG."""
    written = []
    tables_dir = out / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    for ablation in grid.ablations:
        rows = []
        for index, label in enumerate(ablation.row_labels):
            row = {ablation.header: label}
            for dataset in grid.datasets:
                number = next(i for i, r in enumerate(runs) if r.ablation is ablation and r.value_index == index and r.dataset == dataset)
                score = scores.get(number)
                row[dataset] = None if score is None else round(100 * score, 1)
            rows.append(row)
        columns = [ablation.header, *grid.datasets]
        md = [f"### {ablation.title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            md.append("| " + " | ".join("–" if row[c] is None else str(row[c]) for c in columns) + " |")
        if ablation.note:
            md += ["", ablation.note]
        base = tables_dir / ablation.name
        atomic_write_text(base.with_suffix(".md"), "\n".join(md) + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(base.with_suffix(".csv"), buffer.getvalue())
        atomic_write_text(base.with_suffix(".json"), json.dumps({"title": ablation.title, "note": ablation.note, "rows": rows}, indent=2) + "\n")
        written += [base.with_suffix(".md"), base.with_suffix(".csv"), base.with_suffix(".json")]
        if ablation.plot:
            written.append(plot_ablation(ablation, grid.datasets, rows, out / "plots" / f"{ablation.name}.png"))
    return written


def plot_ablation(ablation: Ablation, datasets: Sequence[str], rows: list[dict[str, Any]], path: Path) -> Path:
    """A line per dataset over the ablation's values, like the paper's Figure 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(datasets), 1, figsize=(4.5, 2.6 * len(datasets)), squeeze=False)
    x = list(range(len(rows)))
    for axis, dataset in zip(axes[:, 0], datasets):
        y = [row[dataset] for row in rows]
        axis.plot(x, [float("nan") if v is None else v for v in y], marker="o")
        axis.set_xticks(x, [row[ablation.header] for row in rows])
        axis.set_xlabel(ablation.header)
        axis.set_ylabel("score")
        axis.set_title(dataset)
        axis.grid(alpha=0.3)
    fig.suptitle(ablation.title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
