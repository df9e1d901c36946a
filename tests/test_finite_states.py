"""Left-padded rows stay finite, and a non-finite trace never reaches the store.

Some GPU attention kernels return NaN for a query row whose keys are all masked (a left-padded slot of
a batch's first segment); the NaN then reaches the real rows through the padded slots' K/V (0 x NaN in
P @ V).  CPU kernels return zeros for such rows, so the GPU kernel's behaviour is reproduced here by an
attention function that runs sdpa and then writes NaN into every query row with no visible key."""

from __future__ import annotations

import json

import pytest
import torch

from sdrt_cli import hf
from sdrt_cli.backbone import Turn, load_backbone
from sdrt_cli.errors import SdrtError
from sdrt_cli.generation import SlotBatch
from sdrt_cli.trace_store import TraceWriter
from sdrt_cli.traces import TraceRecord

NAN_KERNEL = "sdpa-nan-on-empty-rows"


def nan_on_empty_rows(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None:
        empty = ~attention_mask.any(dim=-1)  # [B, 1, Q]
        out = out.masked_fill(empty[:, 0, :, None, None], float("nan"))  # out is [B, Q, heads, D]
    return out, weights


@pytest.fixture(scope="module")
def tiny():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAN_KERNEL, nan_on_empty_rows)
    AttentionMaskInterface.register(NAN_KERNEL, sdpa_mask)
    backbone = load_backbone("llava-next-tiny", seed=0, device="cpu")
    assert backbone._lm.config._attn_implementation == "sdpa"
    return backbone


def prompts(backbone):
    short = backbone.tokenize(backbone.render_chat([Turn("user", "Hi?")]))
    long = backbone.tokenize(backbone.render_chat([Turn("user", "Which of the three bars in this chart is the tallest one?")]))
    assert len(long) > len(short) + 3
    return short, long


def test_left_padding_gives_empty_rows_and_every_padded_query_now_sees_its_own_slot(tiny):
    from transformers.masking_utils import create_causal_mask

    short, long = prompts(tiny)
    width = len(long)
    padding = torch.ones(2, width, dtype=torch.long)
    padding[0, : width - len(short)] = 0
    hidden = torch.zeros(2, width, tiny.hidden_size)
    positions = torch.arange(width)[None].expand(2, -1)
    plain = create_causal_mask(config=tiny._lm.config, inputs_embeds=hidden, attention_mask=padding, cache=None, position_ids=positions)
    assert plain.dtype == torch.bool and not plain.any(dim=-1).all()  # transformers leaves padded rows empty
    mask = hf.causal_mask(tiny._lm, hidden, padding, positions, None)
    assert mask.any(dim=-1).all()
    real = padding.bool()[:, None, :, None]  # a real query's row is unchanged
    assert torch.equal(mask & real, plain & real)


def test_a_nan_kernel_on_empty_rows_leaves_every_state_of_a_left_padded_batch_finite(tiny):
    short, long = prompts(tiny)
    config = tiny._lm.config
    config._attn_implementation = NAN_KERNEL
    try:
        with torch.no_grad():
            batch = SlotBatch(tiny, rows=2)
            together = batch.append([short, long], capture=[0]).last_hidden
            alone = SlotBatch(tiny, rows=1).append([short]).last_hidden
            # decode one token per row on top: the padded slots stay in the cache
            step = batch.append([[5], [6]]).last_hidden
    finally:
        config._attn_implementation = "sdpa"
    assert torch.isfinite(together).all() and torch.isfinite(step).all()
    torch.testing.assert_close(together[0, -len(short):], alone[0], rtol=1e-5, atol=1e-5)


def record(hidden: torch.Tensor) -> TraceRecord:
    rows = hidden.shape[0]
    return TraceRecord(
        example_id="chart-7", example_index=7, prompt_id="plan-then-solve", step1_text="s1", step2_text="s2",
        y1="a", y1_ids=[1], y2="b", y2_ids=[2], prompt_rows=rows, confidence=0.5, hidden=hidden,
        topk_ids=torch.zeros(rows, 2, dtype=torch.int32), topk_logprobs=torch.full((rows, 2), -0.7), tail_mass=torch.zeros(rows),
    )


def test_a_non_finite_trace_is_refused_in_one_sentence_naming_the_record_and_nothing_is_stored(tmp_path):
    writer = TraceWriter(tmp_path / "store", {"test": True})
    writer.write([record(torch.zeros(3, 2, 4))])
    bad = torch.zeros(3, 2, 4)
    bad[1, 0, 2] = float("nan")
    with pytest.raises(SdrtError) as refusal:
        writer.write([record(bad)])
    message = str(refusal.value)
    assert message == "the trace of example 'chart-7' (index 7) for prompt 'plan-then-solve' has non-finite hidden values, so its batch was not stored"
    lines = writer.progress_path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["name"] == "r000-000000"  # the earlier batch is kept
    assert sorted(p.name for p in (tmp_path / "store" / "shards").iterdir()) == ["r000-000000.jsonl", "r000-000000.safetensors"]
