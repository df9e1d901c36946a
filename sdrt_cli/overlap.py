"""Split discipline: what a run learned from, and the guard that refuses to score it on those examples.

Every run that learns from examples records them in its manifest under ``trained_on``:
``{"dataset": NAME, "split": SPLIT, "data_dir": ..., "example_ids": [...]}`` (``None`` when it
learned from no examples, e.g. a uniform ensemble).  ``sdrt eval`` (and so every ``sdrt ablate``
eval stage) calls :func:`check_train_overlap` before the model loads.  Examples are matched by
dataset name, split and example id; the data directory is ignored, so a copy of the same benchmark
elsewhere still counts as the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sdrt_cli.errors import SdrtError

TRAINED_ON = "trained_on"
ALLOW_FLAG = "--allow-train-overlap"


def trained_on(dataset_identity: dict[str, Any], example_ids: Iterable[str]) -> dict[str, Any]:
    """The ``trained_on`` record of a run that learned from ``example_ids`` of one dataset split."""
    return {
        "dataset": dataset_identity.get("name"),
        "split": dataset_identity.get("split"),
        "data_dir": dataset_identity.get("data_dir"),
        "example_ids": sorted(set(example_ids)),
    }


@dataclass
class TrainedRun:
    """One run whose training examples an evaluation must avoid: ``label`` names it in messages,
    ``record`` is its manifest's ``trained_on`` (``missing`` when the manifest has no such field)."""

    label: str
    record: dict[str, Any] | None
    missing: bool = False


def trained_run(label: str, manifest: dict[str, Any]) -> TrainedRun:
    return TrainedRun(label, manifest.get(TRAINED_ON), missing=TRAINED_ON not in manifest)


def overlap_count(run: TrainedRun, dataset_name: str, split: str, example_ids: Iterable[str]) -> int:
    record = run.record
    if not record or record.get("dataset") != dataset_name or record.get("split") != split:
        return 0
    return len(set(record.get("example_ids") or ()) & set(example_ids))


def check_train_overlap(dataset, runs: Sequence[TrainedRun], allow: bool) -> str | None:
    """Refuse to score ``dataset``'s examples with a method that learned from any of them.

    Raises :class:`SdrtError` naming the run, the split and how many examples overlap, or a run
    whose manifest does not say what it learned from; with ``allow`` (debugging only) returns the
    warning line the results must carry instead.  None: nothing overlaps.
    """
    if not runs:
        return None
    ids = set(dataset.ids())
    problems = []
    for run in runs:
        if run.missing:
            problem = f"{run.label} does not record the examples it was trained on (no '{TRAINED_ON}' in its manifest), so the evaluation cannot be checked against them"
        else:
            count = overlap_count(run, dataset.name, dataset.split, ids)
            if not count:
                continue
            problem = f"{run.label} was trained on {count} of the {len(ids)} {dataset.name!r} {dataset.split!r} examples being scored"
        if not allow:
            raise SdrtError(f"{problem}; score another split (e.g. --split validation after training on train) or pass {ALLOW_FLAG} to debug")
        problems.append(problem)
    if not problems:
        return None
    return f"WARNING: not a valid evaluation ({ALLOW_FLAG}): " + "; ".join(problems) + "."


def eval_training_runs(methods: Sequence[str], adapters=None, ensemble: str | None = None, lora=None, projector=None) -> list[TrainedRun]:
    """The runs whose training examples ``sdrt eval --method ...`` must not score: for ``sdrt`` the
    adapters and the saved ensemble's predictor, for ``lora`` the LoRA run, for every method the
    ``sdrt distill --adapter projector`` run whose projector the backbone loads (``projector``: that
    run or one of its adapter directories; a checkpoint outside a run records no examples).  Read
    before any model loads."""
    import json
    from pathlib import Path

    from sdrt_cli.distill import read_manifest
    from sdrt_cli.ensemble import ensemble_dir, saved_ensembles
    from sdrt_cli.formats import EnsembleManifest

    runs = []
    if "sdrt" in methods and adapters is not None:
        runs.append(trained_run(f"adapters run {adapters}", read_manifest(Path(adapters))))
        saved = saved_ensembles(adapters)
        name = ensemble if ensemble is not None else (saved[0] if len(saved) == 1 else None)
        meta_path = ensemble_dir(adapters, name) / "adapter.json" if name else None
        if meta_path is not None and meta_path.is_file():  # otherwise loading the ensemble refuses it
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise SdrtError(f"{meta_path} is not readable JSON: {exc}") from None
            runs.append(trained_run(f"ensemble {name!r} of {adapters}", EnsembleManifest.from_json(meta, meta_path).to_json()))
    if "lora" in methods and lora is not None:
        runs.append(trained_run(f"LoRA run {lora}", read_manifest(Path(lora))))
    if projector is not None:
        from sdrt_cli.formats import ADAPTERS_MANIFEST

        # a run directory, or a checkpoint inside one (RUN/adapters/NAME)
        for run_dir in (Path(projector), Path(projector).parent.parent):
            if (run_dir / ADAPTERS_MANIFEST).is_file():
                runs.append(trained_run(f"projector run {run_dir}", read_manifest(run_dir)))
                break
    return runs
