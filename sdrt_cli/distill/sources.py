"""What the student is fed and what it is compared with: traces from a store, or gold answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from sdrt_cli.backbone import Backbone, Turn
from sdrt_cli.data import Dataset, Example, ExamplesByIndex
from sdrt_cli.errors import SdrtError
from sdrt_cli.formats import check_example_id
from sdrt_cli.prompting import student_prompt, student_turns
from sdrt_cli.teacher_forcing import check_prompt_alignment

GOLD = "gold"
DISTILL_SAME_DATA = "distill with the dataset the store was made from"


def check_store_examples(store, dataset: Dataset, examples: ExamplesByIndex, wanted: set[int], prompt_ids: Sequence[str]) -> None:
    """Refuse a dataset that lacks a wanted store example, holds another example at its index, or a
    store without a record for one of ``prompt_ids``, before anything is trained."""
    missing = sorted(wanted - set(examples))
    if missing:
        raise SdrtError(f"trace store {store.root} has example {missing[0]} but dataset {dataset.name!r} has only {len(examples)} examples")
    for index in sorted(examples):
        for prompt_id in prompt_ids:
            try:
                traced = store.meta(index, prompt_id)["example_id"]
            except KeyError:
                raise SdrtError(f"trace store {store.root} has no record for example {index} and prompt {prompt_id!r}") from None
            check_example_id(index, dataset.name, examples.id_of(index), traced, f"trace store {store.root}", DISTILL_SAME_DATA)


@dataclass
class ExampleInputs:
    """Everything about one example that is cheap to keep for the whole run."""

    index: int
    example_id: str
    prompt_ids: list[int]  # S
    tails: dict[str, list[int]]  # unit -> tokens fed after S
    rows: dict[str, int]  # unit -> R, the aligned rows = the last R fed positions
    labels: dict[str, list[int]] = field(default_factory=dict)  # gold: the R answer ids
    vision: torch.Tensor | None = None  # pooled early vision features (float32) for the skip

    def length(self, unit: str) -> int:
        return len(self.prompt_ids) + len(self.tails[unit])


class TraceSource:
    """Teacher targets from a trace store; one unit (adapter) per prompt."""

    mode = "traces"

    def __init__(self, store, dataset: Dataset, prompt_ids: Sequence[str], examples: ExamplesByIndex, kept: dict[str, Sequence[int]] | None = None):
        self.store = store
        self.dataset = dataset
        self.units = list(prompt_ids)
        self.examples = examples
        self.layer_count = len(store.fingerprint["settings"]["layers"])
        # per prompt, the examples whose record trains its adapter (None: every one, the paper)
        self.kept = None if kept is None else {unit: frozenset(kept[unit]) for unit in self.units}

    def trains(self, unit: str, index: int) -> bool:
        return self.kept is None or index in self.kept[unit]

    def prepare(self, backbone: Backbone, index: int, example: Example, token_counts: Sequence[int]) -> ExampleInputs:
        prompt = student_prompt(backbone, self.dataset, example, token_counts)
        tails, rows = {}, {}
        for unit in self.units:
            meta = self.store.meta(index, unit)
            check_example_id(index, self.dataset.name, example.id, meta["example_id"], f"trace store {self.store.root}", DISTILL_SAME_DATA)
            y2, p = list(meta["y2_ids"]), int(meta["prompt_rows"])
            check_prompt_alignment(backbone, prompt, meta.get("prompt_tail_ids"), unit, example.id)
            tails[unit] = y2[:-1]
            rows[unit] = p + len(y2) - 1
            if rows[unit] != meta["row_count"]:
                raise SdrtError(f"trace store {self.store.root}: record ({index}, {unit!r}) has {meta['row_count']} rows, the contract gives {rows[unit]}")
        return ExampleInputs(index, example.id, prompt, tails, rows)

    def targets(self, index: int, unit: str, device: torch.device) -> dict[str, torch.Tensor]:
        record = self.store.record(index, unit)
        return {
            "teacher_hidden": record.hidden.to(device),
            "topk_ids": record.topk_ids.to(device, torch.long),
            "topk_logprobs": record.topk_logprobs.to(device, torch.float32),
            "tail_mass": record.tail_mass.to(device, torch.float32),
        }


class GoldSource:
    """Gold answers of a dataset split (the LoRA "Fine-tuning" baseline); one unit, ``gold``."""

    mode = "gold"

    def __init__(self, dataset: Dataset, examples: ExamplesByIndex):
        self.dataset = dataset
        self.units = [GOLD]
        self.examples = examples
        self.layer_count = 0
        self.kept = None

    def trains(self, unit: str, index: int) -> bool:
        return True

    def prepare(self, backbone: Backbone, index: int, example: Example, token_counts: Sequence[int]) -> ExampleInputs:
        if not example.answers:
            raise SdrtError(f"example {example.id!r} of dataset {self.dataset.name!r} has no gold answer; --loss ce needs a split with answers")
        turns = student_turns(self.dataset, example)
        prompt_text = backbone.render_chat(turns)
        prompt = backbone.tokenize(prompt_text, token_counts)
        answer = gold_answer_ids(backbone, turns, prompt_text, prompt, example.answers[0].strip(), token_counts, example.id)
        return ExampleInputs(index, example.id, prompt, {GOLD: answer[:-1]}, {GOLD: len(answer)}, labels={GOLD: answer})

    def targets(self, index: int, unit: str, device: torch.device) -> dict[str, torch.Tensor]:
        return {}


def gold_answer_ids(backbone: Backbone, turns: Sequence[Turn], prompt_text: str, prompt: list[int], answer: str, token_counts: Sequence[int], example_id: str) -> list[int]:
    """The answer's token ids as the chat template writes an assistant turn, up to the end of the
    answer text, then the tokenizer's EOS id: the fine-tuned model learns to stop after the answer.

    Whatever the template writes after the answer is replaced by EOS, because templates differ there:
    the project's own ends the turn with ``</s>`` (the EOS token), while llava-hf/llava-v1.6-mistral-7b-hf's
    chat_template.json writes the literal text ``<\\s> `` — trained on that, the model would emit it and
    never stop."""
    full_text = backbone.render_chat(list(turns) + [Turn("assistant", answer)], add_generation_prompt=False)
    start = full_text.find(answer, len(prompt_text)) if full_text.startswith(prompt_text) else -1
    if not answer or start < 0:
        raise SdrtError(f"example {example_id!r}: the chat template's assistant turn does not write the gold answer {answer!r} after the question prompt")
    ids = backbone.tokenize(full_text[: start + len(answer)], token_counts)
    if ids[: len(prompt)] != prompt or len(ids) <= len(prompt):
        raise SdrtError(f"example {example_id!r}: the chat template's answer turn does not extend the question prompt token for token")
    if not backbone.eos_token_ids or backbone.eos_token_ids[0] is None:
        raise SdrtError(f"backbone {backbone.name!r} has no EOS token id, so gold answers cannot teach the model to stop")
    answer_ids = ids[len(prompt) :] + [int(backbone.eos_token_ids[0])]
    if answer_ids[-1] not in backbone.eos_token_ids or any(t in backbone.eos_token_ids for t in answer_ids[:-1]):
        raise SdrtError(f"example {example_id!r}: the gold answer's token ids must end with the tokenizer's EOS id, and only there; got {answer_ids}")
    return answer_ids

