"""Distillation: train one adapter per prompt so the single-step student reproduces the two-step teacher.

The student, per (example, prompt n) — the trace contract seen from the student side
====================================================================================
* The example's images are encoded once (``encode_images``, with ``early_layer`` when the vision skip
  connection is on; the early features are pooled by :func:`sdrt_cli.adapters.pool_vision_features`).
* The student prompt is ``S = tokenize(render_chat(student_turns(dataset, example)))`` and the fed
  sequence is ``S + y2[:-1]`` (the teacher's answer, teacher-forced; its last token is never fed).
* The teacher record has ``R = prompt_rows + len(y2) - 1`` aligned rows; they are EXACTLY the last
  ``R`` positions of the fed sequence (row j predicts the token after it).  The last ``prompt_rows``
  ids of ``S`` must be the record's ``prompt_tail_ids`` (``check_prompt_alignment``).
* Adapter ``n`` intervenes at the first and last ``pos`` positions of ``S`` only, on ``layers``.
* ``mse`` compares the student's decoder-layer outputs (residual stream before the final norm, after
  the adapter's edit) on the store's layers with the stored ``hidden``; ``kl`` compares
  ``lm_logits(final_norm(last layer output))`` at the rows, in float32 even under bf16 autocast
  (``Backbone.float32_logits``), with the stored top-k + tail bucket.
* Gold mode (``--loss ce``): the fed sequence is ``S`` + the first gold answer as the chat template
  writes an assistant turn, cut at the end of the answer text and ended with the tokenizer's EOS id
  (:func:`gold_answer_ids`), minus its last token; the rows are the last ``len(answer)`` positions and
  CE scores each answer token.  One adapter, ``gold``.

Objective and batching
======================
A step takes a global batch of B examples (shuffled per epoch from the seed).  Every adapter sees the
same B examples; adapter n's objective is ``(1/B) Σ_examples loss(example, n)`` where ``loss`` is the
composed loss evaluated on that example's own rows (so padding never leaks in and every example
weighs the same, however long its answer).  The adapters are independent: each has its own gradient
clipping, and AdamW is element-wise, so training N adapters together equals training each alone.
Sequences are right-padded (real tokens never attend to padding) and run in micro-batches of
``micro_batch_size`` sequences; gradients accumulate, which is exact because the objective is a sum.

Caching the frozen lower layers
===============================
Nothing below the first layer anything trainable touches (``f = min(intervened ∪ compared layers)``)
depends on the adapters.  An intervention edits layer f's OUTPUT, so layer f itself is frozen too:
the cache holds layer f's un-edited output, ``run_layers(embed(ids, image features), ..., 0, f + 1)``
(for LoRA on layer f, whose weights train, it holds layer f's input, ``run_layers(..., 0, f)``).  It
is computed once per example under ``no_grad`` — for all of the example's sequences, whose shared
prompt part runs once and is stored once (the answer tails run on its keys and values) — and kept in RAM up to ``cache_ram_gb``
(backbone dtype), then on disk under ``OUT/cache/`` as safetensors up to ``cache_disk_gb``; beyond
both it is recomputed (vision tower included) whenever needed.  Each step applies layer f's edit to
the cached output and runs only ``run_layers(edited, ..., f + 1, end)`` with the adapter hooks
attached (``end`` stops after the last compared layer when no loss reads logits).

Scale and resume
================
What a run fixes is the sequence of global batches (:func:`epoch_batches`: it depends on the seed and
the batch size, never on the number of processes).  Under torchrun every rank takes its slots of each
global batch (B/W examples, every step, always the same examples, so each rank's cache holds only its
own share), scales its loss by ``1/B`` of the global batch and the adapters' gradients are summed over
ranks: the gradient of the same global batch as one process, exactly in real arithmetic (on CPU the
float results agree to rounding; see docs/gpu.md for GPUs).  B must be at least the number of
processes W, so that no rank idles.
Checkpoints (every epoch and every ``save_every`` steps) hold the adapters, AdamW state, the step,
the epoch position and every rank's own RNG state (CPU and its GPU; ranks are seeded ``seed + rank``
so their dropout masks differ) in safetensors + JSON; ``resume`` continues bit-for-bit on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from sdrt_cli import distributed
from sdrt_cli.adapters import (
    AdapterConfig,
    InterventionAdapter,
    attach,
    intervention_positions,
    load_adapter,
    pool_vision_features,
    save_adapter,
)
from sdrt_cli.backbone import Backbone, Turn
from sdrt_cli.config import describe_differences
from sdrt_cli.data import Dataset, Example, ExamplesByIndex
from sdrt_cli.errors import SdrtError
from sdrt_cli.io import append_jsonl, atomic_write_bytes, atomic_write_text, sha256_file
from sdrt_cli.losses import CompositeLoss, DistillBatch, compose
from sdrt_cli.teacher_forcing import check_prompt_alignment
from sdrt_cli.traces import student_turns

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
ADAPTERS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"
CACHE_DIR = "cache"
LATEST = "latest.json"
CHECKPOINT_TENSORS = "trainer.safetensors"
CHECKPOINT_JSON = "trainer.json"
CHECKPOINT_FORMAT = "sdrt-distill-checkpoint"
MANIFEST_KIND = "adapters"
FORMAT_VERSION = 1
GOLD = "gold"
IDENTITY_KEYS = ("config_hash", "weights_hash", "tokenizer_hash", "chat_template_hash")
SCHEDULES = ("linear", "cosine", "constant")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass
class StudentSpec:
    """What the adapters are: kind, where they act, their size.  ``layers`` and ``compare_layers``
    are absolute decoder-layer indices; ``compare_layers`` are the store's layers, in its order."""

    adapter: str = "reft"
    layers: list[int] = field(default_factory=list)
    compare_layers: list[int] = field(default_factory=list)
    pos: int = 5
    rank: int = 4
    init_std: float | None = None
    skip: bool = False
    skip_layer: int | None = None
    skip_pool: str = "mean"
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None: the lora plugin's default (attention + MLP projections)

    @property
    def is_lora(self) -> bool:
        return self.adapter == "lora"


