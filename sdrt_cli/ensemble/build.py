"""Building an ensemble from an adapters directory and its trace store."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import torch

from sdrt_cli.backbone import Backbone, BackboneRecord
from sdrt_cli.ensemble.finetune import finetune_predictor_kl
from sdrt_cli.ensemble.predictor import TrainSettings, confidence_labels, train_predictor
from sdrt_cli.ensemble.runtime import (
    Ensemble,
    check_members_compatible,
    ensemble_dir,
    first_intervened_layer,
    load_intervention_run,
    save_ensemble,
    vision_input,
)
from sdrt_cli.errors import SdrtError
from sdrt_cli.formats import check_example_id
from sdrt_cli.overlap import TRAINED_ON, trained_on
from sdrt_cli.prompting import prompt_features


def select_members(available: Sequence[str], members: int | str | None, where: str) -> list[str]:
    """``None`` = all; K (int or "K") = the first K in pack order; "a,b" = those prompt ids."""
    if members is None or (isinstance(members, str) and not members.strip()):
        return list(available)
    if isinstance(members, str) and members.strip().isdigit():
        members = int(members.strip())
    if isinstance(members, int) and not isinstance(members, bool):
        if members < 1:
            raise SdrtError(f"--members must be at least 1, got {members}")
        if members > len(available):
            raise SdrtError(f"--members {members} asks for more adapters than the {len(available)} in {where}")
        return list(available)[:members]
    ids = [part.strip() for part in str(members).split(",") if part.strip()]
    for pid in ids:
        if pid not in available:
            raise SdrtError(f"--members names prompt {pid!r}, which has no adapter in {where} (those are: {', '.join(available)})")
    if len(set(ids)) != len(ids):
        raise SdrtError(f"--members {members!r} names a prompt twice")
    return ids


def check_store_matches(store, manifest: dict[str, Any], run_dir: Path, members: Sequence[str]) -> None:
    """The trace store must be the one the adapters were trained on (or that store extended with
    more examples: same backbone, pack and trace settings)."""
    traced = (manifest.get("traces") or {}).get("fingerprint")
    if not isinstance(traced, dict):
        raise SdrtError(f"the adapters in {run_dir} were not trained on a trace store (their manifest has no 'traces.fingerprint')")
    problem = BackboneRecord.from_json(traced.get("backbone"), f"{run_dir}/manifest.json: traces.fingerprint").mismatch(store.backbone)
    if problem:
        raise SdrtError(f"trace store {store.root} was made with another backbone than the adapters in {run_dir} were trained on ({problem})")
    if store.fingerprint != traced:
        from sdrt_cli.config import describe_differences

        raise SdrtError(
            f"trace store {store.root} is not the one the adapters in {run_dir} were trained on "
            f"({describe_differences(store.fingerprint, traced, 'store')}; the adapters' store is {manifest['traces'].get('path')})"
        )
    missing = [m for m in members if m not in store.prompt_ids]
    if missing:
        raise SdrtError(f"trace store {store.root} has no traces for prompt {missing[0]!r} (it traced: {', '.join(store.prompt_ids)})")


def open_store_dataset(store, data_dir: Path | str | None = None):
    """The dataset a trace store was made from, as its fingerprint records it (``data_dir`` overrides)."""
    from sdrt_cli.data import open_dataset

    info = dict(store.fingerprint.get("dataset") or {})
    if not info.get("name"):
        raise SdrtError(f"trace store {store.root} does not record its dataset (fingerprint.dataset.name)")
    limit = max(store.example_indices) + 1 if store.example_indices else 0
    return open_dataset(
        info["name"],
        data_dir=data_dir if data_dir is not None else info.get("data_dir"),
        split=info.get("split"),
        limit=limit,
        seed=int(info.get("seed", 0)),
        **dict(info.get("options") or {}),
    )


def store_features(backbone: Backbone, store, dataset, layer: int, batch_size: int, on_batch=None) -> tuple[list[int], torch.Tensor]:
    """This rank's share of the store's examples and their predictor inputs [n, H]."""
    from sdrt_cli import distributed

    wanted = set(store.example_indices)
    first_prompt = store.prompt_ids[0]
    world, rank = distributed.world_size(), distributed.rank()
    indices: list[int] = []
    feats: list[torch.Tensor] = []
    pending: list[tuple[int, Any]] = []

    def flush() -> None:
        if pending:
            feats.append(prompt_features(backbone, dataset, [ex for _, ex in pending], layer))
            indices.extend(i for i, _ in pending)
            if on_batch is not None:
                on_batch(len(pending))
            pending.clear()

    for index, example in zip(range(rank, 1 << 62, world), dataset.iter_shard(rank, world)):
        if index not in wanted:
            continue
        traced_id = store.meta(index, first_prompt)["example_id"]
        check_example_id(index, dataset.name, example.id, traced_id, f"trace store {store.root}", "use the dataset the store was made from")
        pending.append((index, example))
        if len(pending) == batch_size:
            flush()
    flush()
    width = backbone.hidden_size
    return indices, torch.cat(feats) if feats else torch.zeros(0, width)


def build_ensemble(
    adapters_dir: Path | str,
    backbone: Backbone,
    traces_dir: Path | str | None,
    members: int | str | None = None,
    name: str | None = None,
    uniform: bool = False,
    settings: TrainSettings | None = None,
    data_dir: Path | str | None = None,
    batch_size: int = 4,
    progress_bar=None,
) -> tuple[Path | None, dict[str, Any]]:
    """Train (or, ``uniform``, just record) an ensemble of K adapters and save it beside them.

    Returns the saved directory (None on ranks other than 0) and the training report.
    ``progress_bar(description, total)`` is a context manager yielding an object with
    ``advance(n)`` (``sdrt_cli.progress.progress_bar``); None shows nothing.
    """
    from sdrt_cli import distributed
    from sdrt_cli.trace_store import TraceStore

    adapters_dir = Path(adapters_dir)
    settings = settings or TrainSettings()
    manifest, pairs = load_intervention_run(adapters_dir, backbone)
    available = [pid for pid, _ in pairs]
    chosen = select_members(available, members, str(adapters_dir / "adapters"))
    by_id = dict(pairs)
    adapters = [by_id[m] for m in chosen]
    check_members_compatible(adapters, str(adapters_dir))
    name = name or (f"uniform-k{len(chosen)}" if uniform else f"k{len(chosen)}")
    if not name or "/" in name or name.startswith("."):
        raise SdrtError(f"ensemble name {name!r} must be a plain directory name")
    layer = first_intervened_layer(adapters)
    ensemble = Ensemble(name=name, members=chosen, adapters=adapters, feature_layer=layer, vision=vision_input(manifest, adapters))
    extra: dict[str, Any] = {
        "backbone": backbone.record().to_json(),
        "adapters": {"type": manifest.get("adapter"), "loss": manifest.get("loss"), "available": available},
    }
    report: dict[str, Any] = {}
    extra[TRAINED_ON] = None  # uniform or single member: learned from no examples
    if len(chosen) == 1 and not uniform:
        # one member always has weight 1: no features to compute, nothing to learn
        if traces_dir is not None:
            check_store_matches(TraceStore(traces_dir), manifest, adapters_dir, chosen)
        report = {"single_member": True}
        extra["training"] = {"report": report}
    elif not uniform:
        if traces_dir is None:
            raise SdrtError("choose the trace store the adapters were trained on with --traces (or build a --uniform ensemble)")
        store = TraceStore(traces_dir)
        check_store_matches(store, manifest, adapters_dir, chosen)
        dataset = open_store_dataset(store, data_dir)
        share = len([i for i in store.example_indices if i % distributed.world_size() == distributed.rank()])
        with (progress_bar("ensemble features", share) if progress_bar else contextlib.nullcontext()) as bar:
            indices, feats = store_features(backbone, store, dataset, layer, batch_size, bar.advance if bar else None)
        parts = distributed.gather_objects((indices, feats))
        all_indices = [i for ids, _ in parts for i in ids]
        order = sorted(range(len(all_indices)), key=all_indices.__getitem__)  # dataset order, whatever the ranks
        all_indices = [all_indices[j] for j in order]
        all_feats = torch.cat([f for _, f in parts])[order]
        labels, confidences = confidence_labels(store, all_indices, chosen, settings.label)
        predictor, report = train_predictor(all_feats, labels, len(chosen), settings)
        ensemble.predictor = predictor.to(backbone.device)
        if settings.kl_epochs > 0:
            report["kl_finetune"] = finetune_predictor_kl(ensemble, backbone, store, dataset, all_indices, labels, settings, progress_bar)
        report["mean_best_confidence"] = float(confidences.max(1).values.mean())
        report["label_counts"] = dict(zip(chosen, report["label_counts"]))
        extra["traces"] = {"path": str(Path(traces_dir).resolve()), "examples": len(all_indices), "dataset": store.fingerprint.get("dataset")}
        # the predictor learned from every store example (its held-out ones chose the step): none may be scored
        extra[TRAINED_ON] = trained_on(dict(store.fingerprint.get("dataset") or {}), (store.meta(i, chosen[0])["example_id"] for i in all_indices))
        extra["training"] = {**settings.as_dict(), "report": report}
    directory = ensemble_dir(adapters_dir, name)
    if distributed.is_main():
        save_ensemble(directory, ensemble, extra)
        return directory, report
    return None, report
