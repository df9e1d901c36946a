"""A distill run on disk: its layout, manifest, metrics log, checkpoint pointer and saved adapters."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrt_cli.adapters import load_adapter, read_checkpoint, weights_adapter
from sdrt_cli.backbone import Backbone, BackboneRecord
from sdrt_cli.errors import SdrtError
from sdrt_cli.formats import ADAPTERS_KIND, ADAPTERS_MANIFEST, AdaptersManifest
from sdrt_cli.io import atomic_write_text
from sdrt_cli.runinfo import RUN_INFO

MANIFEST = ADAPTERS_MANIFEST
METRICS = "metrics.jsonl"
ADAPTERS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"
CACHE_DIR = "cache"
LATEST = "latest.json"
CHECKPOINT_TENSORS = "trainer.safetensors"
CHECKPOINT_JSON = "trainer.json"
CHECKPOINT_FORMAT = "sdrt-distill-checkpoint"
MANIFEST_KIND = ADAPTERS_KIND
FORMAT_VERSION = 1


def holds_run(out: Path | str) -> bool:
    """Whether ``out`` holds a distill run, finished (a manifest) or not (a checkpoint)."""
    out = Path(out)
    return out.exists() and ((out / MANIFEST).exists() or read_latest(out) is not None)


def clear_run(out: Path | str) -> None:
    """Delete what a distill run writes into ``out`` (and nothing else there)."""
    for name in (MANIFEST, RUN_INFO, METRICS, ADAPTERS_DIR, CHECKPOINTS_DIR, CACHE_DIR):
        target = Path(out) / name
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def is_finished(out: Path | str, fingerprint: dict[str, Any]) -> bool:
    """Whether ``out`` holds a complete run with this fingerprint (a resume has nothing left to do)."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return False
    finished = json.loads(path.read_text(encoding="utf-8"))
    return finished.get("status") == "complete" and finished.get("fingerprint") == json.loads(json.dumps(fingerprint))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past ``step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    kept = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if line.get("step", 0) <= step:
            kept.append(text)
    atomic_write_text(path, "".join(t + "\n" for t in kept))


def read_latest(out: Path) -> Path | None:
    pointer = Path(out) / CHECKPOINTS_DIR / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise SdrtError(f"checkpoint pointer {pointer} is unreadable; start again with --overwrite") from None
    return Path(out) / CHECKPOINTS_DIR / name


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The run's manifest.json, validated (:class:`sdrt_cli.formats.AdaptersManifest`), as its JSON object."""
    return AdaptersManifest.load(out_dir).to_json()


@dataclass
class WeightsCheckpoint:
    """A saved weights adapter (``lora``, ``projector``; one per prompt, or ``gold``) of kind ``kind``:
    ``applied(backbone)`` puts its weights into the backbone's model for a ``with`` block and restores
    the original weights after it."""

    prompt_id: str
    path: Path
    kind: str

    def applied(self, backbone: Backbone):
        return weights_adapter(self.kind).applied(self.path, backbone)


def trained_backbone(out_dir: Path | str, manifest: dict[str, Any] | None = None) -> BackboneRecord:
    """The backbone a ``sdrt distill`` output was trained on (its manifest read unless given)."""
    manifest = read_manifest(out_dir) if manifest is None else manifest
    return BackboneRecord.from_json(manifest.get("backbone"), str(Path(out_dir) / MANIFEST))


def load_adapters(out_dir: Path | str, backbone: Backbone) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """The manifest and ``(prompt_id, adapter)`` pairs of a ``sdrt distill`` output, in training order.

    Intervention adapters come back as :class:`InterventionAdapter` on the backbone's device (attach
    them with :func:`sdrt_cli.adapters.attach`); weights adapters (LoRA, projector) as
    :class:`WeightsCheckpoint`.  A directory
    trained on another backbone is refused.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest.get("status") != "complete":
        raise SdrtError(f"{out_dir} holds an unfinished distill run; finish it with `sdrt distill ... --resume`")
    trained_backbone(out_dir, manifest).check_matches(backbone.record(), f"adapters in {out_dir} were trained on")
    pairs: list[tuple[str, Any]] = []
    for prompt_id in manifest["prompts"]:
        directory = out_dir / manifest["adapters"][prompt_id]
        kind = weights_adapter(manifest["adapter"])
        if kind is not None:
            read_checkpoint(directory, kind.format)  # verify now, apply later
            pairs.append((prompt_id, WeightsCheckpoint(prompt_id, directory, manifest["adapter"])))
        else:
            adapter = load_adapter(directory, device=backbone.device, expected={"prompt_id": prompt_id, "hidden_size": backbone.hidden_size})
            pairs.append((prompt_id, adapter.eval()))
    return manifest, pairs


def write_manifest(out: Path, document: dict[str, Any]) -> None:
    AdaptersManifest.from_json(document, Path(out) / MANIFEST).save(out)


def warm_start_adapters(run_dir: Path, backbone, spec, prompt_ids: list[str]) -> dict[str, tuple[dict, str]]:
    """Per prompt: the state of ``run_dir``'s adapter for it and that file's sha256; refuses, in one
    sentence, a run that lacks a prompt or whose adapters have another shape than ``spec``'s."""
    from sdrt_cli.io import sha256_file

    manifest, pairs = load_adapters(run_dir, backbone)  # refuses another backbone
    if weights_adapter(manifest.get("adapter")) is not None or manifest.get("mode") == "gold":
        raise SdrtError(
            f"--init-from {run_dir} holds {manifest.get('adapter')!r} adapters trained on {manifest.get('mode', 'traces')}; "
            "warm-start from a run of per-prompt intervention adapters"
        )
    loaded = dict(pairs)
    wanted = {"kind": spec.adapter, "rank": spec.rank, "layers": list(spec.layers), "pos": spec.pos, "skip": spec.skip}
    found: dict[str, tuple[dict, str]] = {}
    for prompt in prompt_ids:
        if prompt not in loaded:
            raise SdrtError(f"--init-from {run_dir} has no adapter for prompt {prompt!r} (it has: {', '.join(loaded)})")
        config = loaded[prompt].config
        for field, value in wanted.items():
            have = list(getattr(config, field)) if field == "layers" else getattr(config, field)
            if have != value:
                raise SdrtError(f"--init-from {run_dir}: adapter {prompt!r} has {field} {have!r}, this run trains {value!r}; warm-start from adapters of the same shape")
        found[prompt] = (loaded[prompt].state_dict(), sha256_file(run_dir / manifest["adapters"][prompt] / "adapter.safetensors"))
    return found
