"""The trainable adapters, one per unit: intervention adapters or LoRA."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from sdrt_cli.adapters import AdapterConfig, InterventionAdapter, attach, lora_adapter, save_adapter
from sdrt_cli.backbone import Backbone
from sdrt_cli.distill.settings import StudentSpec


class _NoCapture:
    captured: dict[int, torch.Tensor] = {}

    def set_inputs(self, mask, vision=None, weights=None) -> None:
        pass


class InterventionStudent:
    """N intervention adapters (reft, loreft, any registered kind); adapter n hooked for unit n."""

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
    """N LoRA weight sets on one peft-wrapped model; unit n's set is bound into the LoRA modules
    before its forward (peft runs one adapter per forward; binding keeps one injected copy)."""

    def __init__(self, backbone: Backbone, units: Sequence[str], spec: StudentSpec, seed: int):
        self.lora = lora_adapter()
        self.backbone = backbone
        self.units = list(units)
        targets = {"targets": list(spec.lora_targets)} if spec.lora_targets else {}
        self.settings = self.lora.Settings(layers=list(spec.layers), rank=spec.rank, alpha=spec.lora_alpha, dropout=spec.lora_dropout, **targets)
        self.peft_model = self.lora.apply(backbone.model, backbone.decoder_layers, self.settings)
        self.slots: list[tuple[str, nn.Linear]] = []
        self.dropouts: list[nn.Module] = []
        for name, module in self.peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                self.slots.append((f"{name}.lora_A", module.lora_A["default"]))
                self.slots.append((f"{name}.lora_B", module.lora_B["default"]))
                self.dropouts.append(module.lora_dropout["default"])
        self.banks: list[list[nn.Parameter]] = []
        for n in range(len(self.units)):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + n)
            bank = []
            for slot_name, linear in self.slots:
                weight = torch.empty(linear.weight.shape, dtype=torch.float32)
                if slot_name.endswith("lora_A"):
                    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)  # peft's default for A
                else:
                    nn.init.zeros_(weight)  # B = 0: a fresh LoRA leaves the model unchanged
                bank.append(nn.Parameter(weight.to(linear.weight.device, linear.weight.dtype)))
            self.banks.append(bank)
        self.bind(0)

    def bind(self, n: int) -> None:
        for (_, linear), param in zip(self.slots, self.banks[n]):
            linear.weight = param

    def parameters_of(self, n: int) -> list[nn.Parameter]:
        return list(self.banks[n])

    @contextlib.contextmanager
    def active(self, n: int, capture: Sequence[int], training: bool) -> Iterator[Any]:
        self.bind(n)
        for dropout in self.dropouts:
            dropout.train(training)
        try:
            if capture:
                with attach(self.backbone.decoder_layers, [], capture=capture) as handle:
                    yield handle
            else:
                yield _NoCapture()
        finally:
            for dropout in self.dropouts:
                dropout.train(False)

    def edit(self, n: int, layer: int, hidden: torch.Tensor, where: torch.Tensor, vision: torch.Tensor | None) -> torch.Tensor:
        return hidden  # LoRA changes weights, not layer outputs; a LoRA layer is never served from the cache

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{name}": p for n, bank in enumerate(self.banks) for (name, _), p in zip(self.slots, bank)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, bank in enumerate(self.banks):
                for (name, _), p in zip(self.slots, bank):
                    p.copy_(tensors[f"{n}.{name}"])

    def save(self, n: int, directory: Path, extra: dict[str, Any]) -> None:
        self.bind(n)
        self.lora.save(directory, self.peft_model, self.settings, self.backbone.decoder_layers, extra)

