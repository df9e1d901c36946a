"""The distill training loop: :class:`Distiller` and its resumable state."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdrt_cli import distributed
from sdrt_cli.adapters import intervention_positions, pool_vision_features
from sdrt_cli.backbone import Backbone
from sdrt_cli.config import describe_differences
from sdrt_cli.distill.artifacts import (
    ADAPTERS_DIR,
    CACHE_DIR,
    CHECKPOINT_FORMAT,
    CHECKPOINT_JSON,
    CHECKPOINT_TENSORS,
    CHECKPOINTS_DIR,
    FORMAT_VERSION,
    LATEST,
    METRICS,
    read_latest,
    truncate_metrics,
)
from sdrt_cli.distill.batching import epoch_batches, rank_share, split_train_val
from sdrt_cli.distill.cache import LowerCache, LowerStates
from sdrt_cli.distill.settings import StudentSpec, TrainSettings, lr_at
from sdrt_cli.distill.sources import ExampleInputs, GoldSource, TraceSource
from sdrt_cli.distill.students import build_student
from sdrt_cli.errors import SdrtError
from sdrt_cli.formats import AdaptersManifest
from sdrt_cli.io import append_jsonl, atomic_write_bytes, atomic_write_text, sha256_file
from sdrt_cli.losses import CompositeLoss, DistillBatch, compose
from sdrt_cli.overlap import TRAINED_ON, trained_on


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
    epoch_loss_steps: int = 0  # steps that trained any unit (a selection may leave a batch to none)
    epoch_unit_sums: dict[str, float] = field(default_factory=dict)
    epoch_unit_steps: dict[str, int] = field(default_factory=dict)  # steps that trained the unit (selection may skip some)
    last_train: dict[str, float] = field(default_factory=dict)  # per unit, mean over the last epoch
    last_val: dict[str, Any] | None = None


class Distiller:
    """Trains one student per unit of ``source`` into ``out``; :meth:`manifest` describes the result.

    ``sdrt distill`` (``sdrt_cli.commands.distill.run_distill``) builds it from the command's options;
    ``identity`` is what the run is trained from (backbone, dataset, examples, trace store), recorded
    in the manifest and in the run's fingerprint."""

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
        self.layer_count = len(backbone.decoder_layers)
        self.student = build_student(backbone, self.units, spec, settings.seed)
        # the cache ends below the first layer whose output the student changes (0 with fresh_images)
        self.cache_end = self.student.lower_end(self.first)
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
            # only with a selection, so runs without one keep their fingerprint (and resume)
            **({"kept": {u: sorted(k) for u, k in self.source.kept.items()}} if self.source.kept is not None else {}),
        }

    def manifest(self, summary: dict[str, Any], paths: dict[str, str]) -> AdaptersManifest:
        """The finished run's manifest: ``summary`` from :meth:`run`, ``paths`` from :meth:`save_adapters`."""
        spec, data_identity = self.spec, self.identity["dataset"]
        per_unit_val = (summary["val"] or {}).get("per_unit", {})
        examples = self.source.examples
        return AdaptersManifest(
            status="complete",
            mode=self.source.mode,
            adapter=spec.adapter,
            prompts=list(self.units),
            adapters=paths,
            backbone=self.identity["backbone"],
            details={
                "loss": {"spec": self.loss_spec, "terms": [[n, w] for n, w, _ in self.loss.terms], "options": self.loss_options},
                "layers": spec.layers,
                "compare_layers": spec.compare_layers,
                "pos": spec.pos,
                "rank": spec.rank,
                "skip": {"enabled": spec.skip, "vision_layer": spec.skip_layer, "pooling": spec.skip_pool if spec.skip else None},
                "lora": {"alpha": spec.lora_alpha, "dropout": spec.lora_dropout, "targets": spec.lora_targets} if spec.is_lora else None,
                "traces": self.identity["traces"],
                "dataset": data_identity,
                TRAINED_ON: trained_on(data_identity, (examples[i].id for i in self.train_indices)),
                "training": {
                    **self.settings.to_dict(),
                    "steps": summary["steps"],
                    "world_size": self.world,
                    "train_examples": self.train_indices,
                    "val_examples": self.val_indices,
                },
                "metrics": {
                    u: {"train_loss": summary["train_loss"].get(u), **{f"val_{k}": v for k, v in per_unit_val.get(u, {}).items()}}
                    for u in self.units
                },
                "fingerprint": self.fingerprint(),
            },
        )

    # -- per-example inputs and lower states -------------------------------------------------------
    def example_state(self, index: int) -> tuple[ExampleInputs, LowerStates | None]:
        """The example's inputs and the cached output of its frozen lower layers (None when the
        student trains the image features: :meth:`fresh_embeddings` makes them at every step)."""
        lower = self.cache.get(index)
        inputs = self.inputs.get(index)
        if inputs is not None and (lower is not None or self.student.fresh_images):
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
        if self.student.fresh_images:
            return inputs, None
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
            if lower is not None:
                hidden[b, :length] = lower.full(unit)
            mask[b, :length] = 1
            prompt[b, : len(inp.prompt_ids)] = 1
        positions = torch.arange(width, device=self.device).expand(batch, width)
        where = intervention_positions(prompt, self.spec.pos)
        vision = torch.stack([inp.vision for inp, _ in items]) if self.spec.skip else None
        out_batches = []
        with self.student.active(n, capture, training) as handle, self.autocast():
            if self.student.fresh_images:
                hidden = self.fresh_embeddings(items, unit, hidden)
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

    def fresh_embeddings(self, items: list[tuple[ExampleInputs, Any]], unit: str, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, T, H] filled with each example's embedded sequence for ``unit``, its images
        encoded now by the trained weights (autograd reaches them through the image features)."""
        rows = []
        for inp, _ in items:
            encoded = self.backbone.encode_images(self.source.examples[inp.index].images)
            ids = torch.tensor([inp.prompt_ids + list(inp.tails[unit])])
            rows.append(self.backbone.embed(ids, [torch.cat(encoded.features)] if encoded.features else None)[0])
        width = hidden.shape[1]
        padded = [torch.cat([row, hidden.new_zeros((width - row.shape[0], row.shape[1]))]) if row.shape[0] < width else row for row in rows]
        return torch.stack(padded).to(hidden.dtype)

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self, batch: list[int], state: TrainState) -> dict[str, Any]:
        started, cpu_started = time.perf_counter(), time.process_time()
        mine = rank_share(batch, self.world, self.rank) if self.world > 1 else list(batch)
        for p in self.params:
            p.grad = None
        part_names = [name for name, _, _ in self.loss.terms]
        sums = torch.zeros((len(self.units), 1 + len(part_names)), dtype=torch.float64)
        first_bad: list[str] = []
        items = [self.example_state(i) for i in mine]
        micro = self.settings.micro_batch_size
        # per unit, its examples in the whole global batch (the same on every rank)
        unit_sizes = [sum(1 for i in batch if self.source.trains(unit, i)) for unit in self.units]
        for n, unit in enumerate(self.units):
            unit_items = [item for item in items if self.source.trains(unit, item[0].index)]
            size = unit_sizes[n]
            for start in range(0, len(unit_items), micro):
                chunk = unit_items[start : start + micro]
                with torch.enable_grad():
                    batches = self.forward_units(n, chunk, self.train_needs, training=True)
                    total = None
                    for (inp, _), distill_batch in zip(chunk, batches):
                        value, parts = self.loss(distill_batch)
                        if not bool(torch.isfinite(value.detach())):
                            if not first_bad:
                                first_bad = [inp.example_id, unit]
                            continue
                        sums[n, 0] += float(value.detach()) / size
                        for j, name in enumerate(part_names):
                            sums[n, 1 + j] += float(parts[name]) / size
                        total = value / size if total is None else total + value / size
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
            if unit_sizes[n] == 0:  # nothing of this adapter's in the batch: AdamW skips a None gradient
                for p in params:
                    p.grad = None
                norms[unit] = 0.0
                continue
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
        losses = {u: float(sums[n, 0]) for n, u in enumerate(self.units) if unit_sizes[n]}
        return {
            "kind": "train",
            "step": step_number,
            "epoch": state.epoch + 1,
            "lr": lr,
            "loss": sum(losses.values()) / len(losses) if losses else None,
            "losses": losses,
            "parts": {u: {name: float(sums[n, 1 + j]) for j, name in enumerate(part_names)} for n, u in enumerate(self.units) if unit_sizes[n]},
            **({"examples_per_adapter": dict(zip(self.units, unit_sizes))} if self.source.kept is not None else {}),
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
        """Mean over held-out examples of each validation loss (mse and kl, or ce), per unit (over the
        held-out examples the unit's selection keeps)."""
        names = [name for name, _, _ in self.val_loss.terms]
        sums = torch.zeros((len(self.units), len(names)), dtype=torch.float64)
        mine = self.val_indices[self.rank :: self.world]
        items = [self.example_state(i) for i in mine]
        micro = self.settings.micro_batch_size
        for n, unit in enumerate(self.units):
            unit_items = [item for item in items if self.source.trains(unit, item[0].index)]
            for start in range(0, len(unit_items), micro):
                for distill_batch in self.forward_units(n, unit_items[start : start + micro], self.val_loss.needs, training=False):
                    _, parts = self.val_loss(distill_batch)
                    for j, name in enumerate(names):
                        sums[n, j] += float(parts[name])
        if self.world > 1:
            sums = distributed.sum_over_ranks(sums, self.device)
        counts = torch.tensor([[max(1, sum(1 for i in self.val_indices if self.source.trains(u, i)))] for u in self.units], dtype=torch.float64)
        sums /= counts
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
                        if line["loss"] is not None:
                            state.epoch_loss_sum += line["loss"]
                            state.epoch_loss_steps += 1
                        for unit, value in line["losses"].items():
                            state.epoch_unit_sums[unit] = state.epoch_unit_sums.get(unit, 0.0) + value
                            state.epoch_unit_steps[unit] = state.epoch_unit_steps.get(unit, 0) + 1
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
            "train_loss": state.epoch_loss_sum / state.epoch_loss_steps if state.epoch_loss_steps else None,
            "cache": self.cache.stats(),
        }
        if distributed.is_main():
            append_jsonl(metrics_path, line, sync=False)
        state.last_train = {u: v / state.epoch_unit_steps[u] for u, v in state.epoch_unit_sums.items()}
        state.epoch_steps, state.epoch_seconds, state.epoch_cpu_seconds, state.epoch_loss_sum, state.epoch_unit_sums = 0, 0.0, 0.0, 0.0, {}
        state.epoch_loss_steps, state.epoch_unit_steps = 0, {}
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

