"""The weighted adapter ensemble (SDRT §3.2.4): one forward pass, N adapters, per-input weights.

What the predictor reads
========================
For an intervention run whose adapters act on decoder layers ``L`` (the paper: the last 3), let
``f = min(L)`` be the first intervened layer.  The predictor's input is the INPUT of decoder layer
``f`` (= the output of layer ``f - 1``; the token embeddings when ``f = 0``) at the LAST prompt
token of the single-step student prompt.  That state is computed before any intervention touches
the sequence, so in one forward pass a pre-hook on layer ``f`` reads it, computes
``w = softmax(MLP(state))`` over the K member adapters, and hands ``w`` to the adapters' hooks
before layer ``f`` runs.  The last prompt token is used (not a mean over the prompt) because the
prompt is mostly image tokens (~2,000-2,900 on LLaVA-NeXT), which would swamp a mean, while the
last position has attended over image and question and is the state that predicts the answer.

Labels: example x's label is the member prompt whose trace had the highest ``confidence`` in the
trace store (the mean top-token probability over the prompt's y2; ties go to the earlier member).
The predictor (LayerNorm without affine -> Linear -> GELU -> Linear) is trained with cross-entropy
on features computed once, under no_grad, from the base model; a seeded held-out fraction picks
the training step kept (lowest held-out cross-entropy) and reports accuracy next to the
majority-label baseline.  Optionally (``kl_epochs``, ``sdrt ensemble --kl-epochs``) the predictor is
then fine-tuned end to end on KL(most confident teacher ‖ weighted ensemble) at the teacher's answer
rows, the epoch with the lowest held-out KL kept (``finetune_predictor_kl``).

On disk, beside the adapters: ``ADAPTERS/ensembles/NAME/adapter.safetensors`` + ``adapter.json``
(format ``sdrt-ensemble``: members, feature layer, predictor shape, training report, backbone
identity) + ``run.json``.  A ``uniform`` ensemble has no predictor: w = 1/K for every input.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from sdrt_cli.adapters import (
    InterventionAdapter,
    attach,
    intervention_positions,
    pool_vision_features,
    read_checkpoint,
    write_checkpoint,
)
from sdrt_cli.backbone import Backbone, EncodedImages
from sdrt_cli.errors import SdrtError
from sdrt_cli.overlap import TRAINED_ON, trained_on

ENSEMBLE_FORMAT = "sdrt-ensemble"
ENSEMBLES_DIR = "ensembles"
INTERVENTION_TYPES = ("reft", "loreft")
# the identity fields that decide whether weights trained on one backbone fit another
IDENTITY_KEYS = ("config_hash", "weights_hash", "tokenizer_hash", "chat_template_hash")


# ---------------------------------------------------------------------------------------------
# Adapter runs (directories written by `sdrt distill`)
# ---------------------------------------------------------------------------------------------


def backbone_mismatch(stored: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """What differs between a recorded backbone identity and the one in use (None: they match)."""
    diffs = [f"{k} {stored.get(k)} vs {identity.get(k)}" for k in IDENTITY_KEYS if stored.get(k) != identity.get(k)]
    return ", ".join(diffs) if diffs else None


def check_run_backbone(run_dir: Path | str, manifest: dict[str, Any], backbone: Backbone) -> None:
    stored = manifest.get("backbone") or {}
    problem = backbone_mismatch(stored, backbone.identity())
    if problem:
        raise SdrtError(
            f"adapters in {run_dir} were trained on backbone {stored.get('backbone')!r} from {stored.get('source')!r}, "
            f"not the one in use ({problem})"
        )


def load_intervention_run(run_dir: Path | str, backbone: Backbone) -> tuple[dict[str, Any], list[tuple[str, InterventionAdapter]]]:
    """The manifest and the per-prompt intervention adapters of a `sdrt distill` output directory,
    in training order, on the backbone's device; refuses another backbone or a LoRA/gold run."""
    from sdrt_cli.distill import load_adapters, read_manifest

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    check_run_backbone(run_dir, manifest, backbone)  # before loading: the clearest refusal first
    kind = manifest.get("adapter")
    if kind not in INTERVENTION_TYPES or manifest.get("mode") == "gold":
        raise SdrtError(
            f"adapters in {run_dir} are {kind!r} adapters trained on {manifest.get('mode', 'traces')}; an ensemble combines per-prompt "
            f"intervention adapters ({', '.join(INTERVENTION_TYPES)}); evaluate a LoRA run with `sdrt eval --method lora --lora DIR`"
        )
    manifest, pairs = load_adapters(run_dir, backbone)
    return manifest, pairs


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


