"""Transformers plumbing for backbones built on a Hugging Face language model (public API).

A backbone whose language model is a transformers decoder (Llama, Mistral, Qwen2, ...: a module with
``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``) needs the same few pieces to meet the
contract in :mod:`sdrt_cli.backbone`; they live here once and the built-in LLaVA-NeXT backbones use
them too:

* :func:`causal_mask` and :func:`run_decoder_layers`: the model's own 4D causal mask and rotary
  embeddings for ``run_layers`` (and :func:`lm_forward` for ``lm_forward``), refusing multi-axis
  position ids (M-RoPE) that the pipeline cannot produce;
* :func:`growable_cache`: the KV cache ``Backbone.new_cache`` returns by default;
* :func:`config_hash`, :func:`vocabulary_hash`, :func:`weights_hash`: the fields of a
  :class:`~sdrt_cli.backbone.BackboneIdentity`;
* :func:`mistral_tokenizer`: the real Mistral v1 tokenizer, offline (shipped in the
  ``mistral-common`` wheel), for randomly initialised test backbones;
* :func:`seeded`: build a module from a seed without touching the caller's random state.

See docs/backbones.md for the contract these serve.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from sdrt_cli.backbone import LMOutput, stable_hash
from sdrt_cli.errors import SdrtError

# -- KV cache -------------------------------------------------------------------------------------


def growable_cache():
    """A KV cache whose layers grow in place with spare capacity.

    transformers' DynamicCache concatenates the whole cache at every decoding step (O(T) copies
    per token, which dominates decoding after a ~2,900-token image prefix); this one writes into
    preallocated buffers and grows them geometrically.
    """
    from transformers.cache_utils import Cache, DynamicLayer

    class GrowableLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._length = 0
                self._k = self._v = None
            end = self._length + key_states.shape[-2]
            if self._k is None or end > self._k.shape[-2]:
                capacity = end + max(64, end // 2)
                shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
                k = key_states.new_empty(shape)
                v = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
                if self._length:
                    k[..., : self._length, :] = self._k[..., : self._length, :]
                    v[..., : self._length, :] = self._v[..., : self._length, :]
                self._k, self._v = k, v
            self._k[..., self._length : end, :] = key_states
            self._v[..., self._length : end, :] = value_states
            self._length = end
            self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
            return self.keys, self.values

        def reorder_cache(self, beam_idx):
            if self.get_seq_length() > 0:
                index = beam_idx.to(self._k.device)
                self._k = self._k.index_select(0, index)
                self._v = self._v.index_select(0, index)
                self.keys, self.values = self._k[..., : self._length, :], self._v[..., : self._length, :]

    return Cache(layer_class_to_replicate=GrowableLayer)


# -- masks, positions and layers ---------------------------------------------------------------------


def check_single_axis_positions(language_model: nn.Module, position_ids: torch.Tensor) -> None:
    """Refuse multi-axis position ids (M-RoPE, as in Qwen2-VL: one position per axis of text, height
    and width).  The pipeline gives every token one position [B, T]; such a model would compute
    other states than its own forward, silently."""
    config = language_model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rotary = getattr(language_model, "rotary_emb", None)
    if (isinstance(rope, dict) and "mrope_section" in rope) or hasattr(rotary, "mrope_section"):
        raise SdrtError(
            f"{type(language_model).__name__} uses multi-axis rotary positions (M-RoPE, as Qwen2-VL), which sdrt does not "
            "support yet: the pipeline gives each token one position (see docs/backbones.md)"
        )
    if position_ids.ndim != 2:
        raise SdrtError(f"position ids must be [batch, tokens] (one position per token), got shape {tuple(position_ids.shape)}")


def with_self_attention(mask):
    """``mask`` (a transformers 4D attention mask [B, 1, Q, K], the queries being the last Q key slots)
    with each query allowed to attend to its own slot.  None (plain causal), flash-attention's 2D
    padding mask and flex block masks pass through unchanged."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        return mask
    queries, keys = mask.shape[-2:]
    own_slot = torch.arange(keys, device=mask.device)[None, :] == torch.arange(keys - queries, keys, device=mask.device)[:, None]
    if mask.dtype == torch.bool:  # sdpa: True = attend
        return mask | own_slot
    return mask.masked_fill(own_slot, 0.0)  # eager: additive, 0 = attend


