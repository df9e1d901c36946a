"""The ``projector`` adapter: MmDC's multimodal alignment (its stage 1) trains only the backbone's
multimodal projector, the module that maps vision-encoder features to the language model's input
embeddings; the vision tower and the language model stay frozen.

The backbone exposes its projector as ``Backbone.multimodal_projector`` (docs/backbones.md); a
backbone without one is refused.  ``sdrt distill --adapter projector --loss ce`` trains one projector
(``gold``) on gold answers; ``--loss mse+kl`` on a trace store trains one per prompt, like ``lora``.
A checkpoint is ``adapter.safetensors`` (the projector's parameters, under the module's own names,
e.g. ``linear_1.weight``) + ``adapter.json``; nothing is pickled.  A trained projector is used by
``sdrt eval`` through the core's ``projector`` backbone option (``--projector DIR``), which loads it
into the backbone for every later stage.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from sdrt_cli.adapters import (
    ADAPTER_JSON,
    ADAPTER_TENSORS,
    FORMAT_VERSION,
    WeightsAdapter,
    read_checkpoint,
    write_checkpoint,
)
from sdrt_cli.errors import SdrtError
from sdrt_cli.io import sha256_file

PROJECTOR_FORMAT = "sdrt-projector-adapter"


def projector_of(backbone: Any) -> nn.Module:
    """``backbone.multimodal_projector``, or one sentence naming the backbone that has none."""
    module = getattr(backbone, "multimodal_projector", None)
    if not isinstance(module, nn.Module):
        raise SdrtError(
            f"backbone {backbone.record().name!r} exposes no multimodal projector (its multimodal_projector is None), "
            "so the projector adapter cannot train or load one"
        )
    return module


def save_projector(directory: Path, tensors: Mapping[str, torch.Tensor], extra: Mapping[str, Any] | None = None) -> None:
    """Write the projector ``tensors`` (parameter name -> tensor) and ``extra`` as a checkpoint."""
    meta = {
        "format": PROJECTOR_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": {"parameters": {name: list(t.shape) for name, t in tensors.items()}},
        "extra": dict(extra or {}),
    }
    write_checkpoint(directory, tensors, meta)


def load_projector(directory: Path, backbone: Any) -> dict[str, torch.Tensor]:
    """The tensors of the projector checkpoint in ``directory``, checked against ``backbone``'s projector:
    the same parameter names and shapes, finite values; anything else is refused in one sentence."""
    directory = Path(directory)
    module = projector_of(backbone)
    json_path, tensor_path = directory / ADAPTER_JSON, directory / ADAPTER_TENSORS
    tensors, document = read_checkpoint(directory, PROJECTOR_FORMAT)
    config = document.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("parameters"), dict):
        raise SdrtError(f"{json_path}: field 'config.parameters' must be an object of parameter names and shapes")
    if sorted(config["parameters"]) != sorted(tensors):
        raise SdrtError(f"{json_path}: field 'config.parameters' names {sorted(config['parameters'])}, but {tensor_path} holds {sorted(tensors)}")
    name = backbone.record().name
    own = dict(module.named_parameters())
    for key, parameter in own.items():
        if key not in tensors:
            raise SdrtError(f"{tensor_path} lacks tensor {key!r} of backbone {name!r}'s projector")
        if tuple(tensors[key].shape) != tuple(parameter.shape):
            raise SdrtError(f"{tensor_path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, backbone {name!r}'s projector has {tuple(parameter.shape)}")
        if not bool(torch.isfinite(tensors[key]).all()):
            raise SdrtError(f"{tensor_path}: tensor {key!r} holds non-finite values")
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise SdrtError(f"{tensor_path} holds tensor {unexpected[0]!r}, which backbone {name!r}'s projector does not have")
    return tensors


@torch.no_grad()
def copy_into(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Overwrite ``module``'s parameters with ``tensors`` (cast to each parameter's device and dtype)."""
    for key, parameter in module.named_parameters():
        parameter.copy_(tensors[key].to(parameter.device, parameter.dtype))


def _swap(module: nn.Module, parameters: Mapping[str, nn.Parameter]) -> None:
    for key, parameter in parameters.items():
        owner, _, attribute = key.rpartition(".")
        setattr(module.get_submodule(owner), attribute, parameter)