@dataclass
class VisionInput:
    """How the skip connection's u is made: pooled features of an early vision-encoder layer."""

    layer: int
    pooling: str

    def pooled(self, encoded: Sequence[EncodedImages], hidden_size_hint: int | None = None) -> torch.Tensor:
        rows = []
        for enc in encoded:
            if not enc.early:
                raise SdrtError("the vision skip connection needs an image, but an example has none")
            rows.append(pool_vision_features(enc.early, self.pooling))
        return torch.stack(rows)


def vision_input(manifest: dict[str, Any], adapters: Sequence[InterventionAdapter]) -> VisionInput | None:
    """The skip connection's vision input as the run recorded it (None when no member has the skip)."""
    if not any(a.config.skip for a in adapters):
        return None
    skip = manifest.get("skip") or {}
    if not isinstance(skip.get("vision_layer"), int) or not skip.get("pooling"):
        raise SdrtError("the adapters have the vision skip connection but their manifest lacks fields 'skip.vision_layer' and 'skip.pooling'")
    return VisionInput(layer=skip["vision_layer"], pooling=str(skip["pooling"]))


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def last_prompt_states(hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] -> [B, H] at each row's last position where ``prompt_mask`` is 1."""
    mask = prompt_mask.to(hidden.device).long()
    if mask.shape != hidden.shape[:2]:
        raise SdrtError(f"prompt mask {tuple(mask.shape)} does not cover the forward's [batch, time] {tuple(hidden.shape[:2])}")
    if bool((mask.sum(1) == 0).any()):
        raise SdrtError("a row of the prompt mask is empty: every row needs a prompt")
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=1)  # the largest position with mask 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def segment_prompt_mask(segments: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, width] with 1 on each segment's tokens, laid out as ``SlotBatch.append`` lays them out
    (left-padded to the longest segment)."""
    width = max(1, max(len(s) for s in segments))
    mask = torch.zeros(len(segments), width, dtype=torch.long)
    for row, seg in enumerate(segments):
        if seg:
            mask[row, width - len(seg) :] = 1
    return mask


@contextlib.contextmanager
def layer_input_tap(layer: nn.Module, on_input) -> Iterator[None]:
    """Call ``on_input(hidden)`` with the input of ``layer`` on every forward (a pre-hook)."""

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        on_input(hidden)
        return None

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def student_prompt_ids(backbone: Backbone, dataset, examples, encoded: Sequence[EncodedImages]) -> tuple[list[str], list[list[int]]]:
    """The single-step user texts and their token ids (the prompt `prompt`, `lora` and `sdrt` see)."""
    from sdrt_cli.traces import student_turns

    texts, ids = [], []
    for ex, enc in zip(examples, encoded):
        turns = student_turns(dataset, ex)
        texts.append(turns[-1].text)
        ids.append(backbone.tokenize(backbone.render_chat(turns), enc.token_counts))
    return texts, ids


@torch.no_grad()
def prompt_features(backbone: Backbone, dataset, examples, layer: int) -> torch.Tensor:
    """Input of decoder layer ``layer`` at the last student-prompt token, [B, H] float32 on CPU: what
    the ensemble's pre-hook sees during generation, up to float summation order.  Only the layers
    below ``layer`` run, without a KV cache; rows are right-padded, so no position sees only padding."""
    encoded = [backbone.encode_images(ex.images) for ex in examples]
    _, ids = student_prompt_ids(backbone, dataset, examples, encoded)
    width = max(len(seq) for seq in ids)
    tokens = torch.full((len(ids), width), backbone.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    images = [torch.cat(enc.features) if enc.features else None for enc in encoded]
    device = backbone.device
    positions = torch.arange(width, device=device).expand(len(ids), width)
    lower = backbone.run_layers(backbone.embed(tokens, images), mask.to(device), positions, 0, layer)
    last = torch.tensor([len(seq) - 1 for seq in ids], device=lower.device)
    return lower[torch.arange(len(ids), device=lower.device), last].float().cpu()


# ---------------------------------------------------------------------------------------------
# The predictor
# ---------------------------------------------------------------------------------------------


class EnsemblePredictor(nn.Module):
    """Hidden state -> logits over the K members: LayerNorm (no affine) -> Linear -> GELU -> Linear.

    The parameter-free LayerNorm makes the input scale-free: residual-stream states of a 7B model
    have a few outlier dimensions orders of magnitude larger than the rest.
    """

    def __init__(self, input_size: int, hidden_size: int, members: int):
        super().__init__()
        self.input_size, self.hidden_size, self.members = input_size, hidden_size, members
        self.norm = nn.LayerNorm(input_size, elementwise_affine=False)
        self.hidden = nn.Linear(input_size, hidden_size)
        self.out = nn.Linear(hidden_size, members)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(nn.functional.gelu(self.hidden(self.norm(features.float()))))


@dataclass
class TrainSettings:
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.01
    hidden_size: int = 128
    batch_size: int = 256
    holdout: float = 0.2
    seed: int = 0
    # optional second phase (0 = the paper's predictor): epochs of end-to-end KL fine-tuning
    kl_epochs: int = 0
    kl_lr: float = 1e-3
    kl_batch_size: int = 8

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def confidence_labels(store, example_indices: Sequence[int], members: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the index (into ``members``) of the most confident trace, and all confidences [n, K]."""
    confidences = torch.tensor([[float(store.meta(i, pid)["confidence"]) for pid in members] for i in example_indices], dtype=torch.float64)
    return confidences.argmax(dim=1), confidences  # argmax returns the first maximum: ties -> earlier member


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) positions; no held-out part below 2 examples or for fraction 0."""
    held = 0 if n < 2 or fraction <= 0 else min(n - 1, max(1, round(n * fraction)))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen).tolist()
    return sorted(order[held:]), sorted(order[:held])


def train_predictor(features: torch.Tensor, labels: torch.Tensor, members: int, settings: TrainSettings) -> tuple[EnsemblePredictor, dict[str, Any]]:
    """Cross-entropy training on (features, labels); returns the predictor and a report with the
    held-out accuracy and the majority-label baseline on the same held-out examples.

    With a held-out part, the predictor kept is the one of the step with the lowest held-out
    cross-entropy (early stopping): the labels are noisy (which trace was most confident), and a
    predictor trained to the end memorises a few hundred examples and is confidently wrong on new
    ones, which hurts more than a soft mix, because the weights mix the members' edits.
    """
    n = features.shape[0]
    if n == 0:
        raise SdrtError("no examples to train the ensemble predictor on")
    train_idx, held_idx = split_holdout(n, settings.holdout, settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        predictor = EnsemblePredictor(features.shape[1], settings.hidden_size, members)
    x, y = features.float(), labels.long()
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    train_tensor = torch.tensor(train_idx)

    def held_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(predictor(x[held_idx]), y[held_idx]))

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in predictor.state_dict().items()}

    # without a held-out part there is nothing to choose by: the last step is kept
    best_step, best_loss, best_state = settings.steps, None, None
    if held_idx:
        best_step, best_loss, best_state = 0, held_loss(), snapshot()
    loss_value = float("nan")
    for step in range(1, settings.steps + 1):
        predictor.train()
        if len(train_idx) > settings.batch_size:
            pick = train_tensor[torch.randint(len(train_idx), (settings.batch_size,), generator=gen)]
        else:
            pick = train_tensor
        loss = nn.functional.cross_entropy(predictor(x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if held_idx:
            predictor.eval()
            current = held_loss()
            if current < best_loss:
                best_step, best_loss, best_state = step, current, snapshot()
    if best_state is not None:
        predictor.load_state_dict(best_state)
    predictor.eval()

    def accuracy(idx: list[int]) -> float | None:
        if not idx:
            return None
        with torch.no_grad():
            return float((predictor(x[idx]).argmax(1) == y[idx]).float().mean())

    counts = torch.bincount(y[train_idx], minlength=members)
    majority = int(counts.argmax())
    report = {
        "examples": n,
        "train_examples": len(train_idx),
        "holdout_examples": len(held_idx),
        "final_train_loss": loss_value,
        "selected_step": best_step,
        "holdout_loss": best_loss,
        "train_accuracy": accuracy(train_idx),
        "holdout_accuracy": accuracy(held_idx),
        "holdout_majority_accuracy": float((y[held_idx] == majority).float().mean()) if held_idx else None,
        "label_counts": torch.bincount(y, minlength=members).tolist(),
    }
    return predictor, report


def finetune_predictor_kl(
    ensemble: Ensemble,
    backbone: Backbone,
    store,
    dataset,
    indices: Sequence[int],
    labels: torch.Tensor,
    settings: TrainSettings,
    progress_bar=None,
) -> dict[str, Any]:
    """Fine-tune the trained predictor end to end on the distillation objective of the MIXED student.

    Cross-entropy on "which trace was most confident" treats every wrong pick alike, though mixing
    two members whose edits agree costs little and a confident wrong pick costs much.  Here the loss
    is what the ensemble exists for: per example, KL(most confident teacher ‖ the weighted ensemble)
    at the teacher's answer rows (``sdrt_cli.teacher_forcing``), the student fed its single-step
    prompt with the weights computed inside the forward, and y2 teacher-forced.  Only the predictor
    learns (adapters and backbone stay frozen); gradients reach it through the backbone layers above
    the feature layer.  The held-out examples are those of the cross-entropy phase; the epoch with
    their lowest KL is kept (epoch 0 = the cross-entropy predictor unchanged).  Under torchrun each
    rank takes its share of every batch and the gradients are summed across ranks.
    """
    from sdrt_cli import distributed
    from sdrt_cli.data import examples_by_index
    from sdrt_cli.distill import epoch_order, rank_share
    from sdrt_cli.teacher_forcing import AnswerTarget, answer_logits

    predictor = ensemble.predictor
    assert predictor is not None
    world, rank = distributed.world_size(), distributed.rank()
    train_pos, held_pos = split_holdout(len(indices), settings.holdout, settings.seed)
    train = [indices[j] for j in train_pos]
    held = [indices[j] for j in held_pos]
    label_of = {indices[j]: ensemble.members[int(labels[j])] for j in range(len(indices))}
    examples = examples_by_index(dataset, indices)  # decoded batch by batch, every epoch
    targets = {i: AnswerTarget.of(store.record(i, label_of[i])) for i in indices}
    device = next(predictor.parameters()).device
    params = list(predictor.parameters())

    def batch_loss_sum(part: Sequence[int]) -> torch.Tensor:
        """Sum of the part's per-example KLs (this rank's share of a batch; 0 for an empty share)."""
        if not part:
            return torch.zeros((), device=device)
        with ensemble.attach(backbone) as handle:
            logits = answer_logits(backbone, dataset, [examples[i] for i in part], [[targets[i]] for i in part], steer=handle, vision=ensemble.vision)
        total = torch.zeros((), device=device)
        for b, i in enumerate(part):
            total = total + targets[i].kl(logits[b][0]).to(device)
        return total

    def held_kl(bar) -> float | None:
        if not held:
            return None
        predictor.eval()
        total = torch.zeros(())
        with torch.no_grad():
            for start in range(0, len(held), settings.kl_batch_size):
                part = rank_share(held[start : start + settings.kl_batch_size], world, rank)
                total += distributed.sum_over_ranks(batch_loss_sum(part), backbone.device).float()
                if bar:
                    bar.advance(len(part))
        return float(total) / len(held)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in predictor.state_dict().items()}

    frozen = [p for a in ensemble.adapters for p in a.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=settings.kl_lr, weight_decay=settings.weight_decay)
    epochs: list[dict[str, Any]] = []

    def my_count(items: Sequence[int]) -> int:
        step = settings.kl_batch_size
        return sum(len(rank_share(items[s : s + step], world, rank)) for s in range(0, len(items), step))

    work = settings.kl_epochs * (my_count(train) + my_count(held)) + my_count(held)
    try:
        with (progress_bar("ensemble KL fine-tune", work) if progress_bar else contextlib.nullcontext()) as bar:
            start_kl = held_kl(bar)
            best_epoch, best_kl, best_state = 0, start_kl, snapshot()
            for epoch in range(1, settings.kl_epochs + 1):
                predictor.train()
                order = epoch_order(train, settings.seed, epoch)
                train_sum = 0.0
                for start in range(0, len(order), settings.kl_batch_size):
                    batch = order[start : start + settings.kl_batch_size]
                    part = rank_share(batch, world, rank)
                    loss = batch_loss_sum(part) / len(batch)  # the mean over the GLOBAL batch once summed
                    optimizer.zero_grad()
                    if loss.requires_grad:
                        loss.backward()
                    if world > 1:
                        distributed.sum_gradients(params, backbone.device)
                    optimizer.step()
                    train_sum += float(distributed.sum_over_ranks(loss, backbone.device)) * len(batch)
                    if bar:
                        bar.advance(len(part))
                current = held_kl(bar)
                epochs.append({"epoch": epoch, "train_kl": train_sum / max(len(train), 1), "holdout_kl": current})
                if current is None or current < best_kl:
                    best_epoch, best_kl, best_state = epoch, current, snapshot()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    predictor.load_state_dict(best_state)
    predictor.eval()
    return {
        "epochs": settings.kl_epochs,
        "selected_epoch": best_epoch,
        "holdout_kl_before": start_kl,
        "holdout_kl": best_kl,
        "per_epoch": epochs,
    }


# ---------------------------------------------------------------------------------------------
# Saved ensembles and the one-forward runtime
# ---------------------------------------------------------------------------------------------


@dataclass
class Ensemble:
    """K member adapters, the layer whose input the predictor reads, and the predictor (None: uniform)."""

    name: str
    members: list[str]
    adapters: list[InterventionAdapter]
    feature_layer: int
    predictor: EnsemblePredictor | None = None
    vision: VisionInput | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "uniform" if self.predictor is None else "predictor"

    @property
    def pos(self) -> int:
        return self.adapters[0].config.pos

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """[B, H] states at the last prompt token -> [B, K] member weights (rows sum to 1)."""
        if self.predictor is None:
            return torch.full((features.shape[0], len(self.members)), 1.0 / len(self.members), device=features.device)
        param = next(self.predictor.parameters())
        return torch.softmax(self.predictor(features.to(param.device)), dim=-1)

    @contextlib.contextmanager
    def attach(self, backbone: Backbone) -> Iterator[EnsembleHandle]:
        """Hook the members and the predictor onto the backbone for the ``with`` block."""
        layers = backbone.decoder_layers
        with attach(layers, self.adapters) as handle:
            runtime = EnsembleHandle(self, handle)
            with layer_input_tap(layers[self.feature_layer], runtime._on_feature_input):
                yield runtime


class EnsembleHandle:
    """Arm before the prompt forward (``arm``), disarm before decoding (``disarm``).

    Armed, the pre-hook on the feature layer reads each row's last prompt state, computes the
    weights and gives them to the adapters' hooks; ``last_weights`` keeps them [B, K] on CPU.
    """

    def __init__(self, ensemble: Ensemble, handle):
        self.ensemble = ensemble
        self.handle = handle
        self.prompt_mask: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    def arm(self, prompt_mask: torch.Tensor, vision: torch.Tensor | None = None) -> None:
        """``prompt_mask`` [B, T]: 1 on the prompt tokens of the next forward (its exact [batch, time])."""
        k = len(self.ensemble.members)
        mask = intervention_positions(prompt_mask, self.ensemble.pos)
        # a placeholder until the pre-hook computes the real weights inside the forward
        self.handle.set_inputs(mask, vision, weights=torch.full((mask.shape[0], k), 1.0 / k))
        self.prompt_mask = prompt_mask
        self.vision = vision
        self.last_weights = None

    def disarm(self) -> None:
        self.handle.clear()
        self.prompt_mask = None

    def _on_feature_input(self, hidden: torch.Tensor) -> None:
        if self.prompt_mask is None or self.handle.mask is None:
            return  # decode steps: the intervention reaches them through the KV cache
        weights = self.ensemble.weights(last_prompt_states(hidden, self.prompt_mask))
        self.handle.set_inputs(self.handle.mask, self.vision, weights=weights.to(hidden.device))
        self.last_weights = weights.detach().float().cpu()


def ensemble_dir(adapters_dir: Path | str, name: str) -> Path:
    return Path(adapters_dir) / ENSEMBLES_DIR / name


def saved_ensembles(adapters_dir: Path | str) -> list[str]:
    root = Path(adapters_dir) / ENSEMBLES_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "adapter.json").is_file())


def save_ensemble(directory: Path, ensemble: Ensemble, extra: dict[str, Any]) -> None:
    meta = {
        "format": ENSEMBLE_FORMAT,
        "format_version": 1,
        "name": ensemble.name,
        "kind": ensemble.kind,
        "members": ensemble.members,
        "feature": {"layer": ensemble.feature_layer, "reads": "input of decoder layer `layer` at the last prompt token"},
        "predictor": None
        if ensemble.predictor is None
        else {"input_size": ensemble.predictor.input_size, "hidden_size": ensemble.predictor.hidden_size, "members": ensemble.predictor.members},
        **extra,
    }
    tensors = {} if ensemble.predictor is None else ensemble.predictor.state_dict()
    write_checkpoint(directory, tensors, meta)


def load_ensemble(adapters_dir: Path | str, backbone: Backbone, name: str | None = None) -> Ensemble:
    """A saved ensemble of an adapters directory (``name`` None: the only one saved there)."""
    adapters_dir = Path(adapters_dir)
    manifest, pairs = load_intervention_run(adapters_dir, backbone)
    available = saved_ensembles(adapters_dir)
    if name is None:
        if len(available) != 1:
            listing = f"saved: {', '.join(available)}" if available else "none is saved; train one with `sdrt ensemble`"
            raise SdrtError(f"choose an ensemble of {adapters_dir} with --ensemble ({listing})")
        name = available[0]
    directory = ensemble_dir(adapters_dir, name)
    if not (directory / "adapter.json").is_file():
        listing = ", ".join(available) if available else "none; train one with `sdrt ensemble`"
        raise SdrtError(f"{adapters_dir} has no ensemble {name!r} (saved: {listing})")
    tensors, meta = read_checkpoint(directory, ENSEMBLE_FORMAT, backbone.device)
    json_path = directory / "adapter.json"
    stored = meta.get("backbone")
    if isinstance(stored, dict):
        problem = backbone_mismatch(stored, backbone.identity())
        if problem:
            raise SdrtError(f"ensemble {json_path} was trained on another backbone than the one in use ({problem})")
    by_id = dict(pairs)
    members = meta.get("members")
    if not isinstance(members, list) or not members:
        raise SdrtError(f"{json_path}: field 'members' must be a non-empty list of prompt ids")
    missing = [m for m in members if m not in by_id]
    if missing:
        raise SdrtError(f"{json_path}: member {missing[0]!r} has no adapter in {adapters_dir / 'adapters'}")
    adapters = [by_id[m] for m in members]
    feature_layer = (meta.get("feature") or {}).get("layer")
    if not isinstance(feature_layer, int) or not 0 <= feature_layer < len(backbone.decoder_layers):
        raise SdrtError(f"{json_path}: field 'feature.layer' is {feature_layer!r}, not a decoder layer of this backbone")
    predictor = None
    if meta.get("kind") == "predictor":
        shape = meta.get("predictor") or {}
        try:
            predictor = EnsemblePredictor(int(shape["input_size"]), int(shape["hidden_size"]), len(members))
            predictor.load_state_dict(tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise SdrtError(f"{json_path}: the predictor does not match its tensors ({str(exc).splitlines()[0]})") from None
        predictor.to(backbone.device).eval()
    elif meta.get("kind") != "uniform":
        raise SdrtError(f"{json_path}: field 'kind' is {meta.get('kind')!r}, expected 'predictor' or 'uniform'")
    return Ensemble(
        name=name,
        members=list(members),
        adapters=adapters,
        feature_layer=feature_layer,
        predictor=predictor,
        vision=vision_input(manifest, adapters),
        meta=meta,
    )


def first_intervened_layer(adapters: Sequence[InterventionAdapter]) -> int:
    return min(layer for a in adapters for layer in a.layers)


def check_members_compatible(adapters: Sequence[InterventionAdapter], where: str) -> None:
    """Members share one forward: they must agree on positions (one intervention mask)."""
    positions = {a.config.pos for a in adapters}
    if len(positions) > 1:
        raise SdrtError(f"adapters in {where} intervene on different positions (pos {sorted(positions)}); one ensemble needs one pos")


def predictor_entropy(weights: torch.Tensor) -> float:
    """Mean entropy of weight rows, in units of log(K) (1 = uniform, 0 = one member)."""
    k = weights.shape[1]
    if k == 1:
        return 0.0
    p = weights.clamp_min(1e-12)
    return float((-(p * p.log()).sum(1) / math.log(k)).mean())


# ---------------------------------------------------------------------------------------------
# Building an ensemble from an adapters directory and its trace store
# ---------------------------------------------------------------------------------------------


def check_store_matches(store, manifest: dict[str, Any], run_dir: Path, members: Sequence[str]) -> None:
    """The trace store must be the one the adapters were trained on (or that store extended with
    more examples: same backbone, pack and trace settings)."""
    traced = (manifest.get("traces") or {}).get("fingerprint")
    if not isinstance(traced, dict):
        raise SdrtError(f"the adapters in {run_dir} were not trained on a trace store (their manifest has no 'traces.fingerprint')")
    problem = backbone_mismatch(traced.get("backbone") or {}, store.fingerprint.get("backbone") or {})
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
        if traced_id != example.id:
            raise SdrtError(
                f"trace store {store.root} was made on other data: its example {index} is {traced_id!r}, the dataset's is {example.id!r}"
            )
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
    ``advance(n)`` (``sdrt_cli.commands.common.progress_bar``); None shows nothing.
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
        "backbone": backbone.identity(),
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
        labels, confidences = confidence_labels(store, all_indices, chosen)
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
