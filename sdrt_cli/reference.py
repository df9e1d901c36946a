"""The naive two-step loop, as a user would write it with transformers.

A fresh ``processor(...)`` + ``model.generate`` per prompt per step, then one teacher-forced forward
to read the stored states.  It is the ground truth the trace engine is tested against and the
baseline ``bench/traces.py`` measures; it is not used by any command.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdrt_cli.data import Dataset, Example
from sdrt_cli.generation import capture_layer_outputs
from sdrt_cli.packs import Prompt
from sdrt_cli.traces import TraceRecord, TraceSettings, step1_turns, step2_turns, strip_eos, summarize_logits


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
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=backbone.pad_token_id)
        return inputs, out[0, inputs["input_ids"].shape[1] :].tolist()

    records = []
    for prompt in prompts:
        _, y1_ids = generate(step1_turns(dataset, example, prompt), settings.max_new_tokens_step1)
        y1 = backbone.decode(strip_eos(y1_ids, eos))
        turns = step2_turns(dataset, example, prompt, y1)
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
        hidden = torch.stack([captured[l][0, start:] for l in layers], dim=1)
        top_ids, top_lp, tail, top1 = summarize_logits(logits[start:], settings.top_k)
        records.append(
            TraceRecord(
                example_id=example.id,
                example_index=index,
                prompt_id=prompt.id,
                step1_text=turns[0].text,
                step2_text=turns[-1].text,
                y1=y1,
                y1_ids=y1_ids,
                y2=backbone.decode(strip_eos(y2_ids, eos)),
                y2_ids=y2_ids,
                prompt_rows=p,
                confidence=float(top1[-len(y2_ids) :].mean()),
                hidden=hidden.cpu(),
                topk_ids=top_ids.cpu(),
                topk_logprobs=top_lp.cpu(),
                tail_mass=tail.cpu(),
            )
        )
    return records
