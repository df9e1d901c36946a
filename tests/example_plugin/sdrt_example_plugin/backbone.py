"""A LLaVA-1.5 style backbone: ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama), tiny and
randomly initialised from a seed, with the real Mistral tokenizer (``sdrt_cli.hf.mistral_tokenizer``).

LLaVA-1.5 differs from the built-in LLaVA-NeXT backbones where the contract can notice: each image
is one fixed-size tile (no anyres grid), so it always expands to the same number of image tokens; the
language model is a Llama; the chat format is Vicuna's ("USER: ... ASSISTANT: ...</s>").
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

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

IMAGE_TOKEN = "<image>"
TILE = 56  # pixels: 4 x 4 patches of 14 px
PATCH = 14
SYSTEM = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions."
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)


def image_processor():
    """CLIP preprocessing at the tile size: resize the short side, centre-crop a square."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})


def tiny_config(vocab_size: int, image_token_id: int, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **TEXT,
    )
    vision = CLIPVisionConfig(image_size=TILE, patch_size=PATCH, projection_dim=VISION["hidden_size"], **VISION)
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=(TILE // PATCH) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


class Llava15Backbone(Backbone):
    """Any ``LlavaForConditionalGeneration`` with a Vicuna chat format and a CLIP image processor."""

    vision_class_token = True  # CLIP: every image's early states start with the class token

    def __init__(self, model, tokenizer, processor, source: str, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = processor
        self.source = source
        self.name = "example-llava15-tiny"
        self.device, self.dtype = device, dtype
        config = model.config
        self.image_token_id = config.image_token_index
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = (tokenizer.eos_token_id,)
        self.vision_feature_default_layer = 1
        self.language_model = model.model.language_model
        self.tokens_per_image = config.image_seq_length

    def identity(self) -> BackboneIdentity:
        return BackboneIdentity(
            source=self.source,
            config_hash=hf.config_hash(self.model.config),
            weights_hash=hf.weights_hash([self.language_model.embed_tokens.weight, self.model.lm_head.weight, self.model.model.multi_modal_projector.linear_2.weight]),
            tokenizer_hash=hf.vocabulary_hash(self.tokenizer),
            chat_template_hash=stable_hash(["vicuna_v1", SYSTEM]),
        )

    # -- text ------------------------------------------------------------------------------------
    def render_chat(self, turns: Sequence[Turn], add_generation_prompt: bool = True) -> str:
        text = SYSTEM
        for turn in turns:
            if turn.role == "user":
                text += " USER: " + f"{IMAGE_TOKEN}\n" * turn.images + turn.text
            elif turn.role == "assistant":
                text += " ASSISTANT: " + turn.text + "</s>"
            else:
                raise SdrtError(f"the example-llava15-tiny chat has user and assistant turns, not {turn.role!r}")
        if add_generation_prompt:
            text += " ASSISTANT:"
        return text

    def tokenize(self, text: str, image_token_counts: Sequence[int] = ()) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        placeholders = ids.count(self.image_token_id)
        if placeholders != len(image_token_counts):
            raise SdrtError(f"the prompt has {placeholders} image placeholders but {len(image_token_counts)} images were given")
        expanded: list[int] = []
        counts = iter(image_token_counts)
        for token in ids:
            expanded.extend([token] * next(counts) if token == self.image_token_id else [token])
        return expanded

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # -- images ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], early_layer: int | None = None) -> EncodedImages:
        if not images:
            return EncodedImages(features=[])
        pixels = self.image_processor([image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        config = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixels.to(self.device, self.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            output_hidden_states=True,
        )
        features = [f.to(self.dtype) for f in out.pooler_output]
        # one tile per image: (1, class token + patches, d)
        early = None if early_layer is None else [states[None] for states in out.hidden_states[early_layer]]
        return EncodedImages(features=features, early=early)

    # -- language model --------------------------------------------------------------------------
    @property
    def decoder_layers(self):
        return list(self.language_model.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def vision_hidden_size(self) -> int:
        return self.model.config.vision_config.hidden_size

    def embed(self, input_ids: torch.Tensor, image_features=None) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        embeds = self.language_model.embed_tokens(input_ids)
        for row, features in enumerate(image_features or []):
            slots = input_ids[row] == self.image_token_id
            count = 0 if features is None else features.shape[0]
            if int(slots.sum()) != count:
                raise SdrtError(f"row {row} has {int(slots.sum())} image tokens but its images give {count} features")
            if count:
                embeds[row, slots] = features.to(embeds.dtype)
        return embeds

    def lm_forward(self, inputs_embeds, attention_mask, position_ids, past_key_values=None) -> LMOutput:
        return hf.lm_forward(self.language_model, inputs_embeds, attention_mask, position_ids, past_key_values)

    def run_layers(self, hidden, attention_mask, position_ids, start, end, cache=None):
        return hf.run_decoder_layers(self.language_model, hidden, attention_mask, position_ids, start, end, cache)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.norm(hidden)

    def lm_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(last_hidden)

    def float32_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hf.float32_logits(self.language_model.norm, self.model.lm_head, hidden)


def build_tiny(seed: int = 0, device: str | None = "auto", dtype: str | None = "auto", model: str | None = None) -> Llava15Backbone:
    """The factory sdrt calls with ``device``, ``dtype``, ``seed`` and (if the user gave one) ``model``."""
    from transformers import LlavaForConditionalGeneration

    if model is not None:
        raise SdrtError(f"example-llava15-tiny is drawn from --seed and takes no --model (got {model!r})")
    tokenizer = hf.mistral_tokenizer(IMAGE_TOKEN)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = tiny_config(len(tokenizer), image_token_id, tokenizer)
    with hf.seeded(seed):
        net = LlavaForConditionalGeneration(config)
    dev = resolve_device(device)
    return Llava15Backbone(net, tokenizer, image_processor(), f"random:llava15-tiny:seed={seed}", dev, resolve_dtype(dtype, dev))
