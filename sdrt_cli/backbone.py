"""The backbone contract: everything model-specific lives behind this interface.

The pipeline (traces, distill, ensemble, eval) never imports a model class.  It asks the backbone to
render a chat, tokenize it with images, encode images once, embed tokens with image features spliced
in, run the language model on embeddings with a KV cache, and map hidden states to logits.

A plugin registers a *factory* (``register_backbones``); :func:`load_backbone` calls it with the
options ``device``, ``dtype``, ``seed`` and, when the user gave one, ``model``, checks that it returned
a :class:`Backbone` and validates its :class:`BackboneIdentity`.  Manifests record a
:class:`BackboneRecord`: the registered name, the factory options that decide the weights (``seed``,
``model``; not ``device``/``dtype``, which are per run) and the identity, so a later stage rebuilds
the same backbone with :func:`load_recorded_backbone`, whatever plugin it comes from.

Hidden-state convention (the trace contract relies on it): the states that adapters modify, that the
trace engine stores and that the MSE loss compares are the OUTPUTS of decoder layers, i.e. the residual
stream before the language model's final norm.  ``lm_logits`` applies the final norm and the LM head.

The whole contract, with what is not supported, is in docs/backbones.md; ``sdrt_cli.hf`` holds the
transformers plumbing an HF-based backbone needs.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from torch import nn


@dataclass
class Turn:
    """One chat turn: ``images`` is how many images this turn shows (placed before the text)."""

    role: str  # "user" | "assistant"
    text: str
    images: int = 0


@dataclass
class EncodedImages:
    """Images encoded once and reused by every prompt and step of an example.

    ``features[i]`` is image i's projected features, one row per image token it expands to;
    ``pooled_early[i]`` is image i's early vision-encoder features (tiles x patches x d) for the
    vision-language skip connection, or None when not requested.
    """

    features: list[torch.Tensor]
    early: list[torch.Tensor] | None = None

    @property
    def token_counts(self) -> list[int]:
        return [f.shape[0] for f in self.features]


@dataclass
class LMOutput:
    last_hidden: torch.Tensor  # final-normed hidden states of the positions fed, [B, T, H]
    past_key_values: Any


# The options the commands pass to every factory (``model`` only when the user gave one).  seed and
# model decide the weights; device and dtype say where and how this run holds them.
FACTORY_OPTIONS = ("device", "dtype", "seed", "model")
RUNTIME_OPTIONS = ("device", "dtype")
# handled by the core, never passed to a factory: ``projector`` (a trained multimodal projector,
# MmDC's aligned model) is loaded into the backbone after its factory built it
CORE_OPTIONS = ("projector",)


@dataclass(frozen=True)
class BackboneIdentity:
    """What a backbone is, as a plugin's ``identity()`` returns it.  Every field is a non-empty string.

    ``source``: where the weights come from, for people (a checkpoint id or path, ``random:tiny:seed=0``);
    nothing parses it.  The four hashes decide whether something made with one backbone (a trace
    store, adapters, an ensemble) may be used with another: all four must be equal.
    ``config_hash``: the architecture (config without load-time fields); ``weights_hash``: the weights
    (a sample of a few tensors is enough: it must differ between seeds or checkpoints);
    ``tokenizer_hash``: the vocabulary; ``chat_template_hash``: the chat template.
    ``sdrt_cli.hf`` has helpers that compute them for a transformers model.
    """

    source: str
    config_hash: str
    weights_hash: str
    tokenizer_hash: str
    chat_template_hash: str

    HASHES = ("config_hash", "weights_hash", "tokenizer_hash", "chat_template_hash")


@dataclass(frozen=True)
class BackboneRecord:
    """A loaded backbone as manifests store it: how to rebuild it and what it is.

    ``name``: the registered backbone name; ``options``: the factory options that decide the weights
    (``seed``, and ``model`` when one was given); ``identity``: the plugin's validated identity;
    ``num_layers`` and ``hidden_size``: the language model's shape.  Its JSON (``to_json``) is flat,
    as manifests have always stored it: ``{"backbone": name, "source": ..., the hashes,
    "num_layers", "hidden_size", "options": {...}}``.
    """

    name: str
    options: dict[str, Any]
    identity: BackboneIdentity
    num_layers: int
    hidden_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "backbone": self.name,
            **dataclasses.asdict(self.identity),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "options": dict(self.options),
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> BackboneRecord:
        """A record read from a manifest (``where`` names it in errors).  Manifests written before
        options were recorded get them from their ``source``: ``random:...:seed=N`` (a random
        backbone) gives ``{"seed": N}``, any other source ``{"model": source}`` (a checkpoint)."""
        from sdrt_cli.errors import SdrtError

        if not isinstance(data, Mapping):
            raise SdrtError(f"{where}: field 'backbone' must be an object, not {type(data).__name__}")
        for key in ("backbone", *dataclasses.asdict(_EMPTY_IDENTITY)):
            if not isinstance(data.get(key), str) or not data.get(key):
                raise SdrtError(f"{where}: field 'backbone.{key}' must be a non-empty string, got {data.get(key)!r}")
        options = data.get("options")
        if options is None:
            options = _options_from_source(data["source"])
        elif not isinstance(options, Mapping):
            raise SdrtError(f"{where}: field 'backbone.options' must be an object, got {options!r}")
        identity = BackboneIdentity(**{key: data[key] for key in dataclasses.asdict(_EMPTY_IDENTITY)})
        return cls(data["backbone"], dict(options), identity, int(data.get("num_layers") or 0), int(data.get("hidden_size") or 0))

    def mismatch(self, other: BackboneRecord) -> str | None:
        """What differs between this record and ``other`` ("weights_hash a vs b, ..."); None: the same backbone."""
        diffs = [
            f"{key} {getattr(self.identity, key)} vs {getattr(other.identity, key)}"
            for key in BackboneIdentity.HASHES
            if getattr(self.identity, key) != getattr(other.identity, key)
        ]
        return ", ".join(diffs) if diffs else None

    def check_matches(self, current: BackboneRecord, made: str) -> None:
        """Refuse ``current`` unless it is this recorded backbone; ``made`` says what was made with
        this one, e.g. "trace store runs/t was made with" (the one home of this check)."""
        from sdrt_cli.errors import SdrtError

        problem = self.mismatch(current)
        if problem:
            if current.identity.source != self.identity.source:  # e.g. with vs without a trained projector
                problem = f"{problem}; the one in use is from {current.identity.source!r}"
            raise SdrtError(f"{made} backbone {self.name!r} from {self.identity.source!r}, not the one in use ({problem})")


_EMPTY_IDENTITY = BackboneIdentity("", "", "", "", "")
_RANDOM_SEED = re.compile(r"random:.*seed=(\d+)")


def _options_from_source(source: str) -> dict[str, Any]:
    match = _RANDOM_SEED.fullmatch(source)
    return {"seed": int(match.group(1))} if match else {"model": source}


def recorded_backbone(data: Any, where: str) -> BackboneRecord:
    """``BackboneRecord.from_json`` for a manifest field that may already be a record."""
    return data if isinstance(data, BackboneRecord) else BackboneRecord.from_json(data, where)


class Backbone(abc.ABC):
    """A loaded vision-language model with its processor (the contract: docs/backbones.md).

    A factory sets the attributes below and returns the instance; :func:`load_backbone` then records
    how it was loaded (see :meth:`record`).  ``vision_feature_default_layer`` is the early vision
    layer the skip connection reads by default; ``vision_class_token`` is True only when every tile of
    ``EncodedImages.early`` starts with a class token (CLIP does, SigLIP has none): ``cls`` pooling
    is refused otherwise.
    """

    name: str = ""
    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    image_token_id: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    vision_feature_default_layer: int = 1
    vision_class_token: bool = False
    options: dict[str, Any]

    # -- identity -------------------------------------------------------------------------
    @abc.abstractmethod
    def identity(self) -> BackboneIdentity:
        """What this backbone is (see :class:`BackboneIdentity`); validated by :func:`load_backbone`."""

    def record(self) -> BackboneRecord:
        """How this backbone was loaded and what it is: what manifests store.  :func:`load_backbone`
        sets it; a backbone built by calling a factory directly gets one with its ``name`` and no
        options (it still compares by its identity's hashes)."""
        recorded = self.__dict__.get("_sdrt_record")
        if recorded is None:
            recorded = _make_record(self, self.name or type(self).__name__, {}, plugin=type(self).__module__)
            self._sdrt_record = recorded
        return recorded

    # -- text -----------------------------------------------------------------------------
    @abc.abstractmethod
    def render_chat(self, turns: Sequence[Turn], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``turns``; image placeholders where the turns show images."""

    @abc.abstractmethod
    def tokenize(self, text: str, image_token_counts: Sequence[int] = ()) -> list[int]:
        """Token ids of ``text`` with each image placeholder expanded to its image's token count."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens removed."""

    # -- images ---------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_images(self, images: Sequence[Image.Image], early_layer: int | None = None) -> EncodedImages:
        """Run the vision tower and projector once; optionally keep an early vision layer's states."""

    # -- language model -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def decoder_layers(self) -> list[nn.Module]:
        """The language model's decoder layers, in order (adapters hook their outputs)."""

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def vision_hidden_size(self) -> int: ...

    @abc.abstractmethod
    def embed(self, input_ids: torch.Tensor, image_features: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Token embeddings [B, T, H]; row r's image tokens take the rows of ``image_features[r]`` in order."""

    @abc.abstractmethod
    def lm_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any = None,
    ) -> LMOutput:
        """Decoder stack on embeddings [B, T, H] -> final-normed states of those positions.

        ``attention_mask`` [B, cache + T] (1 = attend) covers the cache's slots then the new ones;
        ``position_ids`` [B, T] holds one position per token (left-padded rows: any position for
        their masked slots).  ``past_key_values`` is None (a whole sequence, nothing kept) or a cache
        from ``new_cache``: the new keys and values are appended to it and it is returned as
        ``LMOutput.past_key_values``.  Layer outputs are captured by forward hooks on
        ``decoder_layers``, so every layer must run as that module's ``forward``."""

    @abc.abstractmethod
    def run_layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, start: int, end: int, cache: Any = None
    ) -> torch.Tensor:
        """Decoder layers ``start..end-1``: input to layer ``start`` -> output of layer ``end-1``.

        ``run_layers(embed(ids), ..., 0, n)`` then ``final_norm`` equals ``lm_forward``; training caches
        the frozen layers below the first intervened one.  It must call the modules of
        ``decoder_layers`` themselves (adapters are forward hooks on them) with the same causal mask
        and rotary embeddings as ``lm_forward``.  ``position_ids`` is [B, T], one position per token.
        Without ``cache`` the sequence is whole; with one (from ``new_cache``) these layers attend to
        and append to its keys and values, and ``attention_mask`` covers cache + new positions, as in
        ``lm_forward``.  ``sdrt_cli.hf.run_decoder_layers`` does all of this for transformers models."""

    @property
    def multimodal_projector(self) -> nn.Module | None:
        """The module that maps vision-encoder features to the language model's embeddings (LLaVA's
        ``multi_modal_projector``), or None when the backbone has none to expose.  Optional: the
        ``projector`` adapter (MmDC's alignment stage) trains it and the ``projector`` factory option
        loads a trained one.  ``encode_images`` must run it as this module's ``forward`` and keep
        autograd through it when its parameters require grad (and only then)."""
        return None

    @abc.abstractmethod
    def lm_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed hidden states."""

    @abc.abstractmethod
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's final norm (decoder-layer output -> what the LM head reads)."""

    def float32_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_logits(final_norm(hidden))`` as float32, outside any autocast: what distillation losses
        read (bf16 logits keep ~3 significant digits, and a vocabulary-wide softmax amplifies that).
        This default runs the norm and head in the weights' dtype and upcasts the logits; a backbone
        whose weights may be bf16 overrides it to run them in float32."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.lm_logits(self.final_norm(hidden.to(self.dtype))).float()

    def new_cache(self) -> Any:
        """An empty KV cache for ``lm_forward`` and ``run_layers``: every cache the pipeline uses comes
        from here.  The default is a transformers ``Cache`` that grows in place
        (``sdrt_cli.hf.growable_cache``); it must support ``reorder_cache(index)`` (rows are selected
        and repeated) and ``copy.deepcopy``.  A backbone that does not run transformers attention
        returns its own."""
        from sdrt_cli.hf import growable_cache

        return growable_cache()


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    from sdrt_cli.errors import SdrtError

    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise SdrtError(f"unknown dtype {name!r}; use one of auto, fp32, bf16, fp16")
    return table[name]


def resolve_device(name: str | None) -> torch.device:
    from sdrt_cli.errors import SdrtError

    if name in (None, "auto"):
        import os

        if torch.cuda.is_available():
            # modulo: schedulers that expose one GPU per task give every rank device 0
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SdrtError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdrtError(f"device {name!r} was requested but CUDA is not available on this machine")
    return device


def identity_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The factory options a record keeps: everything but device and dtype, None dropped, and a
    ``model`` that names a local path made absolute (a later stage may run from elsewhere)."""
    kept = {key: value for key, value in options.items() if key not in RUNTIME_OPTIONS and value is not None}
    model = kept.get("model")
    if isinstance(model, str) and Path(model).expanduser().exists():
        kept["model"] = str(Path(model).expanduser().resolve())
    return kept


def _make_record(backbone: Any, name: str, options: dict[str, Any], plugin: str) -> BackboneRecord:
    """The validated record of a factory's result (one sentence naming the plugin otherwise)."""
    from sdrt_cli.errors import SdrtError

    where = f"backbone {name!r} (plugin {plugin!r})"
    if not isinstance(backbone, Backbone):
        raise SdrtError(f"{where}: its factory returned {type(backbone).__name__}, not a sdrt_cli.backbone.Backbone")
    identity = backbone.identity()
    if not isinstance(identity, BackboneIdentity):
        raise SdrtError(f"{where}: identity() returned {type(identity).__name__}, not a sdrt_cli.backbone.BackboneIdentity")
    for key, value in dataclasses.asdict(identity).items():
        if not isinstance(value, str) or not value:
            raise SdrtError(f"{where}: identity() field {key!r} is {value!r}; it must be a non-empty string")
    return BackboneRecord(name, options, identity, len(backbone.decoder_layers), int(backbone.hidden_size))


def load_backbone(name: str, **options: Any) -> Backbone:
    """Instantiate the backbone registered as ``name``: ``options`` go to its factory (see
    ``FACTORY_OPTIONS``), except ``projector`` (``CORE_OPTIONS``), which the core applies after the
    factory (:func:`apply_projector`).  The result is validated and its :meth:`Backbone.record` set."""
    from sdrt_cli.plugins import backbones

    projector = options.pop("projector", None)
    entry = backbones().entry(name)
    backbone = entry.value(**options)
    record = _make_record(backbone, name, identity_options(options), entry.plugin)
    backbone._sdrt_record = record
    if projector is not None:
        backbone._sdrt_record = apply_projector(backbone, record, projector)
    return backbone


def apply_projector(backbone: Backbone, record: BackboneRecord, projector: Any) -> BackboneRecord:
    """Load a trained projector into ``backbone`` (for good) and return its record with it.

    ``projector`` is a checkpoint directory of the ``projector`` adapter, a ``sdrt distill --adapter
    projector`` run (its ``gold`` adapter, or its only one), or a recorded ``{"path", "tensors_sha256"}``
    (which must still hold those tensors).  The record keeps the checkpoint's absolute path and
    tensor hash in ``options["projector"]`` and folds the hash into ``weights_hash``, so whatever is
    made with an aligned projector is never mixed with what was made without it, or with another."""
    from sdrt_cli.errors import SdrtError
    from sdrt_cli.plugins import adapters

    recorded_hash = None
    if isinstance(projector, Mapping):
        path, recorded_hash = projector.get("path"), projector.get("tensors_sha256")
        if not isinstance(path, str) or not isinstance(recorded_hash, str):
            raise SdrtError(f"backbone option 'projector' must name a checkpoint directory, got {dict(projector)!r}")
    else:
        path = str(projector)
    kind = adapters().get("projector")
    directory = kind.checkpoint_directory(Path(path).expanduser())
    tensors_sha256 = kind.load_into(directory, backbone)
    if recorded_hash is not None and tensors_sha256 != recorded_hash:
        raise SdrtError(f"projector checkpoint {directory} no longer holds the tensors it was recorded with (tensors_sha256 {tensors_sha256}, recorded {recorded_hash})")
    identity = dataclasses.replace(
        record.identity,
        source=f"{record.identity.source}+projector:{directory}",
        weights_hash=stable_hash([record.identity.weights_hash, tensors_sha256]),
    )
    options = {**record.options, "projector": {"path": str(directory), "tensors_sha256": tensors_sha256}}
    return dataclasses.replace(record, options=options, identity=identity)


def load_recorded_backbone(
    recorded: BackboneRecord | None, name: str | None = None, model: str | None = None, projector: str | None = None, **runtime: Any
) -> Backbone:
    """The backbone of a record, rebuilt with the options its factory got then (and the recorded
    trained projector, if any).

    ``name`` / ``model`` / ``projector`` are the user's overrides (None: the record's).  Another
    ``name`` than the recorded one, or no record, loads that backbone from ``runtime`` (device, dtype,
    seed) alone; ``model`` replaces the recorded checkpoint, ``projector`` the recorded projector.
    Whatever loads is compared with the record by the caller (``BackboneRecord.check_matches``)."""
    from sdrt_cli.errors import SdrtError

    if recorded is None or (name is not None and name != recorded.name):
        if name is None:
            raise SdrtError("no backbone to load: none is named and nothing records one")
        options = {**runtime, **({"model": model} if model else {}), **({"projector": projector} if projector else {})}
        return load_backbone(name, **options)
    options = {**{k: v for k, v in runtime.items() if k in RUNTIME_OPTIONS}, **recorded.options}
    if model:
        options["model"] = model
    if projector:
        options["projector"] = projector
    return load_backbone(recorded.name, **options)
