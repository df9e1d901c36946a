"""The naive two-step loop, as a user would write it with transformers.

A fresh ``processor(...)`` + ``model.generate`` per prompt per step, then one teacher-forced forward
to read the stored states.  It is the ground truth the trace engine is tested against and the
baseline ``bench/traces.py`` measures; it is not used by any command.  It shares none of the
engine's helpers (turn building, EOS stripping, top-k and confidence are written out here), so a
bug in those cannot hide in both.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdrt_cli.backbone import Turn
from sdrt_cli.data import Dataset, Example
from sdrt_cli.generation import capture_layer_outputs
from sdrt_cli.packs import Prompt
from sdrt_cli.traces import TraceRecord, TraceSettings


class ForwardCounter:
    """Counts real (non-padding) tokens the language model processes."""

    def __init__(self, backbone):
        self.tokens = 0
        self._handle = backbone.decoder_layers[0].register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.tokens += hidden.shape[0] * hidden.shape[1]

    def close(self):
        self._handle.remove()


@torch.no_grad()
def naive_trace(backbone, dataset: Dataset, index: int, example: Example, prompts: Sequence[Prompt], settings: TraceSettings) -> list[TraceRecord]:
    model, processor = backbone.model, backbone.processor
    layers = settings.resolved_layers(len(backbone.decoder_layers))
    eos = backbone.eos_token_ids
    images = [img.convert("RGB") for img in example.images] or None

    def generate(turns, max_new):
        text = backbone.render_chat(turns)
        inputs = processor(text=text, images=images, return_tensors="pt").to(backbone.device)
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=backbone.pad_token_id, eos_token_id=list(eos))
        return inputs, out[0, inputs["input_ids"].shape[1] :].tolist()

    def text_of(ids):
        return backbone.decode(ids[:-1] if ids and ids[-1] in eos else ids)

    question, instruction = dataset.question_text(example), dataset.instruction_for(example)
    records = []
    for prompt in prompts:
        first = Turn("user", prompt.render_step1(question=question, instruction=instruction), images=len(example.images))
        _, y1_ids = generate([first], settings.max_new_tokens_step1)
        y1 = text_of(y1_ids)
        turns = [first, Turn("assistant", y1), Turn("user", prompt.render_step2(question=question, instruction=instruction, step1_answer=y1))]
        inputs, y2_ids = generate(turns, settings.max_new_tokens_step2)
        prompt_len = inputs["input_ids"].shape[1]
        # teacher-forced pass over the step-2 prompt and all but the last y2 token
        forced = torch.cat([inputs["input_ids"], torch.tensor([y2_ids[:-1]], dtype=torch.long, device=backbone.device)], dim=1)
        captured: dict[int, torch.Tensor] = {}
        with capture_layer_outputs(backbone.decoder_layers, captured, layers):
            logits = model(
                input_ids=forced,
                pixel_values=inputs.get("pixel_values"),
                image_sizes=inputs.get("image_sizes"),
                attention_mask=torch.ones_like(forced),
            ).logits[0]
        p = min(settings.pos, prompt_len)
        start = prompt_len - p
        hidden = torch.stack([captured[layer][0, start:] for layer in layers], dim=1)
        probs = torch.softmax(logits[start:].double(), dim=-1)
        top_p, top_ids = probs.topk(settings.top_k, dim=-1)
        records.append(
            TraceRecord(
                example_id=example.id,
                example_index=index,
                prompt_id=prompt.id,
                step1_text=turns[0].text,
                step2_text=turns[-1].text,
                y1=y1,
                y1_ids=y1_ids,
                y2=text_of(y2_ids),
                y2_ids=y2_ids,
                prompt_rows=p,
                # the mean top-token probability over the rows that predict y2's tokens
                confidence=float(probs[-len(y2_ids) :].max(dim=-1).values.mean()),
                hidden=hidden.cpu(),
                topk_ids=top_ids.to(torch.int32).cpu(),
                topk_logprobs=top_p.log().float().cpu(),
                tail_mass=(1.0 - top_p.sum(dim=-1)).float().cpu(),
                prompt_tail_ids=inputs["input_ids"][0, start:].tolist(),
            )
        )
    return records
