"""What `sdrt eval` needs to run a saved ensemble: loading the adapter run and the ensemble, and the
one-forward runtime hook that computes the weights.  Nothing here trains."""

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
    ensemble_kinds,
    intervention_positions,
    pool_vision_features,
)
from sdrt_cli.backbone import Backbone, BackboneRecord, EncodedImages
from sdrt_cli.distill.artifacts import load_adapters, read_manifest
from sdrt_cli.errors import SdrtError
from sdrt_cli.formats import ENSEMBLE_FORMAT, EnsembleManifest  # noqa: F401  (ENSEMBLE_FORMAT: re-exported by sdrt_cli.ensemble)

ENSEMBLES_DIR = "ensembles"


def check_run_backbone(run_dir: Path | str, manifest: dict[str, Any], backbone: Backbone) -> None:
    from sdrt_cli.distill.artifacts import trained_backbone

    trained_backbone(run_dir, manifest).check_matches(backbone.record(), f"adapters in {run_dir} were trained on")


def load_intervention_run(run_dir: Path | str, backbone: Backbone) -> tuple[dict[str, Any], list[tuple[str, InterventionAdapter]]]:
    """The manifest and the per-prompt intervention adapters of a `sdrt distill` output directory,
    in training order, on the backbone's device; refuses another backbone or a LoRA/gold run."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    check_run_backbone(run_dir, manifest, backbone)  # before loading: the clearest refusal first
    kind = manifest.get("adapter")
    kinds = ensemble_kinds()
    if kind not in kinds or manifest.get("mode") == "gold":
        raise SdrtError(
            f"adapters in {run_dir} are {kind!r} adapters trained on {manifest.get('mode', 'traces')}; an ensemble combines per-prompt "
            f"intervention adapters (registered kinds: {', '.join(kinds)}); evaluate a LoRA run with `sdrt eval --method lora --lora DIR`, a projector run with `sdrt eval --projector DIR`"
        )
    manifest, pairs = load_adapters(run_dir, backbone)
    return manifest, pairs


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
    """Write ``ensemble`` (and ``extra``: backbone identity, adapters, traces, training, trained_on) to ``directory``."""
    details = dict(extra)
    manifest = EnsembleManifest(
        name=ensemble.name,
        kind=ensemble.kind,
        members=ensemble.members,
        feature_layer=ensemble.feature_layer,
        predictor=None
        if ensemble.predictor is None
        else {"input_size": ensemble.predictor.input_size, "hidden_size": ensemble.predictor.hidden_size, "members": ensemble.predictor.members},
        backbone=details.pop("backbone", None),
        details=details,
    )
    manifest.save(directory, {} if ensemble.predictor is None else ensemble.predictor.state_dict())


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
    recorded, tensors = EnsembleManifest.load(directory, backbone.device)
    json_path = directory / "adapter.json"
    if recorded.backbone is not None:
        BackboneRecord.from_json(recorded.backbone, str(json_path)).check_matches(backbone.record(), f"ensemble {json_path} was trained on")
    by_id = dict(pairs)
    members = recorded.members
    missing = [m for m in members if m not in by_id]
    if missing:
        raise SdrtError(f"{json_path}: member {missing[0]!r} has no adapter in {adapters_dir / 'adapters'}")
    adapters = [by_id[m] for m in members]
    feature_layer = recorded.feature_layer
    if feature_layer >= len(backbone.decoder_layers):
        raise SdrtError(f"{json_path}: field 'feature.layer' is {feature_layer!r}, not a decoder layer of this backbone")
    predictor = None
    if recorded.kind == "predictor":
        shape = recorded.predictor or {}
        try:
            predictor = EnsemblePredictor(int(shape["input_size"]), int(shape["hidden_size"]), len(members))
            predictor.load_state_dict(tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise SdrtError(f"{json_path}: the predictor does not match its tensors ({str(exc).splitlines()[0]})") from None
        predictor.to(backbone.device).eval()
    meta = recorded.to_json()
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

