"""LLaVA-NeXT backbones through transformers' ``LlavaNextForConditionalGeneration``.

* ``llava-next``: a pretrained checkpoint (default ``llava-hf/llava-v1.6-mistral-7b-hf``) from a local
  directory or the Hugging Face cache.  Nothing is downloaded at run time.
* ``llava-next-tiny`` / ``llava-next-bench``: the same classes, randomly initialised from a seed at a
  small size, with the real Mistral tokenizer (shipped in the ``mistral-common`` wheel) plus ``<image>``
  and the real LLaVA-NeXT image processor and anyres grid, so image token counts are realistic
  (up to ~2,900 tokens per image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from sdrt_cli import hf
from sdrt_cli.backbone import (
    Backbone,
    BackboneIdentity,
    EncodedImages,
    LMOutput,
    Turn,
    resolve_device,
    resolve_dtype,
    stable_hash,
)
from sdrt_cli.errors import SdrtError
from sdrt_cli.hf import mistral_tokenizer

DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"
IMAGE_TOKEN = "<image>"

# The anyres grid and image preprocessing of llava-hf/llava-v1.6-mistral-7b-hf.
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The Mistral-instruct chat format LLaVA-1.6 Mistral was trained with: images first in a user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s>' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

SIZES: dict[str, dict[str, Any]] = {
    # tests: seconds on a CPU
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2),
    ),
    # benchmarks: large enough that compute, not Python overhead, dominates
    "bench": dict(
        text=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2),
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
    ),
}


def llava_next_processor(tokenizer, tile: int, grid_pinpoints, chat_template: str):
    """The real LLaVA-NeXT image processor (anyres grid of ``tile``-px CLIP tiles) with ``tokenizer``
    and ``chat_template``: what every random/demo backbone of this package preprocesses with."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=grid_pinpoints,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        num_additional_image_tokens=1,
    )


def tiny_processor():
    return llava_next_processor(mistral_tokenizer(IMAGE_TOKEN), 336, GRID_PINPOINTS, CHAT_TEMPLATE)


def random_config(size: str, vocab_size: int, image_token_id: int):
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    spec = SIZES[size]
    text = MistralConfig(
        vocab_size=vocab_size,
        max_position_embeddings=32768,
        sliding_window=None,
        tie_word_embeddings=False,
        head_dim=spec["text"]["hidden_size"] // spec["text"]["num_attention_heads"],
        **spec["text"],
    )
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=spec["vision"]["hidden_size"], **spec["vision"])
    return LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_grid_pinpoints=GRID_PINPOINTS,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


