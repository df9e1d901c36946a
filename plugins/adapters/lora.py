"""The ``lora`` adapter: peft LoRA on the language model's projections of chosen layers.

The defaults are those of a usual, fair LoRA fine-tune: rank 16, alpha 32, dropout 0.05, on every
attention (q, k, v, o) and MLP (gate, up, down) projection of the chosen layers.

Used for the Table 5 ablation (LoRA trained with the self-distillation losses) and the Table 1
"Fine-tuning" baseline (LoRA trained with cross-entropy on gold answers).  Only the decoder layers
listed in :class:`LoraSettings` get LoRA weights; the vision tower (whose CLIP layers also have
``q_proj``/``k_proj``/``v_proj``) is never touched, because the target is a regex anchored on the
language model's own decoder-layer list.  Checkpoints follow the intervention adapters' convention:
``adapter.safetensors`` + ``adapter.json``, no pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from sdrt_cli.adapters import (
    ADAPTER_JSON,
    ADAPTER_TENSORS,
    FORMAT_VERSION,
    LAYER_LIST,
    WeightsAdapter,
    is_layer_list,
    read_checkpoint,
    write_checkpoint,
)
from sdrt_cli.errors import SdrtError

LORA_FORMAT = "sdrt-lora-adapter"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; ``layers`` are absolute decoder-layer indices (as for ``reft``)."""

    layers: list[int]
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        self.validate("LoRA settings")

    def validate(self, source: str) -> None:
        def bad(name: str, need: str) -> SdrtError:
            return SdrtError(f"{source}: field {name!r} must be {need}, got {getattr(self, name)!r}")

        if not is_layer_list(self.layers):
            raise bad("layers", LAYER_LIST)
        self.layers = sorted(self.layers)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise bad("rank", "a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise bad("alpha", "a positive number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise bad("dropout", "a number in [0, 1)")
        if (
            not isinstance(self.targets, (list, tuple))
            or not self.targets
            or any(not isinstance(t, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t) for t in self.targets)
        ):
            raise bad("targets", "a non-empty list of module names such as q_proj")
        self.targets = list(self.targets)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> LoraSettings:
        if not isinstance(data, dict):
            raise SdrtError(f"{source}: 'config' must be an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SdrtError(f"{source}: unknown config field {unknown[0]!r}")
        if "layers" not in data:
            raise SdrtError(f"{source}: config field 'layers' is missing")
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(obj, f.name, data.get(f.name, default))
        obj.validate(source)
        return obj


def layers_path(model: nn.Module, decoder_layers: Sequence[nn.Module]) -> str:
    """The qualified name of the module list holding ``decoder_layers`` inside ``model``."""
    first = decoder_layers[0]
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(decoder_layers) and module[0] is first:
            return name
    raise SdrtError("the decoder layers given are not a module list inside this model")


def target_pattern(path: str, layers: Sequence[int], targets: Sequence[str]) -> str:
    """peft regex (full match on module names) for ``targets`` of the listed layers under ``path``."""
    layer_alt = "|".join(str(i) for i in sorted(layers))
    target_alt = "|".join(re.escape(t) for t in targets)
    return rf"{re.escape(path)}\.({layer_alt})\.(.*\.)?({target_alt})"


def _peft_config(path: str, settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_pattern(path, settings.layers, settings.targets),
        bias="none",
    )


def apply_lora(model: nn.Module, decoder_layers: Sequence[nn.Module], settings: LoraSettings, adapter_name: str = "default"):
    """Wrap ``model`` in a peft model with fresh LoRA weights (B = 0: outputs unchanged) on the chosen
    layers' target projections, as peft adapter ``adapter_name``; the base weights are frozen.
    ``model`` is modified in place."""
    from peft import get_peft_model

    count = len(decoder_layers)
    for layer in settings.layers:
        if layer >= count:
            raise SdrtError(f"LoRA layer {layer} is out of range: the backbone has {count} decoder layers (0..{count - 1})")
    path = layers_path(model, decoder_layers)
    try:
        with warnings.catch_warnings():
            # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` property inside
            # get_peft_model: that deprecated call is peft's, not ours
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            peft_model = get_peft_model(model, _peft_config(path, settings), adapter_name=adapter_name)
    except ValueError as exc:  # peft: no module matched the target regex
        raise SdrtError(f"LoRA targets {settings.targets} match nothing in decoder layers {settings.layers} of this model ({exc})") from None
    wanted = {(layer, target) for layer in settings.layers for target in settings.targets}
    found = set()
    prefix = re.compile(rf"(?:.*\.)?{re.escape(path)}\.(\d+)\..*?([A-Za-z0-9_]+)$")
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A"):
            match = prefix.match(name)
            if match:
                found.add((int(match.group(1)), match.group(2)))
    if wanted - found:
        layer, target = sorted(wanted - found)[0]
        raise SdrtError(f"LoRA target {target!r} was not found in decoder layer {layer} of this model")
    return peft_model


def save_lora(
    directory: Path, peft_model, settings: LoraSettings, decoder_layers: Sequence[nn.Module], extra: Mapping[str, Any] | None = None, adapter_name: str = "default"
) -> None:
    """Save only the weights of peft adapter ``adapter_name`` (safetensors; keys without the adapter
    name, so any adapter loads back as ``default``) and ``settings`` + ``extra`` (JSON)."""
    from peft import get_peft_model_state_dict

    meta = {
        "format": LORA_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(settings),
        "layers_path": layers_path(peft_model.get_base_model(), decoder_layers),
        "extra": dict(extra or {}),
    }
    write_checkpoint(directory, get_peft_model_state_dict(peft_model, adapter_name=adapter_name), meta)


def load_lora(directory: Path, model: nn.Module, decoder_layers: Sequence[nn.Module], device: str | torch.device | None = None):
    """Apply the saved LoRA to ``model`` (a plain backbone model, modified in place) and return the peft
    model, in eval mode."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    directory = Path(directory)
    json_path, tensor_path = directory / ADAPTER_JSON, directory / ADAPTER_TENSORS
    if device is None:
        device = next(model.parameters()).device
    tensors, document = read_checkpoint(directory, LORA_FORMAT, device)
    settings = LoraSettings.from_dict(document.get("config"), str(json_path))
    saved_path = document.get("layers_path")
    path = layers_path(model, decoder_layers)
    if saved_path != path:
        raise SdrtError(f"{json_path}: field 'layers_path' is {saved_path!r} but this model's decoder layers are at {path!r}")
    peft_model = apply_lora(model, decoder_layers, settings)
    fresh = get_peft_model_state_dict(peft_model)
    for name, value in fresh.items():
        if name not in tensors:
            raise SdrtError(f"{tensor_path} lacks LoRA tensor {name!r} that the config in {json_path} implies")
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise SdrtError(f"{tensor_path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the config in {json_path} implies {tuple(value.shape)}")
    unexpected = sorted(set(tensors) - set(fresh))
    if unexpected:
        raise SdrtError(f"{tensor_path} holds tensor {unexpected[0]!r} that the config in {json_path} does not use")
    set_peft_model_state_dict(peft_model, tensors)
    return peft_model.eval()  # loaded for inference: the freshly injected LoRA dropout modules start in training mode


class LoraAdapter(WeightsAdapter):
    """Registry entry for ``lora``: the functions the trainer and evaluator call."""

    Settings = LoraSettings
    format = LORA_FORMAT
    apply = staticmethod(apply_lora)
    save = staticmethod(save_lora)
    load = staticmethod(load_lora)

    @classmethod
    def student(cls, backbone, units, spec, seed):
        from sdrt_cli.distill.students import LoraStudent

        return LoraStudent(backbone, units, spec, seed)

    @classmethod
    @contextlib.contextmanager
    def applied(cls, directory: Path, backbone):
        peft_model = load_lora(directory, backbone.model, backbone.decoder_layers, device=backbone.device)
        try:
            yield
        finally:
            peft_model.base_model.unload()  # the original projections back: later users see the plain model