def causal_mask(language_model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any = None):
    """The model's own causal mask for a 2D padding mask (cache + new slots), in which every query slot
    may also attend to itself.  A left-padded query slot otherwise sees only masked keys, and some GPU
    attention kernels return NaN for such a row (the NaN then spreads through the cache); a real query
    already sees its own slot, so its attention is unchanged."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    check_single_axis_positions(language_model, position_ids)
    config = language_model.config
    make_mask = create_causal_mask if getattr(config, "sliding_window", None) is None else create_sliding_window_causal_mask
    mask = make_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache, position_ids=position_ids)
    return with_self_attention(mask)


def run_decoder_layers(
    language_model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, start: int, end: int, cache: Any = None
) -> torch.Tensor:
    """``Backbone.run_layers`` for a transformers decoder: layers ``start..end-1`` of
    ``language_model.layers`` with its causal mask and rotary embeddings, appending to ``cache``."""
    mask = causal_mask(language_model, hidden, attention_mask, position_ids, cache)
    position_embeddings = language_model.rotary_emb(hidden, position_ids=position_ids)
    for layer in language_model.layers[start:end]:
        hidden = layer(
            hidden, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=cache is not None, position_embeddings=position_embeddings
        )
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def lm_forward(language_model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any = None) -> LMOutput:
    """``Backbone.lm_forward`` for a transformers decoder: its own forward with :func:`causal_mask`."""
    out = language_model(
        inputs_embeds=inputs_embeds,
        attention_mask=causal_mask(language_model, inputs_embeds, attention_mask, position_ids, cache),
        position_ids=position_ids,
        cache=cache,
        use_cache=cache is not None,
    )
    return LMOutput(last_hidden=out.last_hidden_state, past_key_values=out.cache)


def float32_logits(norm: nn.Module, head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``head(norm(hidden))`` in float32 whatever the weights' dtype (``Backbone.float32_logits``): an
    RMSNorm computes in float32 and promotes its weight; the head's weight is upcast per call
    (frozen, so gradients reach only ``hidden``)."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        normed = norm(hidden.float())
        return nn.functional.linear(normed, head.weight.float(), None if head.bias is None else head.bias.float())


# -- identity ----------------------------------------------------------------------------------------

_NOT_ARCHITECTURE = {"_name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures", "_attn_implementation_autoset"}


def _architecture(config: dict) -> dict:
    return {k: (_architecture(v) if isinstance(v, dict) else v) for k, v in config.items() if k not in _NOT_ARCHITECTURE}


def config_hash(config: Any) -> str:
    """Hash of a transformers config without where/how it was loaded: a saved-and-reloaded model keeps it."""
    return stable_hash(_architecture(config.to_dict()))


def vocabulary_hash(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary (token -> id)."""
    return stable_hash(sorted(tokenizer.get_vocab().items()))


def weights_hash(tensors: Sequence[torch.Tensor], sample: int = 4096) -> str:
    """A cheap fingerprint of weights: the first ``sample`` values of each tensor, not a pass over
    billions (choose tensors that differ between checkpoints: embeddings, the LM head, a late layer)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().flatten()[:sample].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random state seeded with ``seed`` inside, the caller's restored after: modules built inside are
    the same for the same seed on every machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# -- tokenizers --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where sdrt keeps converted tokenizers and models (``$SDRT_CACHE``, default ~/.cache/sdrt)."""
    return Path(os.environ.get("SDRT_CACHE", Path.home() / ".cache" / "sdrt"))


def mistral_tokenizer(image_token: str = "<image>"):
    """The real Mistral v1 tokenizer (32,000 tokens, from the ``mistral-common`` wheel, no download)
    plus ``image_token`` as a special token, padding with ``<unk>`` as LLaVA does; converted once and
    cached under :func:`cache_dir`."""
    import mistral_common
    from transformers import AutoTokenizer, LlamaTokenizer

    source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not source.exists():
        raise SdrtError(f"the Mistral tokenizer file {source} is missing from the mistral-common package; reinstall mistral-common")
    target = cache_dir() / "tokenizers" / ("mistral-v1-llava" if image_token == "<image>" else f"mistral-v1-{stable_hash(image_token)}")
    if not (target / "tokenizer.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(source, Path(tmp) / "tokenizer.model")
            tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False, legacy=False)
        tok.add_special_tokens({"additional_special_tokens": [image_token]})
        tok.pad_token = tok.unk_token
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        tok.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic: concurrent first runs never see a half-written tokenizer
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target)