class ProjectorStudent:
    """One copy of the projector's parameters per unit, float32 and starting from the backbone's own;
    unit n's copy is swapped into the projector module while unit n runs.

    Everything the language model sees of an image depends on the projector, so no decoder layer's
    output can be cached: ``fresh_images`` tells the trainer to encode the images again at every
    step (the frozen vision tower runs under no autograd graph; only the projector is differentiated).
    """

    fresh_images = True

    def __init__(self, backbone: Any, units: Sequence[str], spec: Any, seed: int):
        self.backbone = backbone
        self.module = projector_of(backbone)
        self.units = list(units)
        self.originals = dict(self.module.named_parameters())
        # the seed draws nothing: every unit starts from the backbone's projector
        self.copies = [{key: nn.Parameter(p.detach().float().clone()) for key, p in self.originals.items()} for _ in self.units]

    def lower_end(self, first: int) -> int:
        return 0

    def parameters_of(self, n: int) -> list[nn.Parameter]:
        return list(self.copies[n].values())

    @contextlib.contextmanager
    def active(self, n: int, capture: Sequence[int], training: bool):
        from sdrt_cli.distill.students import layer_capture

        dtype = self.backbone.dtype
        _swap(self.module, self.copies[n])
        # float32 weights in a model held in bf16/fp16: the projector computes in float32 and hands
        # the language model its own dtype
        hooks = [
            self.module.register_forward_pre_hook(lambda module, args: tuple(a.float() if torch.is_tensor(a) else a for a in args)),
            self.module.register_forward_hook(lambda module, args, output: output.to(dtype)),
        ]
        try:
            with layer_capture(self.backbone, capture) as handle:
                yield handle
        finally:
            for hook in hooks:
                hook.remove()
            _swap(self.module, self.originals)

    def edit(self, n: int, layer: int, hidden: torch.Tensor, where: torch.Tensor, vision: torch.Tensor | None) -> torch.Tensor:
        return hidden  # the projector changes weights, not layer outputs

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{key}": p for n, copy in enumerate(self.copies) for key, p in copy.items()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, copy in enumerate(self.copies):
            for key, p in copy.items():
                p.copy_(tensors[f"{n}.{key}"])

    def save(self, n: int, directory: Path, extra: dict[str, Any]) -> None:
        save_projector(directory, {key: p.detach() for key, p in self.copies[n].items()}, extra)


def checkpoint_directory(path: Path) -> Path:
    """The absolute checkpoint directory ``path`` names: a checkpoint itself, or a ``sdrt distill
    --adapter projector`` run (its ``gold`` adapter, or its only one)."""
    from sdrt_cli.formats import ADAPTERS_MANIFEST

    path = Path(path).resolve()
    if (path / ADAPTER_JSON).is_file() or not (path / ADAPTERS_MANIFEST).is_file():
        return path  # read_checkpoint refuses a directory without a checkpoint
    from sdrt_cli.distill import read_manifest

    manifest = read_manifest(path)
    if manifest.get("adapter") != "projector":
        raise SdrtError(f"{path} holds {manifest.get('adapter')!r} adapters, not a trained projector; pass a `sdrt distill --adapter projector` output")
    present = list(manifest["adapters"])
    chosen = "gold" if "gold" in present else (present[0] if len(present) == 1 else None)
    if chosen is None:
        raise SdrtError(f"{path} holds {len(present)} projectors and none named 'gold'; pass one of its adapter directories ({', '.join(present)})")
    return (path / manifest["adapters"][chosen]).resolve()


class ProjectorAdapter(WeightsAdapter):
    """Registry entry for ``projector``; ``checkpoint_directory`` and ``load_into`` serve the core's
    ``projector`` backbone option (``sdrt_cli.backbone.apply_projector``)."""

    format = PROJECTOR_FORMAT

    @classmethod
    def check_backbone(cls, backbone) -> None:
        projector_of(backbone)

    @classmethod
    def student(cls, backbone, units, spec, seed):
        return ProjectorStudent(backbone, units, spec, seed)

    @classmethod
    @contextlib.contextmanager
    def applied(cls, directory: Path, backbone):
        module = projector_of(backbone)
        tensors = load_projector(directory, backbone)
        originals = {key: p.detach().clone() for key, p in module.named_parameters()}
        copy_into(module, tensors)
        try:
            yield
        finally:
            copy_into(module, originals)

    checkpoint_directory = staticmethod(checkpoint_directory)

    @classmethod
    def load_into(cls, directory: Path, backbone) -> str:
        """Load the checkpoint in ``directory`` into ``backbone``'s projector for good; its tensors' sha256."""
        copy_into(projector_of(backbone), load_projector(directory, backbone))
        return sha256_file(Path(directory) / ADAPTER_TENSORS)  # what load_projector checked against adapter.json
