"""Intervention adapters: positions, the per-prompt adapter module, hooks, and checkpoints.

What an intervention adapter does (SDRT §3.2, Eq. 5 and 8).  For one prompt n it holds, on each
intervened decoder layer l, an intervention I (``reft``: B·A·h; ``loreft``: Rᵀ(W·h + b − R·h); any
registered kind) and optionally the vision-language skip connection I_skip = Rᵀ(W·h + b + A_u·u).
A forward hook on decoder layer l replaces the layer OUTPUT h (the residual stream, before the
language model's final norm; see ``sdrt_cli.backbone``) at the selected positions by

    ĥ = h + Σ_n w[b, n] · (I_n(h) + I_skip,n(h, u_b))

where the sum runs over the adapters attached together (the ensemble; a single adapter has w = 1).
Positions not selected keep h exactly.

Which positions: :func:`intervention_positions` selects the first and the last ``pos`` prompt tokens
of each row (the paper's "first and last pos positions").  Hooks apply only to forwards the caller
has armed with :meth:`AttachHandle.set_inputs`; a forward run with ``mask=None`` (decode steps on a
KV cache, which see the prompt's edit through the cache) is left untouched.

Checkpoints are ``adapter.safetensors`` + ``adapter.json`` (format, config, extra metadata, tensor
checksum); nothing is pickled, so they load on any device.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from sdrt_cli.errors import SdrtError
from sdrt_cli.io import atomic_write_bytes, atomic_write_text, sha256_file

ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_JSON = "adapter.json"
INTERVENTION_FORMAT = "sdrt-intervention-adapter"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


LAYER_LIST = "a non-empty list of distinct non-negative decoder-layer indices"


def is_layer_list(layers: Any) -> bool:
    """True for what adapter configs accept as ``layers``: see :data:`LAYER_LIST`."""
    return (
        isinstance(layers, (list, tuple))
        and bool(layers)
        and all(not isinstance(i, bool) and isinstance(i, int) and i >= 0 for i in layers)
        and len(set(layers)) == len(layers)
    )


def intervention_positions(attention_mask: torch.Tensor, pos: int) -> torch.Tensor:
    """Boolean mask [B, T] of the first and last ``pos`` real positions of each row.

    ``attention_mask`` is 1 on the row's prompt tokens and 0 elsewhere (padding on either side, and
    any answer tokens appended after the prompt for teacher forcing must be 0 here so they are never
    intervened).  A prompt shorter than ``2 * pos`` gets the union: every real position, once.
    """
    if attention_mask.dim() != 2:
        raise SdrtError(f"attention_mask must be 2-D [batch, time], got shape {tuple(attention_mask.shape)}")
    if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
        raise SdrtError(f"pos must be a non-negative integer, got {pos!r}")
    real = attention_mask.to(torch.long) == 1
    rank_from_start = torch.cumsum(real.to(torch.long), dim=1)  # 1-based at real positions
    total = rank_from_start[:, -1:]
    rank_from_end = total - rank_from_start + 1
    return real & ((rank_from_start <= pos) | (rank_from_end <= pos))


# ---------------------------------------------------------------------------------------------
# Interventions
# ---------------------------------------------------------------------------------------------


class Intervention(nn.Module, abc.ABC):
    """Base of every intervention kind: ``forward(h) = h + delta(h)`` on the rows it is given.

    A kind registers its subclass through ``register_adapters``; the constructor signature is
    ``(hidden_size, rank, init_std)`` so :class:`InterventionAdapter` can build any kind from its config.

    ``ensemble_member``: whether adapters of this kind can be members of a weighted ensemble
    (``sdrt ensemble``, ``sdrt eval --method sdrt``), where each member's ``delta`` is scaled by its
    per-input weight and the edits are summed in one forward.  True for every kind whose ``delta``
    reads only the state it edits; a kind for which a weighted sum of edits means nothing sets it False.
    """

    ensemble_member: ClassVar[bool] = True

    def __init__(self, hidden_size: int, rank: int, init_std: float | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = rank

    @abc.abstractmethod
    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The update I(h) added to ``h`` (same shape as ``h``)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


class VisionSkip(nn.Module):
    """The vision-language skip connection (Eq. 8): I_skip = Rᵀ(W·h + b + A_u·u).

    ``u`` is one pooled early vision-encoder vector per example (:func:`pool_vision_features`).
    R (rank × hidden) starts at zero, so a fresh skip adds nothing; W (hidden → rank, with bias b) and
    A_u (vision → rank) keep PyTorch's default ``nn.Linear`` initialisation so that R receives a
    useful gradient from the first step.
    """

    def __init__(self, hidden_size: int, vision_dim: int, rank: int):
        super().__init__()
        self.source = nn.Linear(hidden_size, rank, bias=True)  # W, b
        self.vision = nn.Linear(vision_dim, rank, bias=False)  # A_u
        self.restore = nn.Parameter(torch.zeros(rank, hidden_size))  # R

    def forward(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (self.source(h) + self.vision(u)) @ self.restore


POOLINGS = ("mean", "max", "cls")


def pool_vision_features(features: Sequence[torch.Tensor], how: str = "mean") -> torch.Tensor:
    """One vector (d) from an example's early vision features, however many images it has.

    ``features`` holds one tensor per image, shaped (..., d): e.g. (tiles, patches, d) from LLaVA-NeXT's
    anyres encoder or (patches, d).  ``mean`` averages every patch of every tile of every image;
    ``max`` takes the element-wise maximum over them; ``cls`` averages the first token of each tile
    (the CLIP class token; a (patches, d) tensor is one tile).  Pooling runs in float32.
    """
    if how not in POOLINGS:
        raise SdrtError(f"unknown vision pooling {how!r}; use one of {', '.join(POOLINGS)}")
    if len(features) == 0:
        raise SdrtError("pool_vision_features needs at least one image's features, got none")
    dims = {f.shape[-1] for f in features}
    if len(dims) != 1 or any(f.dim() == 0 for f in features):
        raise SdrtError(f"vision features of one example must share their last dimension, got shapes {[tuple(f.shape) for f in features]}")
    if how == "cls":
        # every tensor becomes (tiles, tokens, d); a 1-D vector is already one token
        firsts = [f.reshape(-1, f.shape[-2], f.shape[-1])[:, 0] if f.dim() >= 2 else f.reshape(1, -1) for f in features]
        return torch.cat(firsts).float().mean(dim=0)
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).float()
    if flat.shape[0] == 0:
        raise SdrtError("vision features of this example contain no tokens")
    return flat.mean(dim=0) if how == "mean" else flat.amax(dim=0)


def check_pooling(how: str, backbone: Any) -> None:
    """Refuse a pooling that ``backbone``'s early vision states cannot give: ``cls`` reads a class
    token at position 0 of every tile, which only a backbone declaring ``vision_class_token`` has."""
    if how not in POOLINGS:
        raise SdrtError(f"unknown vision pooling {how!r}; use one of {', '.join(POOLINGS)}")
    if how == "cls" and not getattr(backbone, "vision_class_token", False):
        raise SdrtError(
            f"cls pooling reads a class token at position 0 of each image tile, and backbone {backbone.record().name!r} declares none "
            "(its vision_class_token is False); use mean or max pooling"
        )


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class AdapterConfig:
    """Everything needed to rebuild one prompt's intervention adapter.

    ``kind`` names a registered intervention (``reft``, ``loreft``).  ``layers`` are absolute decoder
    layer indices (the paper intervenes on the last 3).  ``init_std`` is the std of ReFT's Gaussian A;
    None means hidden_size ** -0.5, which keeps each coordinate of A·h at the RMS of h.
    ``vision_dim`` is the early vision-encoder width, required when ``skip`` is on.
    """

    kind: str
    rank: int
    layers: list[int]
    pos: int
    hidden_size: int
    skip: bool = False
    vision_dim: int | None = None
    init_std: float | None = None

    def __post_init__(self) -> None:
        self.validate("adapter config")

    def validate(self, source: str) -> None:
        def bad(name: str, need: str) -> SdrtError:
            return SdrtError(f"{source}: field {name!r} must be {need}, got {getattr(self, name)!r}")

        if not isinstance(self.kind, str) or not self.kind:
            raise bad("kind", "a non-empty adapter name")
        for name in ("rank", "pos", "hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "a positive integer")
        if not is_layer_list(self.layers):
            raise bad("layers", LAYER_LIST)
        self.layers = list(self.layers)
        if not isinstance(self.skip, bool):
            raise bad("skip", "true or false")
        if self.skip and (isinstance(self.vision_dim, bool) or not isinstance(self.vision_dim, int) or self.vision_dim < 1):
            raise bad("vision_dim", "a positive integer when skip is on")
        if self.vision_dim is not None and (isinstance(self.vision_dim, bool) or not isinstance(self.vision_dim, int) or self.vision_dim < 1):
            raise bad("vision_dim", "a positive integer or null")
        if self.init_std is not None and (
            isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) or not math.isfinite(self.init_std) or self.init_std <= 0
        ):
            raise bad("init_std", "a positive number or null")

    @property
    def resolved_init_std(self) -> float:
        return float(self.init_std) if self.init_std is not None else self.hidden_size**-0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> AdapterConfig:
        """Build from JSON data; a missing, unknown or ill-typed field names ``source`` and the field."""
        if not isinstance(data, dict):
            raise SdrtError(f"{source}: 'config' must be an object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise SdrtError(f"{source}: unknown config field {unknown[0]!r}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise SdrtError(f"{source}: config field {missing[0]!r} is missing")
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(obj, f.name, data.get(f.name, f.default))
        obj.validate(source)
        return obj


# ---------------------------------------------------------------------------------------------
# The adapter for one prompt
# ---------------------------------------------------------------------------------------------


def intervention_class(kind: str) -> type[Intervention]:
    """The registered :class:`Intervention` subclass for ``kind`` (unknown names suggest close ones)."""
    from sdrt_cli.plugins import adapters

    registry = adapters()
    value = registry.get(kind)
    if not _is_intervention(value):
        kinds = [n for n in registry.names() if _is_intervention(registry.get(n))]
        raise SdrtError(f"adapter {kind!r} is not an intervention kind (those are: {', '.join(kinds)})")
    return value


def ensemble_kinds() -> list[str]:
    """The registered intervention kinds whose adapters can be ensemble members (``ensemble_member``)."""
    from sdrt_cli.plugins import adapters

    registry = adapters()
    return [n for n in registry.names() if _is_intervention(registry.get(n)) and registry.get(n).ensemble_member]


def _is_intervention(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, Intervention)


LORA = "lora"


class WeightsAdapter(abc.ABC):
    """An adapter kind that changes the backbone's weights instead of editing hidden states through
    hooks: ``lora`` (low-rank updates of the decoder layers' projections) and ``projector`` (the
    multimodal projector itself, MmDC's alignment stage).  A plugin registers a subclass through
    ``register_adapters``; the core reaches every such kind only through this class:

    * ``format``: the checkpoint format it writes (``adapter.safetensors`` + ``adapter.json``);
    * ``check_backbone(backbone)``: refuses a backbone it cannot adapt, before anything is written;
    * ``student(backbone, units, spec, seed)``: what ``sdrt distill`` trains, one set of weights per
      unit (prompt, or ``gold``), with the interface of ``sdrt_cli.distill.students``;
    * ``applied(directory, backbone)``: a context manager that puts a saved checkpoint's weights into
      ``backbone.model`` for the ``with`` block and restores the original weights after it (how
      ``sdrt eval`` scores it).
    """

    format: ClassVar[str]

    @classmethod
    def check_backbone(cls, backbone: Any) -> None:
        """Refuse, in one sentence naming it, a backbone this kind cannot adapt (default: any will do)."""
        return None

    @classmethod
    @abc.abstractmethod
    def student(cls, backbone: Any, units: Sequence[str], spec: Any, seed: int) -> Any:
        """The trainable student of ``sdrt distill`` (see ``sdrt_cli.distill.students``)."""

    @classmethod
    @abc.abstractmethod
    def applied(cls, directory: Path, backbone: Any) -> contextlib.AbstractContextManager[None]:
        """The saved checkpoint in ``directory`` applied to ``backbone.model`` for a ``with`` block."""


def weights_adapter(kind: str) -> type[WeightsAdapter] | None:
    """The registered :class:`WeightsAdapter` named ``kind``, or None when ``kind`` is an intervention."""
    from sdrt_cli.plugins import adapters

    value = adapters().get(kind)
    return value if isinstance(value, type) and issubclass(value, WeightsAdapter) else None


def lora_adapter() -> Any:
    """The registered ``lora`` adapter, through which the core trains, saves and loads LoRA weights.

    Its registered object provides ``Settings(layers, rank, alpha, dropout[, targets])``,
    ``apply(model, decoder_layers, settings) -> peft model``, ``save(directory, peft_model, settings,
    decoder_layers, extra)``, ``load(directory, model, decoder_layers, device) -> peft model`` and
    ``format`` (the checkpoint format it writes); the built-in one is ``sdrt_plugins.adapters.lora``.
    """
    from sdrt_cli.plugins import adapters

    return adapters().get(LORA)


class InterventionAdapter(nn.Module):
    """One prompt's adapter: an intervention (plus optional skip) on each configured layer."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        config.validate("adapter config")
        self.config = config
        cls = intervention_class(config.kind)
        self.interventions = nn.ModuleDict(
            {str(layer): cls(config.hidden_size, config.rank, config.resolved_init_std) for layer in config.layers}
        )
        self.skips = nn.ModuleDict(
            {str(layer): VisionSkip(config.hidden_size, config.vision_dim, config.rank) for layer in config.layers} if config.skip else {}
        )

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def delta(self, layer: int, h: torch.Tensor, vision: torch.Tensor | None = None) -> torch.Tensor:
        """I(h) + I_skip(h, u) for ``layer`` on rows ``h`` [M, H] (``vision`` [M, d] when skip is on)."""
        key = str(layer)
        out = self.interventions[key].delta(h)
        if self.config.skip:
            if vision is None:
                raise SdrtError("this adapter has the vision skip connection: set_inputs(vision=...) needs pooled vision features")
            out = out + self.skips[key](h, vision)
        return out


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


@dataclass
class AttachHandle:
    """State shared by the hooks of one :func:`attach`; the caller arms it before each forward.

    ``captured[layer]`` holds the (intervened) output of each layer listed in ``capture`` from the
    latest forward, [B, T, H], with its autograd graph, so a trainer can read student hidden states
    exactly where the adapters wrote them; it is emptied when the ``with`` block exits.

    The hooks call ``adapter.delta`` directly (once per hooked layer per forward), so for multi-process
    training all-reduce the adapters' gradients after ``backward`` instead of wrapping them in DDP,
    whose ``forward`` the hooks never call.
    """

    adapters: list[InterventionAdapter]
    mask: torch.Tensor | None = None
    vision: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)

    def set_inputs(
        self,
        mask: torch.Tensor | None,
        vision: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Arm the next forward(s): ``mask`` BoolTensor[B, T] of positions to intervene (None: no
        intervention, e.g. decode steps), ``vision`` [B, d] pooled features when an adapter has the
        skip connection, ``weights`` [B, N] ensemble weights (None: keep the ones given to attach)."""
        if mask is not None:
            if mask.dim() != 2 or mask.dtype != torch.bool:
                raise SdrtError(f"intervention mask must be a bool tensor [batch, time], got {mask.dtype} {tuple(mask.shape)}")
            batch = mask.shape[0]
            if vision is not None and (vision.dim() != 2 or vision.shape[0] != batch):
                raise SdrtError(f"vision features must be [batch={batch}, d], got {tuple(vision.shape)}")
            if any(a.config.skip for a in self.adapters):
                if vision is None:
                    raise SdrtError("an attached adapter has the vision skip connection: set_inputs needs vision=[batch, d]")
                wanted = {a.config.vision_dim for a in self.adapters if a.config.skip}
                if vision.shape[1] not in wanted:
                    raise SdrtError(f"vision features have width {vision.shape[1]} but the adapters expect {sorted(wanted)}")
        if weights is not None:
            _check_weights(weights, len(self.adapters), None if mask is None else mask.shape[0])
            self.weights = weights
        elif mask is not None and self.weights is not None and self.weights.shape[0] != mask.shape[0]:
            raise SdrtError(f"ensemble weights cover {self.weights.shape[0]} rows but the mask has {mask.shape[0]}")
        self.mask = mask
        self.vision = vision

    def clear(self) -> None:
        """Disarm: later forwards are untouched until the next :meth:`set_inputs`."""
        self.mask = None
        self.vision = None


def _check_weights(weights: torch.Tensor, n: int, batch: int | None) -> None:
    if weights.dim() != 2 or weights.shape[1] != n or (batch is not None and weights.shape[0] != batch):
        want = f"[{batch if batch is not None else 'batch'}, {n}]"
        raise SdrtError(f"ensemble weights must have shape {want} (one weight per attached adapter), got {tuple(weights.shape)}")


@contextlib.contextmanager
def attach(
    decoder_layers: Sequence[nn.Module],
    adapters: InterventionAdapter | Sequence[InterventionAdapter],
    weights: torch.Tensor | None = None,
    capture: Iterable[int] = (),
) -> Iterator[AttachHandle]:
    """Hook ``adapters`` onto ``decoder_layers`` for the duration of the ``with`` block.

    With several adapters the update is h + Σ_n w[b, n]·Δ_n(h) (``weights`` [B, N]); one adapter with
    ``weights=None`` is the plain adapter.  ``capture`` lists layers whose outputs are kept in
    ``handle.captured`` (an empty ``adapters`` list with ``capture`` reads hidden states of the bare or
    LoRA-wrapped model, for the ``lora`` ablation's MSE loss).  Hooks are prepended, so anything else hooked on a layer
    (e.g. transformers' hidden-state recorder) sees the intervened output.  They are removed on exit,
    also when the block raises.
    """
    adapter_list = [adapters] if isinstance(adapters, InterventionAdapter) else list(adapters)
    capture = sorted(set(capture))
    if not adapter_list and not capture:
        raise SdrtError("attach needs at least one adapter or one layer to capture")
    layer_count = len(decoder_layers)
    hidden_sizes = {a.config.hidden_size for a in adapter_list}
    if len(hidden_sizes) > 1:
        raise SdrtError(f"attached adapters disagree on hidden_size: {sorted(hidden_sizes)}")
    for layer in [i for a in adapter_list for i in a.layers] + capture:
        if not 0 <= layer < layer_count:
            raise SdrtError(f"layer {layer} is out of range: the backbone has {layer_count} decoder layers (0..{layer_count - 1})")
    if weights is not None:
        _check_weights(weights, len(adapter_list), None)

    handle = AttachHandle(adapters=adapter_list, weights=weights)
    hooked = sorted({i for a in adapter_list for i in a.layers} | set(capture))
    removers = []
    try:
        for layer in hooked:
            hook = _make_hook(handle, layer, layer in capture)
            removers.append(decoder_layers[layer].register_forward_hook(hook, prepend=True))
        yield handle
    finally:
        for remover in removers:
            remover.remove()
        handle.captured.clear()


def _make_hook(handle: AttachHandle, layer: int, record: bool):
    members = [(n, a) for n, a in enumerate(handle.adapters) if layer in a.config.layers]

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        new = _intervene(handle, layer, members, hidden)
        if record:
            handle.captured[layer] = new
        if new is hidden:
            return None  # leave the output object as the layer returned it
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    return hook


def _intervene(handle: AttachHandle, layer: int, members, hidden: torch.Tensor) -> torch.Tensor:
    mask = handle.mask
    if not members or mask is None:
        return hidden
    if mask.shape != hidden.shape[:2]:
        raise SdrtError(
            f"intervention mask has shape {tuple(mask.shape)} but decoder layer {layer} saw [batch, time] = "
            f"{tuple(hidden.shape[:2])}; set_inputs must be given the mask of exactly the positions of this forward"
        )
    mask = mask.to(hidden.device)
    if not bool(mask.any()):
        return hidden
    rows, cols = mask.nonzero(as_tuple=True)
    selected = hidden[rows, cols]  # [M, H]: only the intervened positions go through the adapters
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    vision = handle.vision
    total = selected.to(compute_dtype)
    for n, adapter in members:
        param = next(adapter.parameters())
        u = None if vision is None or not adapter.config.skip else vision.to(param.device, param.dtype)[rows]
        delta = adapter.delta(layer, selected.to(param.dtype), u).to(compute_dtype)
        if handle.weights is not None:
            delta = delta * handle.weights.to(hidden.device, compute_dtype)[rows, n].unsqueeze(-1)
        total = total + delta
    return hidden.index_put((rows, cols), total.to(hidden.dtype))


# ---------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON, no pickle)
# ---------------------------------------------------------------------------------------------


def write_checkpoint(directory: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``adapter.safetensors`` then ``adapter.json`` (with the tensors' checksum), each atomically.

    The JSON is written last, so a directory with a readable JSON always has its matching tensors.
    """
    from safetensors.torch import save

    directory = Path(directory)
    try:
        json.dumps(dict(meta))
    except (TypeError, ValueError) as exc:
        raise SdrtError(f"adapter metadata for {directory / ADAPTER_JSON} is not JSON-serialisable: {exc}") from None
    blob = save({name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()})
    atomic_write_bytes(directory / ADAPTER_TENSORS, blob)
    document = dict(meta)
    document["tensors_sha256"] = sha256_file(directory / ADAPTER_TENSORS)
    atomic_write_text(directory / ADAPTER_JSON, json.dumps(document, indent=2, sort_keys=True) + "\n")


def read_checkpoint(directory: Path, expected_format: str, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint written by :func:`write_checkpoint`; returns (tensors, json)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    json_path = directory / ADAPTER_JSON
    tensor_path = directory / ADAPTER_TENSORS
    if not json_path.is_file():
        raise SdrtError(f"adapter checkpoint {json_path} does not exist")
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SdrtError(f"adapter checkpoint {json_path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SdrtError(f"adapter checkpoint {json_path} must hold a JSON object")
    fmt = document.get("format")
    if fmt != expected_format:
        raise SdrtError(f"{json_path}: field 'format' is {fmt!r}, expected {expected_format!r}")
    if document.get("format_version") != FORMAT_VERSION:
        raise SdrtError(f"{json_path}: field 'format_version' is {document.get('format_version')!r}, this sdrt reads {FORMAT_VERSION}")
    if not tensor_path.is_file():
        raise SdrtError(f"adapter checkpoint {tensor_path} does not exist")
    if sha256_file(tensor_path) != document.get("tensors_sha256"):
        raise SdrtError(f"{tensor_path} does not match field 'tensors_sha256' of {json_path} (corrupt or replaced file)")
    try:
        tensors = load_file(str(tensor_path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise SdrtError(f"adapter checkpoint {tensor_path} cannot be read: {exc}") from None
    return tensors, document


def save_adapter(directory: Path, adapter: InterventionAdapter, extra: Mapping[str, Any] | None = None) -> None:
    """Save ``adapter`` to ``directory``: its config and ``extra`` (backbone identity, prompt id, ...)."""
    meta = {
        "format": INTERVENTION_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": adapter.config.to_dict(),
        "extra": dict(extra or {}),
    }
    write_checkpoint(directory, adapter.state_dict(), meta)


def load_adapter(
    directory: Path,
    device: str | torch.device = "cpu",
    expected: Mapping[str, Any] | None = None,
) -> InterventionAdapter:
    """Rebuild a saved adapter on ``device``.

    ``expected`` maps config or extra field names to the values the caller needs (e.g.
    ``{"hidden_size": 4096, "prompt_id": "extract-1"}``); a mismatch names the file and field.
    """
    tensors, document = read_checkpoint(directory, INTERVENTION_FORMAT, device)
    json_path = Path(directory) / ADAPTER_JSON
    config = AdapterConfig.from_dict(document.get("config"), str(json_path))
    extra = document.get("extra", {})
    if not isinstance(extra, dict):
        raise SdrtError(f"{json_path}: field 'extra' must be an object")
    for name, want in (expected or {}).items():
        have = getattr(config, name) if name in config.to_dict() else extra.get(name, _MISSING)
        if have is _MISSING:
            raise SdrtError(f"{json_path}: field {name!r} is missing (expected {want!r})")
        if have != want:
            raise SdrtError(f"{json_path}: field {name!r} is {have!r}, expected {want!r}")
    adapter = InterventionAdapter(config)
    own = adapter.state_dict()
    tensor_path = Path(directory) / ADAPTER_TENSORS
    for name, value in own.items():
        if name not in tensors:
            raise SdrtError(f"{tensor_path} lacks tensor {name!r} that the config in {json_path} implies")
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise SdrtError(
                f"{tensor_path}: tensor {name!r} has shape {tuple(tensors[name].shape)} but the config in {json_path} "
                f"(kind={config.kind}, rank={config.rank}, hidden_size={config.hidden_size}) implies {tuple(value.shape)}"
            )
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise SdrtError(f"{tensor_path} holds tensor {unexpected[0]!r} that the config in {json_path} does not use")
    adapter.load_state_dict(tensors)
    # load_state_dict copies values into the fresh parameters; match the stored dtype, then the device
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        adapter.to(dtype=dtypes.pop())
    return adapter.to(device)


_MISSING = object()
