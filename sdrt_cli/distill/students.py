"""The trainable adapters, one per unit: intervention adapters, or a weights adapter's student.

Every student offers ``parameters_of(n)``, ``active(n, capture, training)`` (a context in which unit
n's adapter acts; it yields a handle whose ``captured`` holds the layers in ``capture``),
``edit(n, layer, hidden, where, vision)`` (unit n's edit of a cached layer output),
``lower_end(first)`` (how many decoder layers from the bottom are frozen, so their outputs can be
cached), ``state_tensors`` / ``load_state_tensors`` (checkpoints) and ``save(n, directory, extra)``.
``fresh_images`` True means the images' features depend on the trained weights (the ``projector``
adapter): the trainer encodes them at every step and caches nothing."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from sdrt_cli.adapters import AdapterConfig, InterventionAdapter, attach, lora_adapter, save_adapter
from sdrt_cli.backbone import Backbone
from sdrt_cli.distill.settings import StudentSpec
from sdrt_cli.hf import seeded


class NoCapture:
    """The handle of an ``active`` that captures no layer."""

    captured: dict[int, torch.Tensor] = {}

    def set_inputs(self, mask, vision=None, weights=None) -> None:
        pass


@contextlib.contextmanager
def layer_capture(backbone: Backbone, capture: Sequence[int]) -> Iterator[Any]:
    """For a student that changes weights, not hidden states: the outputs of the decoder layers
    ``capture`` lists, or nothing to capture."""
    if capture:
        with attach(backbone.decoder_layers, [], capture=capture) as handle:
            yield handle
    else:
        yield NoCapture()


class InterventionStudent:
    """N intervention adapters (reft, loreft, any registered kind); adapter n hooked for unit n."""

    fresh_images = False

    def __init__(self, backbone: Backbone, units: Sequence[str], spec: StudentSpec, seed: int):
        self.backbone = backbone
        self.units = list(units)
        self.spec = spec
        config = AdapterConfig(
            kind=spec.adapter,
            rank=spec.rank,
            layers=list(spec.layers),
            pos=spec.pos,
            hidden_size=backbone.hidden_size,
            skip=spec.skip,
            vision_dim=backbone.vision_hidden_size if spec.skip else None,
            init_std=spec.init_std,
        )
        self.adapters = []
        for n in range(len(self.units)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + n)
                self.adapters.append(InterventionAdapter(dataclasses.replace(config)).to(backbone.device))

    def parameters_of(self, n: int) -> list[nn.Parameter]:
        return list(self.adapters[n].parameters())

    def lower_end(self, first: int) -> int:
        return first + 1  # an intervention edits layer `first`'s output: that layer itself is frozen

    @contextlib.contextmanager
    def active(self, n: int, capture: Sequence[int], training: bool) -> Iterator[Any]:
        with attach(self.backbone.decoder_layers, self.adapters[n], capture=capture) as handle:
            yield handle

    def edit(self, n: int, layer: int, hidden: torch.Tensor, where: torch.Tensor, vision: torch.Tensor | None) -> torch.Tensor:
        """Adapter n's edit of ``layer``'s output ``hidden`` [B, T, H] at ``where`` — what its hook does
        when the layer runs; used on a cached output of a layer that does not need to run again."""
        adapter = self.adapters[n]
        if layer not in adapter.config.layers or not bool(where.any()):
            return hidden
        rows, cols = where.nonzero(as_tuple=True)
        selected = hidden[rows, cols]
        param = next(adapter.parameters())
        u = vision.to(param.device, param.dtype)[rows] if adapter.config.skip else None
        compute = torch.promote_types(hidden.dtype, torch.float32)
        delta = adapter.delta(layer, selected.to(param.dtype), u).to(compute)
        return hidden.index_put((rows, cols), (selected.to(compute) + delta).to(hidden.dtype))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v for n, a in enumerate(self.adapters) for k, v in a.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, adapter in enumerate(self.adapters):
            adapter.load_state_dict({k[len(f"{n}.") :]: v for k, v in tensors.items() if k.startswith(f"{n}.")})

    def save(self, n: int, directory: Path, extra: dict[str, Any]) -> None:
        save_adapter(directory, self.adapters[n], extra)


class LoraStudent:
    """N LoRAs on one peft-wrapped model, one named peft adapter per unit (peft's multi-adapter API:
    ``add_adapter`` / ``set_adapter``); unit n's adapter is the active one during its forward."""

    fresh_images = False

    def __init__(self, backbone: Backbone, units: Sequence[str], spec: StudentSpec, seed: int):
        self.lora = lora_adapter()
        self.backbone = backbone
        self.units = list(units)
        targets = {"targets": list(spec.lora_targets)} if spec.lora_targets else {}
        self.settings = self.lora.Settings(layers=list(spec.layers), rank=spec.rank, alpha=spec.lora_alpha, dropout=spec.lora_dropout, **targets)
        self.names = [f"unit{n}" for n in range(len(self.units))]
        # each unit's A is drawn from its own seed (B starts at 0: a fresh LoRA leaves the model unchanged)
        with seeded(seed * 1_000_003):
            self.peft_model = self.lora.apply(backbone.model, backbone.decoder_layers, self.settings, adapter_name=self.names[0])
        config = self.peft_model.peft_config[self.names[0]]
        for n, name in enumerate(self.names[1:], start=1):
            with seeded(seed * 1_000_003 + n):
                self.peft_model.add_adapter(name, copy.deepcopy(config))
        lora_layers = [module for module in self.peft_model.modules() if hasattr(module, "lora_dropout")]
        self.dropouts = {name: [layer.lora_dropout[name] for layer in lora_layers if name in layer.lora_dropout] for name in self.names}
        for dropouts in self.dropouts.values():
            for dropout in dropouts:
                dropout.train(False)  # peft injects them in training mode; `active` turns the unit's on
        self.params = {
            name: [p for key, p in self.peft_model.named_parameters() if f".{name}." in key] for name in self.names
        }
        self.peft_model.set_adapter(self.names[0])

    def parameters_of(self, n: int) -> list[nn.Parameter]:
        return list(self.params[self.names[n]])

    def lower_end(self, first: int) -> int:
        # LoRA on layer `first` trains that layer's own weights: the cache holds its input instead
        return first if first in self.settings.layers else first + 1

    @contextlib.contextmanager
    def active(self, n: int, capture: Sequence[int], training: bool) -> Iterator[Any]:
        name = self.names[n]
        self.peft_model.set_adapter(name)  # also makes only this adapter's weights require grad
        for dropout in self.dropouts[name]:
            dropout.train(training)
        try:
            with layer_capture(self.backbone, capture) as handle:
                yield handle
        finally:
            for dropout in self.dropouts[name]:
                dropout.train(False)

    def edit(self, n: int, layer: int, hidden: torch.Tensor, where: torch.Tensor, vision: torch.Tensor | None) -> torch.Tensor:
        return hidden  # LoRA changes weights, not layer outputs; a LoRA layer is never served from the cache

    def state_tensors(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {f"{n}.{key}": value for n, name in enumerate(self.names) for key, value in get_peft_model_state_dict(self.peft_model, adapter_name=name).items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        for n, name in enumerate(self.names):
            prefix = f"{n}."
            set_peft_model_state_dict(self.peft_model, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, adapter_name=name)

    def save(self, n: int, directory: Path, extra: dict[str, Any]) -> None:
        self.lora.save(directory, self.peft_model, self.settings, self.backbone.decoder_layers, extra, adapter_name=self.names[n])


def build_student(backbone: Backbone, units: Sequence[str], spec: StudentSpec, seed: int):
    """The student ``spec`` describes: intervention adapters, or the registered weights adapter's own."""
    from sdrt_cli.adapters import weights_adapter

    kind = weights_adapter(spec.adapter)
    return kind.student(backbone, units, spec, seed) if kind is not None else InterventionStudent(backbone, units, spec, seed)