DEFAULT_BATCH_SIZE = 4


def default_batch_size(world: int) -> int:
    """The global batch when --batch-size is not given: 4, or one example per process on more than 4
    (every rank must train at every step).  Give --batch-size to fix the batch across process counts."""
    return max(DEFAULT_BATCH_SIZE, world)


@dataclass
class TrainSettings:
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    micro_batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    val_fraction: float = 0.0
    seed: int = 0
    autocast: bool = True  # bf16 autocast of the trainable part, on CUDA only
    save_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    cache_ram_gb: float = 8.0
    cache_disk_gb: float = 50.0

    # how the run computes, not what it computes: a resumed run may change these
    RUNTIME_ONLY = ("save_every", "cache_ram_gb", "cache_disk_gb", "micro_batch_size")

    def validate(self, world: int = 1) -> None:
        """Refuse impossible settings in one sentence; ``world`` is the number of processes."""
        checks = [
            ("epochs", self.epochs >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, "at least 1"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a number >= 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("max_grad_norm", math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, "a number >= 0 (0 = no clipping)"),
            ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)"),
            ("save_every", self.save_every >= 0, "a number of steps >= 0"),
            ("cache_ram_gb", self.cache_ram_gb >= 0, ">= 0 (0 = no RAM cache)"),
            ("cache_disk_gb", self.cache_disk_gb >= 0, ">= 0 (0 = no disk cache)"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise SdrtError(f"--{name.replace('_', '-')} must be {need}, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SdrtError(f"--max-steps must be at least 1, got {self.max_steps!r}")
        if self.batch_size < world:
            raise SdrtError(
                f"--batch-size {self.batch_size} is smaller than the {world} processes, so some would idle at every step; "
                f"use --batch-size {world} or a multiple of it"
            )
        if self.schedule not in SCHEDULES:
            raise SdrtError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def lr_at(step: int, total: int, settings: TrainSettings) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    warmup = math.ceil(settings.warmup_ratio * total)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    if settings.schedule == "constant":
        return settings.lr
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if settings.schedule == "linear":
        return settings.lr * (1.0 - progress)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Sources: what the student is fed and what it is compared with
# ---------------------------------------------------------------------------------------------


@dataclass
class ExampleInputs:
    """Everything about one example that is cheap to keep for the whole run."""

    index: int
    example_id: str
    prompt_ids: list[int]  # S
    tails: dict[str, list[int]]  # unit -> tokens fed after S
    rows: dict[str, int]  # unit -> R, the aligned rows = the last R fed positions
    labels: dict[str, list[int]] = field(default_factory=dict)  # gold: the R answer ids
    vision: torch.Tensor | None = None  # pooled early vision features (float32) for the skip

    def length(self, unit: str) -> int:
        return len(self.prompt_ids) + len(self.tails[unit])


class TraceSource:
    """Teacher targets from a trace store; one unit (adapter) per prompt."""

    mode = "traces"

    def __init__(self, store, dataset: Dataset, prompt_ids: Sequence[str], examples: ExamplesByIndex):
        self.store = store
        self.dataset = dataset
        self.units = list(prompt_ids)
        self.examples = examples
        self.layer_count = len(store.fingerprint["settings"]["layers"])

    def prepare(self, backbone: Backbone, index: int, example: Example, token_counts: Sequence[int]) -> ExampleInputs:
        prompt = backbone.tokenize(backbone.render_chat(student_turns(self.dataset, example)), token_counts)
        tails, rows = {}, {}
        for unit in self.units:
            meta = self.store.meta(index, unit)
            if meta["example_id"] != example.id:
                raise SdrtError(
                    f"dataset example {index} is {example.id!r} but trace store {self.store.root} has {meta['example_id']!r} there; "
                    "distill with the dataset the store was made from"
                )
            y2, p = list(meta["y2_ids"]), int(meta["prompt_rows"])
            check_prompt_alignment(backbone, prompt, meta.get("prompt_tail_ids"), unit, example.id)
            tails[unit] = y2[:-1]
            rows[unit] = p + len(y2) - 1
            if rows[unit] != meta["row_count"]:
                raise SdrtError(f"trace store {self.store.root}: record ({index}, {unit!r}) has {meta['row_count']} rows, the contract gives {rows[unit]}")
        return ExampleInputs(index, example.id, prompt, tails, rows)

    def targets(self, index: int, unit: str, device: torch.device) -> dict[str, torch.Tensor]:
        record = self.store.record(index, unit)
        return {
            "teacher_hidden": record.hidden.to(device),
            "topk_ids": record.topk_ids.to(device, torch.long),
            "topk_logprobs": record.topk_logprobs.to(device, torch.float32),
            "tail_mass": record.tail_mass.to(device, torch.float32),
        }


class GoldSource:
    """Gold answers of a dataset split (the LoRA "Fine-tuning" baseline); one unit, ``gold``."""

    mode = "gold"

    def __init__(self, dataset: Dataset, examples: ExamplesByIndex):
        self.dataset = dataset
        self.units = [GOLD]
        self.examples = examples
        self.layer_count = 0

    def prepare(self, backbone: Backbone, index: int, example: Example, token_counts: Sequence[int]) -> ExampleInputs:
        if not example.answers:
            raise SdrtError(f"example {example.id!r} of dataset {self.dataset.name!r} has no gold answer; --loss ce needs a split with answers")
        turns = student_turns(self.dataset, example)
        prompt_text = backbone.render_chat(turns)
        prompt = backbone.tokenize(prompt_text, token_counts)
        answer = gold_answer_ids(backbone, turns, prompt_text, prompt, example.answers[0].strip(), token_counts, example.id)
        return ExampleInputs(index, example.id, prompt, {GOLD: answer[:-1]}, {GOLD: len(answer)}, labels={GOLD: answer})

    def targets(self, index: int, unit: str, device: torch.device) -> dict[str, torch.Tensor]:
        return {}


def gold_answer_ids(backbone: Backbone, turns: Sequence[Turn], prompt_text: str, prompt: list[int], answer: str, token_counts: Sequence[int], example_id: str) -> list[int]:
    """The answer's token ids as the chat template writes an assistant turn, up to the end of the
    answer text, then the tokenizer's EOS id: the fine-tuned model learns to stop after the answer.

    Whatever the template writes after the answer is replaced by EOS, because templates differ there:
    the project's own ends the turn with ``</s>`` (the EOS token), while llava-hf/llava-v1.6-mistral-7b-hf's
    chat_template.json writes the literal text ``<\\s> `` — trained on that, the model would emit it and
    never stop."""
    full_text = backbone.render_chat(list(turns) + [Turn("assistant", answer)], add_generation_prompt=False)
    start = full_text.find(answer, len(prompt_text)) if full_text.startswith(prompt_text) else -1
    if not answer or start < 0:
        raise SdrtError(f"example {example_id!r}: the chat template's assistant turn does not write the gold answer {answer!r} after the question prompt")
    ids = backbone.tokenize(full_text[: start + len(answer)], token_counts)
    if ids[: len(prompt)] != prompt or len(ids) <= len(prompt):
        raise SdrtError(f"example {example_id!r}: the chat template's answer turn does not extend the question prompt token for token")
    if not backbone.eos_token_ids or backbone.eos_token_ids[0] is None:
        raise SdrtError(f"backbone {backbone.name!r} has no EOS token id, so gold answers cannot teach the model to stop")
    answer_ids = ids[len(prompt) :] + [int(backbone.eos_token_ids[0])]
    if answer_ids[-1] not in backbone.eos_token_ids or any(t in backbone.eos_token_ids for t in answer_ids[:-1]):
        raise SdrtError(f"example {example_id!r}: the gold answer's token ids must end with the tokenizer's EOS id, and only there; got {answer_ids}")
    return answer_ids


# ---------------------------------------------------------------------------------------------
# Students: the trainable adapters, one per unit
# ---------------------------------------------------------------------------------------------


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
        from sdrt_plugins.adapters.lora import LoraSettings, apply_lora

        self.backbone = backbone
        self.units = list(units)
        targets = {"targets": list(spec.lora_targets)} if spec.lora_targets else {}
        self.settings = LoraSettings(layers=list(spec.layers), rank=spec.rank, alpha=spec.lora_alpha, dropout=spec.lora_dropout, **targets)
        self.peft_model = apply_lora(backbone.model, backbone.decoder_layers, self.settings)
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
        from sdrt_plugins.adapters.lora import save_lora

        self.bind(n)
        save_lora(directory, self.peft_model, self.settings, self.backbone.decoder_layers, extra)


# ---------------------------------------------------------------------------------------------
# The cache of the frozen lower layers
# ---------------------------------------------------------------------------------------------


@dataclass
class LowerStates:
    """Input to the first trainable layer for one example: the shared prompt part and one tail per unit."""

    prefix: torch.Tensor  # [S, H]
    tails: dict[str, torch.Tensor]  # unit -> [len(tail), H]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.prefix, *self.tails.values()])

    def full(self, unit: str) -> torch.Tensor:
        return torch.cat([self.prefix, self.tails[unit]]) if self.tails[unit].shape[0] else self.prefix


class LowerCache:
    """RAM up to ``ram_bytes``, then safetensors files in ``directory`` up to ``disk_bytes``; beyond
    both, ``put`` declines and the caller recomputes.  Kept on the CPU; moved to ``device`` on ``get``."""

    def __init__(self, ram_bytes: int, disk_bytes: int, directory: Path, device: torch.device):
        self.ram_bytes, self.disk_bytes = ram_bytes, disk_bytes
        self.directory = Path(directory)
        self.device = device
        self.ram: dict[int, LowerStates] = {}
        self.disk: dict[int, Path] = {}
        self.ram_used = self.disk_used = 0
        self.hits = self.misses = 0

    def get(self, index: int) -> LowerStates | None:
        if index in self.ram:
            self.hits += 1
            states = self.ram[index]
        elif index in self.disk:
            from safetensors.torch import load_file

            self.hits += 1
            tensors = load_file(str(self.disk[index]))
            prefix = tensors.pop("prefix")
            states = LowerStates(prefix, {k[len("tail.") :]: v for k, v in tensors.items()})
        else:
            self.misses += 1
            return None
        if self.device.type == "cpu":
            return states
        return LowerStates(states.prefix.to(self.device), {k: v.to(self.device) for k, v in states.tails.items()})

    def put(self, index: int, states: LowerStates) -> None:
        size = states.nbytes
        cpu = LowerStates(states.prefix.cpu(), {k: v.cpu() for k, v in states.tails.items()})
        if self.ram_used + size <= self.ram_bytes:
            self.ram[index] = cpu
            self.ram_used += size
        elif self.disk_used + size <= self.disk_bytes:
            from safetensors.torch import save

            path = self.directory / f"{index}.safetensors"
            tensors = {"prefix": cpu.prefix.contiguous(), **{f"tail.{k}": v.contiguous() for k, v in cpu.tails.items()}}
            atomic_write_bytes(path, save(tensors))
            self.disk[index] = path
            self.disk_used += size

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "ram_bytes": self.ram_used, "disk_bytes": self.disk_used, "ram_examples": len(self.ram), "disk_examples": len(self.disk)}

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.directory.parent.rmdir()  # OUT/cache, once every rank's folder is gone


# ---------------------------------------------------------------------------------------------
# Data order, splits and rank shares
# ---------------------------------------------------------------------------------------------


def split_train_val(indices: Sequence[int], val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic by example index alone (not by seed): the same examples are held out in every
    run over the same store; adding examples moves few of the old ones."""
    indices = sorted(indices)
    if val_fraction <= 0 or len(indices) < 2:
        return indices, []
    count = min(len(indices) - 1, max(1, round(val_fraction * len(indices))))
    ranked = sorted(indices, key=lambda i: hashlib.sha256(f"sdrt-val:{i}".encode()).hexdigest())
    val = set(ranked[:count])
    return [i for i in indices if i not in val], sorted(val)


def epoch_order(train: Sequence[int], seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]


def epoch_batches(train: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global batches, the same for any number of processes.

    The examples are dealt once per run (from the seed) into ``batch_size`` slots; every epoch
    shuffles each slot, and batch s holds the s-th example of every slot, slot j at position j (the
    last batch only has the longer, leading slots).  :func:`rank_share` gives position j to rank
    ``j % world``, so every rank trains on ``batch_size / world`` examples at every step, and always on
    the same examples, whose lower states it has cached."""
    dealt = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    slots = [[train[p] for p in dealt[j::batch_size]] for j in range(batch_size)]
    shuffle = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    slots = [[slot[i] for i in torch.randperm(len(slot), generator=shuffle).tolist()] for slot in slots]
    steps = math.ceil(len(train) / batch_size)
    return [[slot[s] for slot in slots if s < len(slot)] for s in range(steps)]


def rank_share(batch: Sequence[int], world: int, rank: int) -> list[int]:
    """Rank ``rank``'s disjoint part of a global batch: positions ``rank, rank + world, ...`` (sizes
    differ by at most one; with :func:`epoch_batches` a rank always gets the same slots)."""
    return list(batch[rank::world])


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint (JSON), so a resume continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # 0-based epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch done
    epoch_steps: int = 0
    epoch_seconds: float = 0.0
    epoch_cpu_seconds: float = 0.0  # this process's CPU time: steadier than wall time on a shared machine
    epoch_loss_sum: float = 0.0
    epoch_unit_sums: dict[str, float] = field(default_factory=dict)
    last_train: dict[str, float] = field(default_factory=dict)  # per unit, mean over the last epoch
    last_val: dict[str, Any] | None = None


class Distiller:
    """Trains ``student`` on ``source`` into ``out``.  Build it with :func:`build_distiller`."""

    def __init__(
        self,
        backbone: Backbone,
        source: TraceSource | GoldSource,
        spec: StudentSpec,
        settings: TrainSettings,
        loss_spec: str,
        loss_options: dict[str, dict[str, Any]],
        out: Path,
        identity: dict[str, Any],
    ):
        self.backbone = backbone
        self.source = source
        self.spec = spec
        self.settings = settings
        self.loss_spec = loss_spec
        self.loss_options = loss_options
        self.loss: CompositeLoss = compose(loss_spec, loss_options)
        if source.mode == "gold":
            self.val_loss: CompositeLoss = compose("ce")
        else:
            self.val_loss = compose("mse+kl", {name: loss_options[name] for name in ("mse", "kl") if name in loss_options})
        self.out = Path(out)
        self.identity = identity  # what the run is trained from (recorded in the manifest)
        self.units = list(source.units)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.device = backbone.device
        self.first = min(spec.layers + spec.compare_layers)
        # the cache ends after layer `first` unless LoRA trains that layer's own weights
        self.cache_end = self.first if spec.is_lora and self.first in spec.layers else self.first + 1
        self.layer_count = len(backbone.decoder_layers)
        self.student = (LoraStudent if spec.is_lora else InterventionStudent)(backbone, self.units, spec, settings.seed)
        self.params = [p for n in range(len(self.units)) for p in self.student.parameters_of(n)]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        gib = 1 << 30
        self.cache = LowerCache(
            int(settings.cache_ram_gb * gib), int(settings.cache_disk_gb * gib), self.out / CACHE_DIR / f"r{self.rank:03d}", self.device
        )
        self.inputs: dict[int, ExampleInputs] = {}
        self.train_indices, self.val_indices = split_train_val(sorted(source.examples), settings.val_fraction)
        if not self.train_indices:
            raise SdrtError("no training examples: the store/dataset selection is empty")
        self.steps_per_epoch = math.ceil(len(self.train_indices) / settings.batch_size)
        self.total_steps = settings.epochs * self.steps_per_epoch
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)

    # -- what the loss reads --------------------------------------------------------------------
    @property
    def train_needs(self) -> frozenset[str]:
        return self.loss.needs

    def fingerprint(self) -> dict[str, Any]:
        """Everything that decides the numbers a run produces (a resume must match it)."""
        train = {k: v for k, v in self.settings.to_dict().items() if k not in TrainSettings.RUNTIME_ONLY}
        return {
            "student": dataclasses.asdict(self.spec),
            "training": train,
            "loss": {"spec": self.loss_spec, "options": self.loss_options},
            "units": self.units,
            "source": self.identity,
            "train_examples": self.train_indices,
            "val_examples": self.val_indices,
        }

    # -- per-example inputs and lower states -------------------------------------------------------
    def example_state(self, index: int) -> tuple[ExampleInputs, LowerStates]:
        lower = self.cache.get(index)
        inputs = self.inputs.get(index)
        if lower is not None and inputs is not None:
            return inputs, lower
        example = self.source.examples[index]
        early = self.spec.skip_layer if self.spec.skip and inputs is None else None
        try:
            encoded = self.backbone.encode_images(example.images, early_layer=early)
        except IndexError:
            raise SdrtError(f"--skip-layer {self.spec.skip_layer} is not a layer of this backbone's vision encoder") from None
        if inputs is None:
            inputs = self.source.prepare(self.backbone, index, example, encoded.token_counts)
            if self.spec.skip:
                if not encoded.early:
                    raise SdrtError(f"example {example.id!r} has no image, so the vision skip connection has nothing to read; drop --skip")
                inputs.vision = pool_vision_features(encoded.early, self.spec.skip_pool).to(self.device)
            self.inputs[index] = inputs
        lower = self.compute_lower(inputs, torch.cat(encoded.features) if encoded.features else None)
        self.cache.put(index, lower)
        return inputs, lower

    @torch.no_grad()
    def compute_lower(self, inputs: ExampleInputs, features: torch.Tensor | None) -> LowerStates:
        """``run_layers(embed(...), 0, cache_end)`` for every unit's fed sequence of one example.

        The units share the prompt (thousands of image tokens) and differ in short answer tails: the
        prompt runs once with its keys and values kept, then the tails run on copies of that cache."""
        backbone, device = self.backbone, self.device
        size = len(inputs.prompt_ids)
        embedded = backbone.embed(torch.tensor([inputs.prompt_ids]), [features] if features is not None else None)
        cache = backbone.new_cache()
        ones = torch.ones((1, size), dtype=torch.long, device=device)
        prefix = backbone.run_layers(embedded, ones, torch.arange(size, device=device)[None], 0, self.cache_end, cache=cache)[0].to(backbone.dtype)
        tails: dict[str, torch.Tensor] = {}
        step = self.settings.micro_batch_size
        for start in range(0, len(self.units), step):
            chunk = self.units[start : start + step]
            width = max(len(inputs.tails[u]) for u in chunk)
            if width == 0:
                tails.update({u: prefix[:0] for u in chunk})
                continue
            ids = torch.full((len(chunk), width), backbone.pad_token_id, dtype=torch.long)
            mask = torch.ones((len(chunk), size + width), dtype=torch.long)
            for r, unit in enumerate(chunk):
                tail = inputs.tails[unit]
                ids[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                mask[r, size + len(tail) :] = 0  # right padding: real tokens never see it
            shared = copy.deepcopy(cache)  # the tails append to it; the prompt's copy serves the next chunk
            shared.reorder_cache(torch.zeros(len(chunk), dtype=torch.long, device=device))
            positions = torch.arange(size, size + width, device=device).expand(len(chunk), width)
            hidden = backbone.run_layers(backbone.embed(ids), mask.to(device), positions, 0, self.cache_end, cache=shared).to(backbone.dtype)
            for r, unit in enumerate(chunk):
                tails[unit] = hidden[r, : len(inputs.tails[unit])].clone()
        return LowerStates(prefix, tails)

    # -- the trainable part ---------------------------------------------------------------------
    def autocast(self):
        if self.settings.autocast and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_units(self, n: int, items: list[tuple[ExampleInputs, LowerStates]], needs: frozenset[str], training: bool) -> list[DistillBatch]:
        """Run the layers above the cache for unit ``n`` on a micro-batch; one DistillBatch per example."""
        unit = self.units[n]
        want_hidden = "hidden" in needs
        want_logits = bool(needs & {"logits", "ce"})
        capture = list(self.spec.compare_layers) if want_hidden else []
        end = self.layer_count if want_logits else max(capture) + 1
        lengths = [inp.length(unit) for inp, _ in items]
        width = max(lengths)
        batch = len(items)
        hidden = torch.zeros((batch, width, self.backbone.hidden_size), dtype=self.backbone.dtype, device=self.device)
        mask = torch.zeros((batch, width), dtype=torch.long, device=self.device)
        prompt = torch.zeros((batch, width), dtype=torch.long, device=self.device)
        for b, ((inp, lower), length) in enumerate(zip(items, lengths)):
            hidden[b, :length] = lower.full(unit)
            mask[b, :length] = 1
            prompt[b, : len(inp.prompt_ids)] = 1
        positions = torch.arange(width, device=self.device).expand(batch, width)
        where = intervention_positions(prompt, self.spec.pos)
        vision = torch.stack([inp.vision for inp, _ in items]) if self.spec.skip else None
        out_batches = []
        with self.student.active(n, capture, training) as handle, self.autocast():
            handle.set_inputs(where, vision=vision)
            edited_first = None
            if self.cache_end > self.first:  # the cache holds layer `first`'s output: edit it as its hook would
                hidden = edited_first = self.student.edit(n, self.first, hidden, where, vision)
            top = self.backbone.run_layers(hidden, mask, positions, self.cache_end, end) if end > self.cache_end else hidden
            outputs = dict(handle.captured)
            if edited_first is not None:
                outputs[self.first] = edited_first
            for b, ((inp, _), length) in enumerate(zip(items, lengths)):
                count = inp.rows[unit]
                rows = slice(length - count, length)
                fields: dict[str, Any] = {"row_mask": torch.ones((1, count), dtype=torch.bool, device=self.device)}
                if want_hidden:
                    fields["student_hidden"] = torch.stack([outputs[layer][b, rows] for layer in capture], dim=1)[None]
                if want_logits:
                    logits = self.backbone.float32_logits(top[b, rows])[None]
                    if "ce" in needs:
                        fields["ce_logits"] = logits
                        fields["ce_labels"] = torch.tensor([inp.labels[unit]], device=self.device)
                    else:
                        fields["student_logits"] = logits
                targets = self.source.targets(inp.index, unit, self.device)
                if want_hidden and tuple(targets["teacher_hidden"].shape) != tuple(fields["student_hidden"].shape[1:]):
                    raise SdrtError(
                        f"record ({inp.example_id!r}, {unit!r}) holds hidden states {tuple(targets['teacher_hidden'].shape)}, "
                        f"the student gives {tuple(fields['student_hidden'].shape[1:])}"
                    )
                fields.update({k: v[None] for k, v in targets.items()})
                out_batches.append(DistillBatch(**fields))
        return out_batches

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self, batch: list[int], state: TrainState) -> dict[str, Any]:
        started, cpu_started = time.perf_counter(), time.process_time()
        global_size = len(batch)
        mine = rank_share(batch, self.world, self.rank) if self.world > 1 else list(batch)
        for p in self.params:
            p.grad = None
        part_names = [name for name, _, _ in self.loss.terms]
        sums = torch.zeros((len(self.units), 1 + len(part_names)), dtype=torch.float64)
        first_bad: list[str] = []
        items = [self.example_state(i) for i in mine]
        micro = self.settings.micro_batch_size
        for n, unit in enumerate(self.units):
            for start in range(0, len(items), micro):
                chunk = items[start : start + micro]
                with torch.enable_grad():
                    batches = self.forward_units(n, chunk, self.train_needs, training=True)
                    total = None
                    for (inp, _), distill_batch in zip(chunk, batches):
                        value, parts = self.loss(distill_batch)
                        if not bool(torch.isfinite(value.detach())):
                            if not first_bad:
                                first_bad = [inp.example_id, unit]
                            continue
                        sums[n, 0] += float(value.detach()) / global_size
                        for j, name in enumerate(part_names):
                            sums[n, 1 + j] += float(parts[name]) / global_size
                        total = value / global_size if total is None else total + value / global_size
                    if total is not None and not first_bad:
                        total.backward()
        bad = torch.tensor([1.0 if first_bad else 0.0], dtype=torch.float64)
        if self.world > 1:
            distributed.sum_gradients(self.params, self.device)
            sums, bad = distributed.sum_over_ranks(sums, self.device), distributed.sum_over_ranks(bad, self.device)
        step_number = state.step + 1
        if float(bad[0]) > 0:
            if self.world > 1:  # every rank gets here; report the first rank's culprit
                first_bad = next((found for found in distributed.gather_objects(first_bad) if found), first_bad)
            self._fail("loss", step_number, batch, first_bad)
        norms = {}
        for n, unit in enumerate(self.units):
            params = self.student.parameters_of(n)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            limit = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            if not math.isfinite(norm):
                self._fail("gradient", step_number, batch, [None, unit])
            norms[unit] = norm
        lr = lr_at(state.step, self.total_steps, self.settings)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        losses = {u: float(sums[n, 0]) for n, u in enumerate(self.units)}
        return {
            "kind": "train",
            "step": step_number,
            "epoch": state.epoch + 1,
            "lr": lr,
            "loss": sum(losses.values()) / len(losses),
            "losses": losses,
            "parts": {u: {name: float(sums[n, 1 + j]) for j, name in enumerate(part_names)} for n, u in enumerate(self.units)},
            "grad_norm": norms,
            "examples": [self.source.examples.id_of(i) for i in batch],
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
        }

    def _fail(self, what: str, step: int, batch: list[int], first_bad: list[str | None]) -> None:
        ids = [self.source.examples.id_of(i) for i in batch]
        where = ""
        if first_bad and first_bad[0]:
            where = f" (first non-finite: example {first_bad[0]!r}, adapter {first_bad[1]!r})"
        elif first_bad and first_bad[1]:
            where = f" (adapter {first_bad[1]!r})"
        latest = read_latest(self.out)
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        raise SdrtError(f"non-finite {what} at step {step} on batch examples {ids}{where}; training stopped and {kept}")

    # -- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean over held-out examples of each validation loss (mse and kl, or ce), per unit."""
        names = [name for name, _, _ in self.val_loss.terms]
        sums = torch.zeros((len(self.units), len(names)), dtype=torch.float64)
        mine = self.val_indices[self.rank :: self.world]
        items = [self.example_state(i) for i in mine]
        micro = self.settings.micro_batch_size
        for n in range(len(self.units)):
            for start in range(0, len(items), micro):
                for distill_batch in self.forward_units(n, items[start : start + micro], self.val_loss.needs, training=False):
                    _, parts = self.val_loss(distill_batch)
                    for j, name in enumerate(names):
                        sums[n, j] += float(parts[name])
        if self.world > 1:
            sums = distributed.sum_over_ranks(sums, self.device)
        sums /= max(1, len(self.val_indices))
        per_unit = {u: {name: float(sums[n, j]) for j, name in enumerate(names)} for n, u in enumerate(self.units)}
        result = {f"val_{name}": float(sums[:, j].mean()) for j, name in enumerate(names)}
        result["per_unit"] = per_unit
        return result

    # -- the loop -------------------------------------------------------------------------------
    def run(self, resume: bool = False, progress: Any = None) -> dict[str, Any]:
        """Train to the end (or continue the checkpoint in ``out`` when ``resume``); returns the
        final per-unit train loss and validation result.  ``progress(total, done)`` makes a bar."""
        state = TrainState()
        loaded = self.load_checkpoint() if resume else None
        if loaded is not None:
            state = loaded
        metrics_path = self.out / METRICS
        self.cache.close()  # a previous run's spill files are not trusted
        if distributed.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            if loaded is None:
                atomic_write_text(metrics_path, "")
            else:
                truncate_metrics(metrics_path, state.step)
        try:
            if loaded is None:
                torch.manual_seed(self._rank_seed())  # LoRA dropout draws from the global generators
                if self.val_indices:
                    state.last_val = self._log_val(metrics_path, 0, 0)  # the identity adapters
            bar_context = progress(self.total_steps, state.step) if progress else contextlib.nullcontext(None)
            with bar_context as bar:
                while state.step < self.total_steps:
                    batches = epoch_batches(self.train_indices, self.settings.batch_size, self.settings.seed, state.epoch)
                    while state.batch_in_epoch < len(batches) and state.step < self.total_steps:
                        line = self.train_step(batches[state.batch_in_epoch], state)
                        state.step += 1
                        state.batch_in_epoch += 1
                        state.epoch_steps += 1
                        state.epoch_seconds += line["seconds"]
                        state.epoch_cpu_seconds += line["cpu_seconds"]
                        state.epoch_loss_sum += line["loss"]
                        for unit, value in line["losses"].items():
                            state.epoch_unit_sums[unit] = state.epoch_unit_sums.get(unit, 0.0) + value
                        if distributed.is_main():
                            append_jsonl(metrics_path, line, sync=False)
                        if bar is not None:
                            bar.advance(1)
                        every = self.settings.save_every
                        if every and state.step % every == 0 and state.batch_in_epoch < len(batches) and state.step < self.total_steps:
                            self.save_checkpoint(state)
                    if state.batch_in_epoch < len(batches):
                        break  # --max-steps ends the run inside this epoch
                    self._end_epoch(metrics_path, state)
                    state.epoch += 1
                    state.batch_in_epoch = 0
                    self.save_checkpoint(state)
            if state.epoch_steps:
                self._end_epoch(metrics_path, state)
                self.save_checkpoint(state)
        finally:
            self.cache.close()
        return {"steps": state.step, "train_loss": state.last_train, "val": state.last_val, "cache": self.cache.stats()}

    def _end_epoch(self, metrics_path: Path, state: TrainState) -> None:
        line = {
            "kind": "epoch",
            "epoch": state.epoch + 1,
            "step": state.step,
            "steps": state.epoch_steps,
            "seconds": state.epoch_seconds,
            "cpu_seconds": state.epoch_cpu_seconds,
            "steps_per_s": state.epoch_steps / state.epoch_seconds if state.epoch_seconds > 0 else None,
            "train_loss": state.epoch_loss_sum / state.epoch_steps,
            "cache": self.cache.stats(),
        }
        if distributed.is_main():
            append_jsonl(metrics_path, line, sync=False)
        state.last_train = {u: v / state.epoch_steps for u, v in state.epoch_unit_sums.items()}
        state.epoch_steps, state.epoch_seconds, state.epoch_cpu_seconds, state.epoch_loss_sum, state.epoch_unit_sums = 0, 0.0, 0.0, 0.0, {}
        if self.val_indices:
            state.last_val = self._log_val(metrics_path, state.epoch + 1, state.step)

    def _log_val(self, metrics_path: Path, epoch: int, step: int) -> dict[str, Any]:
        result = self.evaluate()
        if distributed.is_main():
            append_jsonl(metrics_path, {"kind": "val", "epoch": epoch, "step": step, **result}, sync=False)
        return result

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, state: TrainState) -> None:
        """Adapters, AdamW state, every rank's RNG state and the position in the data order; rank 0 writes."""
        rng_states = distributed.gather_objects(self._rng_state())
        if not distributed.is_main():
            return
        from safetensors.torch import save

        tensors = {f"student.{k}": v.detach().cpu().contiguous() for k, v in self.student.state_tensors().items()}
        optim = self.optimizer.state_dict()
        for index, slots in optim["state"].items():
            for key, value in slots.items():
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
        for r, (cpu, cuda) in enumerate(rng_states):
            tensors[f"rng.cpu.{r}"] = cpu
            if cuda is not None:
                tensors[f"rng.cuda.{r}"] = cuda
        name = f"step-{state.step:08d}"
        directory = self.out / CHECKPOINTS_DIR / name
        atomic_write_bytes(directory / CHECKPOINT_TENSORS, save(tensors))
        document = {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "state": dataclasses.asdict(state),
            "param_groups": optim["param_groups"],
            "fingerprint": self.fingerprint(),
            "tensors_sha256": sha256_file(directory / CHECKPOINT_TENSORS),
        }
        atomic_write_text(directory / CHECKPOINT_JSON, json.dumps(document, indent=2) + "\n")
        # the pointer flips only once the checkpoint is whole; older ones go after it
        atomic_write_text(self.out / CHECKPOINTS_DIR / LATEST, json.dumps({"checkpoint": name}) + "\n")
        for old in (self.out / CHECKPOINTS_DIR).glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> TrainState | None:
        from safetensors.torch import load_file

        directory = read_latest(self.out)
        if directory is None:
            return None
        json_path, tensor_path = directory / CHECKPOINT_JSON, directory / CHECKPOINT_TENSORS
        try:
            document = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SdrtError(f"checkpoint {json_path} cannot be read: {exc}") from None
        if document.get("format") != CHECKPOINT_FORMAT or document.get("format_version") != FORMAT_VERSION:
            raise SdrtError(f"{json_path} is not a distill checkpoint this sdrt reads (format {document.get('format')!r} v{document.get('format_version')!r})")
        if not tensor_path.is_file() or sha256_file(tensor_path) != document.get("tensors_sha256"):
            raise SdrtError(f"checkpoint {tensor_path} is missing or does not match {json_path}; start again with --overwrite")
        mine = json.loads(json.dumps(self.fingerprint()))
        if document.get("fingerprint") != mine:
            raise SdrtError(
                f"{self.out} holds a run with another configuration ({describe_differences(document.get('fingerprint') or {}, mine, 'checkpoint')}); "
                "resume with the same options or use --overwrite"
            )
        tensors = load_file(str(tensor_path))
        self.student.load_state_tensors({k[len("student.") :]: v.to(self.device) for k, v in tensors.items() if k.startswith("student.")})
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, slot = key.split(".", 2)
                optim_state.setdefault(int(index), {})[slot] = value.to(self.device) if slot != "step" else value
        groups = document["param_groups"]
        for group in groups:
            group["betas"] = tuple(group["betas"])
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        if f"rng.cpu.{self.rank}" in tensors:
            torch.set_rng_state(tensors[f"rng.cpu.{self.rank}"])
            if f"rng.cuda.{self.rank}" in tensors and self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{self.rank}"], self.device)
        else:  # a rank the checkpointed run did not have (resumed with more processes): a fresh stream
            torch.manual_seed(self._rank_seed())
        return TrainState(**document["state"])

    def _rank_seed(self) -> int:
        return self.settings.seed + self.rank  # each rank draws its own dropout masks

    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's generators that training draws from: the CPU one and its GPU's (LoRA dropout)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    # -- outputs --------------------------------------------------------------------------------
    def save_adapters(self, extra: dict[str, Any]) -> dict[str, str]:
        paths = {}
        for n, unit in enumerate(self.units):
            directory = self.out / ADAPTERS_DIR / unit
            if distributed.is_main():
                self.student.save(n, directory, {**extra, "prompt_id": unit})
            paths[unit] = f"{ADAPTERS_DIR}/{unit}"
        return paths


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


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
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise SdrtError(f"{out_dir} holds no distilled adapters (no {MANIFEST}); create them with `sdrt distill`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SdrtError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise SdrtError(f"{path} is not an adapters manifest (field 'kind' is {manifest.get('kind') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SdrtError(f"{path}: field 'format_version' is {manifest.get('format_version')!r}, this sdrt reads {FORMAT_VERSION}")
    return manifest


@dataclass
class LoraCheckpoint:
    """A saved LoRA (one per prompt, or ``gold``): ``apply(backbone)`` wraps the backbone's model in
    place (peft) and returns the peft model.  One LoRA can be applied to a given model object."""

    prompt_id: str
    path: Path

    def apply(self, backbone: Backbone):
        from sdrt_plugins.adapters.lora import load_lora

        return load_lora(self.path, backbone.model, backbone.decoder_layers, device=backbone.device)


def load_adapters(out_dir: Path | str, backbone: Backbone) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """The manifest and ``(prompt_id, adapter)`` pairs of a ``sdrt distill`` output, in training order.

    Intervention adapters come back as :class:`InterventionAdapter` on the backbone's device (attach
    them with :func:`sdrt_cli.adapters.attach`); LoRA ones as :class:`LoraCheckpoint`.  A directory
    trained on another backbone is refused.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest.get("status") != "complete":
        raise SdrtError(f"{out_dir} holds an unfinished distill run; finish it with `sdrt distill ... --resume`")
    trained = manifest.get("backbone") or {}
    current = backbone.identity()
    mismatch = [k for k in IDENTITY_KEYS if trained.get(k) != current.get(k)]
    if mismatch:
        raise SdrtError(
            f"adapters in {out_dir} were trained on backbone {trained.get('backbone')!r} from {trained.get('source')!r}, "
            f"not the one in use ({', '.join(f'{k} {trained.get(k)} vs {current.get(k)}' for k in mismatch)})"
        )
    pairs: list[tuple[str, Any]] = []
    for prompt_id in manifest["prompts"]:
        directory = out_dir / manifest["adapters"][prompt_id]
        if manifest["adapter"] == "lora":
            from sdrt_cli.adapters import read_checkpoint
            from sdrt_plugins.adapters.lora import LORA_FORMAT

            read_checkpoint(directory, LORA_FORMAT)  # verify now, apply later
            pairs.append((prompt_id, LoraCheckpoint(prompt_id, directory)))
        else:
            adapter = load_adapter(directory, device=backbone.device, expected={"prompt_id": prompt_id, "hidden_size": backbone.hidden_size})
            pairs.append((prompt_id, adapter.eval()))
    return manifest, pairs


def write_manifest(out: Path, document: dict[str, Any]) -> None:
    atomic_write_text(Path(out) / MANIFEST, json.dumps(document, indent=2) + "\n")


__all__ = [
    "Distiller",
    "ExampleInputs",
    "GoldSource",
    "LoraCheckpoint",
    "StudentSpec",
    "TraceSource",
    "TrainSettings",
    "load_adapters",
    "epoch_batches",
    "lr_at",
    "rank_share",
    "read_manifest",
    "split_train_val",
]
