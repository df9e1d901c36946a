"""Two-step reasoning traces: the teacher signal that ``sdrt distill`` learns from.

The trace contract -- what is stored per (example, prompt), which positions the aligned rows are, and
how the single-step student lines up with them -- is written once, in docs/trace-contract.md.

Gold answers (only on a split that has them, and only the traced split's): each record also keeps
``teacher_answer`` (the dataset metric's ``parse`` of y2) and ``teacher_score`` (its ``score``, in
[0, 1]); both are None when the example has no gold.  With ``student_baseline`` the engine also
answers each example ONCE with the untouched model on the single-step student prompt, greedy, with
the step-2 budget (what ``sdrt eval --method prompt`` answers): a :class:`StudentAnswer` shared by
the example's records and stored once per example.

Efficiency: images are encoded once per example; the longest common token prefix of the example's
step-1 prompts (usually image + question) is run once and its KV cache shared by all N prompts;
step 2 reuses each row's cache up to its longest common token prefix with the step-2 prompt (minus
the last P tokens, which are re-run so their states can be stored).  Rows of all examples in a
batch decode together.  The student baseline copies a row after step 1, keeps its longest common
token prefix with the student prompt (the images and usually the question), feeds the rest with
the step-2 prompts and decodes with the step-2 rows: a few prompt tokens and one short answer per
example beside the N two-step conversations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from sdrt_cli import defaults
from sdrt_cli.backbone import Backbone, EncodedImages, Turn
from sdrt_cli.data import Dataset, Example
from sdrt_cli.errors import SdrtError
from sdrt_cli.generation import Sampling, SlotBatch, common_prefix_length, decode, row_generator
from sdrt_cli.packs import Prompt
from sdrt_cli.prompting import student_turns  # its home; still importable from here

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TraceSettings:
    """What is traced and stored; every field is recorded in the store's manifest."""

    pos: int = defaults.POS
    layers: tuple[int, ...] = (-3, -2, -1)
    top_k: int = 20
    dtype: str = "bf16"
    max_new_tokens_step1: int = defaults.MAX_NEW_TOKENS_STEP1
    max_new_tokens_step2: int = 32
    sampling: Sampling = field(default_factory=Sampling)

    def resolved_layers(self, num_layers: int) -> list[int]:
        resolved = []
        for layer in self.layers:
            absolute = layer + num_layers if layer < 0 else layer
            if not 0 <= absolute < num_layers:
                raise SdrtError(f"layer {layer} does not exist: the backbone has {num_layers} decoder layers")
            resolved.append(absolute)
        if len(set(resolved)) != len(resolved):
            raise SdrtError(f"layers {list(self.layers)} name the same decoder layer twice")
        return resolved

    def as_dict(self, num_layers: int | None = None) -> dict[str, Any]:
        return {
            "pos": self.pos,
            "layers": list(self.layers) if num_layers is None else self.resolved_layers(num_layers),
            "top_k": self.top_k,
            "dtype": self.dtype,
            "max_new_tokens_step1": self.max_new_tokens_step1,
            "max_new_tokens_step2": self.max_new_tokens_step2,
            "sampling": self.sampling.as_dict(),
        }


@dataclass
class StudentAnswer:
    """The untouched model's plain single-step greedy answer to one example (the ``prompt`` method's
    answer); ``answer``/``score`` are the dataset metric's parse and score, None without gold."""

    example_id: str
    example_index: int
    output: str
    output_ids: list[int]
    answer: str | None = None
    score: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TraceRecord:
    example_id: str
    example_index: int
    prompt_id: str
    step1_text: str
    step2_text: str
    y1: str
    y1_ids: list[int]
    y2: str
    y2_ids: list[int]
    prompt_rows: int
    confidence: float
    hidden: torch.Tensor  # [R, L, H]
    topk_ids: torch.Tensor  # [R, k] int32
    topk_logprobs: torch.Tensor  # [R, k] float32
    tail_mass: torch.Tensor  # [R] float32
    prompt_tail_ids: list[int] | None = None  # the step-2 prompt's last P token ids; None in stores made before it existed
    # the metric's parse and score of y2; None without gold (or in stores made before they existed)
    teacher_answer: str | None = None
    teacher_score: float | None = None
    # the example's plain single-step answer (one object per example, stored once per example)
    student: StudentAnswer | None = None

    def text_fields(self) -> dict[str, Any]:
        return {
            "example_id": self.example_id,
            "example_index": self.example_index,
            "prompt_id": self.prompt_id,
            "step1_text": self.step1_text,
            "step2_text": self.step2_text,
            "y1": self.y1,
            "y1_ids": self.y1_ids,
            "y2": self.y2,
            "y2_ids": self.y2_ids,
            "prompt_rows": self.prompt_rows,
            "confidence": self.confidence,
            "prompt_tail_ids": self.prompt_tail_ids,
            "teacher_answer": self.teacher_answer,
            "teacher_score": self.teacher_score,
        }


