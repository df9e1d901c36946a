"""The backbone contract: everything model-specific lives behind this interface.

The pipeline (traces, distill, ensemble, eval) never imports a model class.  It asks the backbone to
render a chat, tokenize it with images, encode images once, embed tokens with image features spliced
in, run the language model on embeddings with a KV cache, and map hidden states to logits.

Hidden-state convention (the trace contract relies on it): the states that adapters modify, that the
trace engine stores and that the MSE loss compares are the OUTPUTS of decoder layers, i.e. the residual
stream before the language model's final norm.  ``lm_logits`` applies the final norm and the LM head.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

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


class Backbone(abc.ABC):
    """A loaded vision-language model with its processor."""

    name: str = ""
    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    image_token_id: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    vision_feature_default_layer: int = 1
    options: dict[str, Any]

    # -- identity -------------------------------------------------------------------------
    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """Backbone name, model source, config hash and tokenizer hash (stores refuse a mismatch)."""

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
        """Decoder stack on embeddings; ``attention_mask`` covers cache + new positions."""

    @abc.abstractmethod
    def run_layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, start: int, end: int, cache: Any = None
    ) -> torch.Tensor:
        """Decoder layers ``start..end-1``: input to layer ``start`` -> output of layer ``end-1``.
        ``run_layers(embed(ids), ..., 0, n)`` then ``final_norm`` equals ``lm_forward``; training caches
        the frozen layers below the first intervened one.  Without ``cache`` the sequence is whole; with
        one (from ``new_cache``) these layers attend to and append to its keys and values, and
        ``attention_mask`` covers cache + new positions, as in ``lm_forward``."""

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

    @abc.abstractmethod
    def new_cache(self) -> Any:
        """An empty KV cache object for ``lm_forward``."""


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


def load_backbone(name: str, **options: Any) -> Backbone:
    """Instantiate a registered backbone by name."""
    from sdrt_cli.plugins import backbones

    factory = backbones().get(name)
    return factory(**options)
