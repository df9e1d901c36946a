"""The single-step student prompt: one user turn ``[images, question + instruction]``.

Every stage that runs the student feeds this prompt: ``sdrt distill`` (the student's input, with y2
teacher-forced after it), the ``prompt``, ``lora`` and ``sdrt`` eval methods, the ensemble
predictor's features and the KL comparisons with a stored teacher (``sdrt_cli.teacher_forcing``).
Its last P tokens are the places the trace contract's prompt rows describe (``sdrt_cli.traces``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdrt_cli.backbone import Backbone, EncodedImages, Turn
from sdrt_cli.data import Dataset, Example
from sdrt_cli.generation import SlotBatch


def student_turns(dataset: Dataset, example: Example) -> list[Turn]:
    """The single-step prompt the student (and the ``prompt`` baseline) sees."""
    return [Turn("user", dataset.format_question(example), images=len(example.images))]


def student_prompt(backbone: Backbone, dataset: Dataset, example: Example, token_counts: Sequence[int]) -> list[int]:
    """The token ids of an example's single-step prompt (``token_counts``: its images' token counts)."""
    return backbone.tokenize(backbone.render_chat(student_turns(dataset, example)), token_counts)


def student_prompt_ids(backbone: Backbone, dataset, examples, encoded: Sequence[EncodedImages]) -> tuple[list[str], list[list[int]]]:
    """The single-step user texts and their token ids (the prompt `prompt`, `lora` and `sdrt` see)."""
    texts, ids = [], []
    for ex, enc in zip(examples, encoded):
        texts.append(student_turns(dataset, ex)[-1].text)
        ids.append(student_prompt(backbone, dataset, ex, enc.token_counts))
    return texts, ids


def encode_student_prompts(
    backbone: Backbone, dataset, examples, early_layer: int | None = None
) -> tuple[list[EncodedImages], list[str], list[list[int]]]:
    """Each example's images encoded once, and its single-step user text and token ids."""
    encoded = [backbone.encode_images(ex.images, early_layer=early_layer) for ex in examples]
    texts, ids = student_prompt_ids(backbone, dataset, examples, encoded)
    return encoded, texts, ids


def segment_prompt_mask(segments: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, width] with 1 on each segment's tokens, laid out as ``SlotBatch.append`` lays them out
    (left-padded to the longest segment)."""
    width = max(1, max(len(s) for s in segments))
    mask = torch.zeros(len(segments), width, dtype=torch.long)
    for row, seg in enumerate(segments):
        if seg:
            mask[row, width - len(seg) :] = 1
    return mask


def prefill_single_step(backbone: Backbone, dataset: Dataset, examples: Sequence[Example], steer=None, vision=None):
    """Feed each example's single-step prompt (images + question) once, the ensemble armed for this
    forward only; returns ``(texts, batch, out)``: the user texts, the ``SlotBatch`` holding the
    prompt's KV cache (answers continue on it), and the forward's output (``out.last_hidden[:, -1]``
    predicts the first answer token).

    ``steer`` is an ``EnsembleHandle``; ``vision`` (``VisionInput``) pools early vision features for
    skip connections.  Adapters reach later tokens only through this cache, as at inference.
    """
    early = vision.layer if vision is not None else None
    encoded, texts, ids = encode_student_prompts(backbone, dataset, examples, early)
    batch = SlotBatch(backbone, len(examples))
    for row, enc in enumerate(encoded):
        batch.set_images(row, enc)
    if steer is not None:
        u = vision.pooled(encoded).to(backbone.device) if vision is not None else None
        steer.arm(segment_prompt_mask(ids), u)
    try:
        out = batch.append(ids)
    finally:
        if steer is not None:
            steer.disarm()
    return texts, batch, out


@torch.no_grad()
def prompt_features(backbone: Backbone, dataset, examples, layer: int) -> torch.Tensor:
    """Input of decoder layer ``layer`` at the last student-prompt token, [B, H] float32 on CPU: what
    the ensemble's pre-hook sees during generation, up to float summation order.  Only the layers
    below ``layer`` run, without a KV cache; rows are right-padded, so no position sees only padding."""
    encoded, _, ids = encode_student_prompts(backbone, dataset, examples)
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