def summarize_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs, their ids, the tail mass and the top-token probability of [..., V] logits."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    tail = (1.0 - top_lp.exp().sum(-1)).clamp_min(0.0)
    return top_ids.to(torch.int32), top_lp, tail, top_lp[..., 0].exp()


def strip_eos(ids: Sequence[int], eos: Sequence[int]) -> list[int]:
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] in eos else ids


def step1_turns(dataset: Dataset, example: Example, prompt: Prompt) -> list[Turn]:
    text = prompt.render_step1(question=dataset.question_text(example), instruction=dataset.instruction_for(example))
    return [Turn("user", text, images=len(example.images))]


def step2_turns(dataset: Dataset, example: Example, prompt: Prompt, y1: str) -> list[Turn]:
    text = prompt.render_step2(question=dataset.question_text(example), instruction=dataset.instruction_for(example), step1_answer=y1)
    return step1_turns(dataset, example, prompt) + [Turn("assistant", y1), Turn("user", text)]


def scored(metric, text: str, example: Example) -> tuple[str | None, float | None]:
    """``(parse, score)`` of ``text`` under ``metric`` (a :class:`sdrt_cli.metrics.Metric`); None, None
    when there is no metric or the example has no gold answer."""
    if metric is None or not any(a is not None for a in example.answers):
        return None, None
    return metric.parse(text, example), float(metric.score(text, example))