class LlavaNextBackbone(Backbone):
    """Any ``LlavaNextForConditionalGeneration`` with its ``LlavaNextProcessor``."""

    vision_class_token = True  # CLIP: every tile's early states start with the class token

    def __init__(self, model: nn.Module, processor: Any, name: str, source: str, device: torch.device, dtype: torch.dtype):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.source = source
        self.device = device
        self.dtype = dtype
        cfg = model.config
        self.image_token_id = cfg.image_token_index
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = cfg.text_config.eos_token_id if cfg.text_config.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        num_vision_layers = cfg.vision_config.num_hidden_layers
        # a quarter of the way into the vision tower: low-level features (documented default)
        self.vision_feature_default_layer = max(1, num_vision_layers // 4)
        self._lm = model.model.language_model

    # identity -------------------------------------------------------------------------------
    def identity(self) -> BackboneIdentity:
        return BackboneIdentity(
            source=self.source,
            config_hash=hf.config_hash(self.model.config),
            weights_hash=hf.weights_hash([self._lm.embed_tokens.weight, self.model.lm_head.weight, self.decoder_layers[-1].mlp.down_proj.weight]),
            tokenizer_hash=hf.vocabulary_hash(self.tokenizer),
            chat_template_hash=stable_hash(self.processor.chat_template),
        )

    # text -----------------------------------------------------------------------------------
    def render_chat(self, turns: Sequence[Turn], add_generation_prompt: bool = True) -> str:
        messages = []
        for turn in turns:
            content: list[dict[str, Any]] = [{"type": "image"} for _ in range(turn.images)]
            content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def tokenize(self, text: str, image_token_counts: Sequence[int] = ()) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        placeholders = sum(1 for t in ids if t == self.image_token_id)
        if placeholders != len(image_token_counts):
            raise SdrtError(f"the prompt has {placeholders} image placeholders but {len(image_token_counts)} images were given")
        expanded: list[int] = []
        counts = iter(image_token_counts)
        for t in ids:
            if t == self.image_token_id:
                expanded.extend([t] * next(counts))
            else:
                expanded.append(t)
        return expanded

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # images ---------------------------------------------------------------------------------
    @property
    def multimodal_projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def encode_images(self, images: Sequence[Image.Image], early_layer: int | None = None) -> EncodedImages:
        if not images:
            return EncodedImages(features=[])
        # no autograd, except through the projector while its weights train (MmDC's alignment stage);
        # the vision tower's weights are frozen, so autograd keeps no graph of it even then
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.multimodal_projector.parameters())
        with torch.set_grad_enabled(training):
            return self._encode_images(images, early_layer)

    def _encode_images(self, images: Sequence[Image.Image], early_layer: int | None) -> EncodedImages:
        processed = self.processor.image_processor([img.convert("RGB") for img in images], return_tensors="pt")
        pixel_values = processed["pixel_values"].to(self.device, self.dtype)
        image_sizes = processed["image_sizes"].to(self.device)
        outputs = self.model.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_sizes, output_hidden_states=early_layer is not None, return_dict=True
        )
        features = [f.to(self.dtype) for f in outputs.pooler_output]
        early = None
        if early_layer is not None:
            states = outputs.hidden_states[early_layer]  # [total tiles, patches(+cls), d]
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            cfg = self.model.config
            tiles = [
                image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for size in image_sizes.tolist()
            ]
            early = list(torch.split(states, tiles, dim=0))
        return EncodedImages(features=features, early=early)

    # language model -------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self._lm.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def vision_hidden_size(self) -> int:
        return self.model.config.vision_config.hidden_size

    def embed(self, input_ids: torch.Tensor, image_features: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        embeds = self._lm.embed_tokens(input_ids)
        if image_features is None:
            return embeds
        for row, feats in enumerate(image_features):
            mask = input_ids[row] == self.image_token_id
            if feats is None or feats.shape[0] == 0:
                if bool(mask.any()):
                    raise SdrtError(f"row {row} has image tokens but no image features")
                continue
            feats = feats.to(embeds.dtype)
            if int(mask.sum()) != feats.shape[0]:
                raise SdrtError(f"row {row} has {int(mask.sum())} image tokens but its images give {feats.shape[0]} features")
            embeds[row, mask] = feats
        return embeds

    def lm_forward(self, inputs_embeds, attention_mask, position_ids, past_key_values=None) -> LMOutput:
        return hf.lm_forward(self._lm, inputs_embeds, attention_mask, position_ids, past_key_values)

    def run_layers(self, hidden, attention_mask, position_ids, start, end, cache=None):
        return hf.run_decoder_layers(self._lm, hidden, attention_mask, position_ids, start, end, cache)

    def lm_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(last_hidden)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm.norm(hidden)

    def float32_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hf.float32_logits(self._lm.norm, self.model.lm_head, hidden)


def _finish(model, processor, name, source, device, dtype) -> LlavaNextBackbone:
    model = model.to(device=device, dtype=dtype)
    return LlavaNextBackbone(model, processor, name=name, source=source, device=device, dtype=dtype)


def build_random(size: str, seed: int = 0, device: str | None = "auto", dtype: str | None = "auto", model: str | None = None) -> LlavaNextBackbone:
    """A randomly initialised LLaVA-NeXT of a named size, identical for the same seed on every machine."""
    from transformers import LlavaNextForConditionalGeneration

    if model is not None:
        raise SdrtError(f"the llava-next-{size} backbone is drawn from --seed and takes no --model (got {model!r}); use --backbone llava-next for a checkpoint")

    processor = tiny_processor()
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    config = random_config(size, vocab_size=len(tok), image_token_id=image_token_id)
    config.text_config.eos_token_id = tok.eos_token_id
    config.text_config.bos_token_id = tok.bos_token_id
    config.text_config.pad_token_id = tok.pad_token_id
    dev = resolve_device(device)
    with hf.seeded(seed):
        model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return _finish(model, processor, f"llava-next-{size}", f"random:{size}:seed={seed}", dev, resolve_dtype(dtype, dev))


def load_pretrained(model: str | None = None, device: str | None = "auto", dtype: str | None = "auto", **_: Any) -> LlavaNextBackbone:
    """Load a LLaVA-NeXT checkpoint from a local directory or the local Hugging Face cache (never downloads)."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model_id = model or DEFAULT_MODEL
    local = Path(model_id).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise SdrtError(f"{local} has no config.json; pass a directory written by save_pretrained or a Hugging Face model id")
        source = str(local.resolve())
    else:
        if model_id.startswith((".", "/", "~")):
            raise SdrtError(f"model directory {model_id} does not exist")
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json")
        if not isinstance(cached, str):
            raise SdrtError(
                f"the weights of {model_id!r} are not on this machine and sdrt never downloads at run time: "
                f"run `huggingface-cli download {model_id}` once (or pass --model /path/to/a/local/copy)"
            )
        source = model_id
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
        # straight onto this rank's device: no full CPU copy per process (8 ranks x 15 GB of host RAM)
        net = LlavaNextForConditionalGeneration.from_pretrained(source, local_files_only=True, dtype=torch_dtype, device_map={"": dev})
    except (OSError, ValueError) as exc:
        raise SdrtError(f"cannot load LLaVA-NeXT from {source}: {exc}".splitlines()[0]) from None
    return _finish(net, processor, "llava-next", source, dev, torch_dtype)