class TraceEngine:
    """Runs the two-step method for batches of examples and returns :class:`TraceRecord` s.

    ``metric`` (None: nothing scored) scores every y2 against the example's gold answers;
    ``student_baseline`` adds each example's plain single-step answer (see the module docstring)."""

    def __init__(
        self,
        backbone: Backbone,
        dataset: Dataset,
        prompts: Sequence[Prompt],
        settings: TraceSettings,
        metric=None,
        student_baseline: bool = False,
    ):
        if not prompts:
            raise SdrtError("no prompts selected: the pack selection is empty")
        if settings.pos < 1:
            raise SdrtError(f"pos must be at least 1, got {settings.pos}")
        self.backbone = backbone
        self.dataset = dataset
        self.prompts = list(prompts)
        self.settings = settings
        self.layers = settings.resolved_layers(len(backbone.decoder_layers))
        self.store_dtype = DTYPES[settings.dtype]
        self.metric = metric
        self.student_baseline = student_baseline
        self.fed_tokens = 0

    @torch.no_grad()
    def run(self, items: Sequence[tuple[int, Example]]) -> list[TraceRecord]:
        backbone, s = self.backbone, self.settings
        eos = backbone.eos_token_ids
        n_prompts = len(self.prompts)
        examples = [ex for _, ex in items]
        encoded: list[EncodedImages] = [backbone.encode_images(ex.images) for ex in examples]

        ids1 = [
            [backbone.tokenize(backbone.render_chat(step1_turns(self.dataset, ex, p)), enc.token_counts) for p in self.prompts]
            for ex, enc in zip(examples, encoded)
        ]
        # shared prefix of each example's step-1 prompts, leaving every prompt at least one token
        prefix = []
        for seqs in ids1:
            shared = min(len(q) for q in seqs) - 1
            for q in seqs[1:]:
                shared = min(shared, common_prefix_length(seqs[0], q))
            prefix.append(shared)

        batch = SlotBatch(backbone, len(examples))
        for b, enc in enumerate(encoded):
            batch.set_images(b, enc)
        batch.append([ids1[b][0][: prefix[b]] for b in range(len(examples))])
        batch.select_rows([b for b in range(len(examples)) for _ in range(n_prompts)])
        out = batch.append([ids1[b][n][prefix[b] :] for b in range(len(examples)) for n in range(n_prompts)])
        rows = list(range(batch.rows))
        keys = [(ex.id, p.id) for ex in examples for p in self.prompts]
        y1_ids = decode(
            batch, backbone.lm_logits(out.last_hidden[:, -1]), rows, s.max_new_tokens_step1, s.sampling,
            self._generators(keys, "step1"),
        )

        student_rows: list[int] = []
        if self.student_baseline:
            # one more row per example, a copy of its first prompt's row: the shared prefix is reused
            batch.select_rows(rows + [b * n_prompts for b in range(len(examples))])
            student_rows = list(range(len(rows), batch.rows))

        # step 2: continue each row's conversation
        y1_text, step2_texts, segments, prompt_rows, prompt_tails = [], [], [], [], []
        for r in rows:
            ex, prompt = examples[r // n_prompts], self.prompts[r % n_prompts]
            text = backbone.decode(strip_eos(y1_ids[r], eos))
            turns = step2_turns(self.dataset, ex, prompt, text)
            ids2 = backbone.tokenize(backbone.render_chat(turns), encoded[r // n_prompts].token_counts)
            p = min(s.pos, len(ids2))
            keep = min(common_prefix_length(batch.tokens[r], ids2), len(ids2) - p)
            batch.truncate(r, keep)
            y1_text.append(text)
            step2_texts.append(turns[-1].text)
            segments.append(ids2[keep:])
            prompt_rows.append(p)
            prompt_tails.append(ids2[len(ids2) - p :])
        for b, r in enumerate(student_rows):
            ids = backbone.tokenize(backbone.render_chat(student_turns(self.dataset, examples[b])), encoded[b].token_counts)
            keep = min(common_prefix_length(batch.tokens[r], ids), len(ids) - 1)  # feed at least one token
            batch.truncate(r, keep)
            segments.append(ids[keep:])
        out = batch.append(segments, capture=self.layers)
        width = max(prompt_rows)
        hidden_prompt = torch.stack([out.layers[layer][:, -width:] for layer in self.layers], dim=2)  # [R, width, L, H]
        prompt_logits = backbone.lm_logits(out.last_hidden[:, -width:])
        summary_prompt = summarize_logits(prompt_logits, s.top_k)

        step_rows: dict[int, list[tuple[torch.Tensor, tuple]]] = {r: [] for r in rows}

        def on_step(_step, fed, step_out, logits):
            hidden = torch.stack([step_out.layers[layer][:, -1] for layer in self.layers], dim=1)  # [R, L, H]
            summary = summarize_logits(logits, s.top_k)
            for r in fed:
                if r in step_rows:  # not a student-baseline row
                    step_rows[r].append((hidden[r], tuple(t[r] for t in summary)))

        # the baseline rows decode greedily (no generator) whatever the teacher's sampling
        y2_ids = decode(
            batch, prompt_logits[:, -1], rows + student_rows, s.max_new_tokens_step2, s.sampling,
            self._generators(keys, "step2") + [None] * len(student_rows), capture=self.layers, on_step=on_step,
        )
        self.fed_tokens += batch.fed_tokens
        students: list[StudentAnswer | None] = [None] * len(examples)
        for b, r in enumerate(student_rows):
            text = backbone.decode(strip_eos(y2_ids[r], eos))
            answer, score = scored(self.metric, text, examples[b])
            students[b] = StudentAnswer(examples[b].id, items[b][0], text, y2_ids[r], answer, score)

        records = []
        for r in rows:
            b, n = divmod(r, n_prompts)
            p = prompt_rows[r]
            hid = [hidden_prompt[r, width - p :]] + [h[None] for h, _ in step_rows[r]]
            parts = [tuple(t[r, width - p :] for t in summary_prompt)] + [tuple(t[None] for t in sm) for _, sm in step_rows[r]]
            top_ids, top_lp, tail, top1 = (torch.cat([part[i] for part in parts]) for i in range(4))
            answer_rows = len(y2_ids[r])
            y2_text = backbone.decode(strip_eos(y2_ids[r], eos))
            teacher_answer, teacher_score = scored(self.metric, y2_text, examples[b])
            records.append(
                TraceRecord(
                    example_id=examples[b].id,
                    example_index=items[b][0],
                    prompt_id=self.prompts[n].id,
                    step1_text=step1_turns(self.dataset, examples[b], self.prompts[n])[0].text,
                    step2_text=step2_texts[r],
                    y1=y1_text[r],
                    y1_ids=y1_ids[r],
                    y2=y2_text,
                    y2_ids=y2_ids[r],
                    prompt_rows=p,
                    confidence=float(top1[-answer_rows:].mean()),
                    hidden=torch.cat(hid).to(self.store_dtype).cpu(),
                    topk_ids=top_ids.cpu(),
                    topk_logprobs=top_lp.cpu(),
                    tail_mass=tail.cpu(),
                    prompt_tail_ids=prompt_tails[r],
                    teacher_answer=teacher_answer,
                    teacher_score=teacher_score,
                    student=students[b],
                )
            )
        return records

    def _generators(self, keys, step):
        if self.settings.sampling.temperature <= 0:
            return [None] * len(keys)
        return [row_generator(self.settings.sampling.seed, *key, step) for key in keys]

