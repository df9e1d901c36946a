"""The trace engine against the naive transformers loop, the store, resume, faults and torchrun."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch

from sdrt_cli.backbone import load_backbone
from sdrt_cli.errors import SdrtError
from sdrt_cli.packs import load_pack
from sdrt_cli.reference import naive_trace
from sdrt_cli.trace_store import TraceStore
from sdrt_cli.traces import TraceEngine, TraceSettings
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

TRACE_ARGS = [
    "traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--prompts", "3",
    "--max-new-tokens-step1", "6", "--max-new-tokens-step2", "5", "--pos", "3", "--store-dtype", "fp32",
]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("llava-next-tiny", seed=0)


def assert_records_equal(a, b, exact_tensors=True):
    assert (a.example_id, a.prompt_id, a.y1_ids, a.y2_ids, a.y1, a.y2, a.prompt_rows, a.prompt_tail_ids) == (
        b.example_id, b.prompt_id, b.y1_ids, b.y2_ids, b.y1, b.y2, b.prompt_rows, b.prompt_tail_ids,
    )
    if exact_tensors:
        assert torch.equal(a.topk_ids, b.topk_ids)
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.topk_logprobs, b.topk_logprobs)
    else:
        assert_same_top_k(a, b, tol=1e-5)
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.tail_mass, b.tail_mass, rtol=1e-4, atol=1e-5)
        assert a.confidence == pytest.approx(b.confidence, rel=1e-4)


def assert_same_top_k(a, b, tol):
    """Same ids with the same log-probs, row by row; two ids whose log-probs tie within ``tol`` may
    trade places (float noise decides their order), and at the k-th place trade one for the other."""
    for ids_a, lp_a, ids_b, lp_b in zip(a.topk_ids.tolist(), a.topk_logprobs.tolist(), b.topk_ids.tolist(), b.topk_logprobs.tolist()):
        da, db = dict(zip(ids_a, lp_a)), dict(zip(ids_b, lp_b))
        for token in da.keys() | db.keys():
            if token in da and token in db:
                assert abs(da[token] - db[token]) < tol
            else:
                assert abs(da.get(token, db.get(token)) - lp_a[-1]) < tol, f"token {token} is in only one top-k, away from its edge"


# a token llava-next-tiny really emits (greedy, synthetic-charts train): declared an extra EOS, it
# ends generation at step 2 for example 0 and step 3 for example 2, while example 1 never emits it
EXTRA_EOS = 3013


@pytest.mark.slow
def test_prefix_cached_batched_engine_equals_the_naive_generate_loop(tiny, monkeypatch):
    monkeypatch.setattr(tiny, "eos_token_ids", (*tiny.eos_token_ids, EXTRA_EOS))
    data = SyntheticCharts(split="train", limit=3)
    prompts = load_pack("visual_reasoning").prompts[:3]
    settings = TraceSettings(dtype="fp32", max_new_tokens_step1=8, max_new_tokens_step2=6, pos=4)
    engine = TraceEngine(tiny, data, prompts, settings)
    items = list(enumerate(data))
    fast = engine.run(items)
    naive = [r for i, ex in items for r in naive_trace(tiny, data, i, ex, prompts, settings)]
    assert len(fast) == len(naive) == 9
    # rows of one batch stop at different steps, in both steps: EOS early, EOS later, never (max tokens)
    ended = {(len(r.y1_ids), len(r.y2_ids), r.y2_ids[-1] == EXTRA_EOS) for r in naive}
    assert {(2, 2, True), (8, 6, False), (3, 3, True)} <= ended
    for a, b in zip(fast, naive):
        assert_records_equal(a, b, exact_tensors=False)
        # the contract: P prompt rows + one row per teacher-forced y2 token but the last
        assert a.hidden.shape == (4 + len(a.y2_ids) - 1, 3, tiny.hidden_size)
        assert a.tail_mass.min() >= 0
        assert len(a.prompt_tail_ids) == 4
    # prefix reuse: far fewer tokens than the naive loop's 2 full prompts per prompt per example
    assert engine.fed_tokens < 0.5 * sum(len(r.y1_ids) + 2 * 2400 for r in naive)


def test_layers_and_settings_are_validated(tiny):
    data = SyntheticCharts(split="train", limit=1)
    prompts = load_pack("visual_reasoning").prompts[:1]
    with pytest.raises(SdrtError, match="layer 9 does not exist: the backbone has 4 decoder layers"):
        TraceEngine(tiny, data, prompts, TraceSettings(layers=(9,)))
    with pytest.raises(SdrtError, match="name the same decoder layer twice"):
        TraceEngine(tiny, data, prompts, TraceSettings(layers=(3, -1)))


@pytest.mark.slow
def test_cli_store_roundtrip_resume_and_refusals(cli, tmp_path, tiny):
    out = tmp_path / "store"
    first = cli(*TRACE_ARGS, "--limit", "2", "--out", out)
    assert first.exit_code == 0, first.output
    store = TraceStore(out)
    assert len(store) == 6 and store.manifest.num_examples == 2
    assert json.loads((out / "run.json").read_text())["config"]["pos"] == 3
    # a larger --limit extends the same store: only the new example is traced
    again = cli(*TRACE_ARGS, "--limit", "3", "--out", out)
    assert again.exit_code == 0, again.output
    extended = TraceStore(out)
    assert len(extended) == 9
    for key in [(0, p) for p in store.prompt_ids]:
        assert_records_equal(store.record(*key), extended.record(*key))
    # another configuration on the same directory is refused with what differs
    other = cli(*TRACE_ARGS, "--limit", "3", "--out", out, "--top-k", "7")
    assert other.exit_code == 1 and "settings.top_k: 20 (store) vs 7 (now)" in other.err
    # the reader refuses another backbone or pack
    with pytest.raises(SdrtError, match="was made with backbone"):
        extended.check_compatible(load_backbone("llava-next-tiny", seed=1).record())
    extended.check_compatible(tiny.record(), pack=load_pack("visual_reasoning"))
    # a corrupt shard is reported by name, on read and on resume
    shard = sorted((out / "shards").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(SdrtError, match=f"{shard.name} is corrupt or truncated"):
        TraceStore(out)
    resumed = cli(*TRACE_ARGS, "--limit", "3", "--out", out)
    assert resumed.exit_code == 1 and shard.name in resumed.err
    # --overwrite is the way to discard it
    assert cli(*TRACE_ARGS, "--limit", "1", "--out", out, "--overwrite").exit_code == 0
    assert len(TraceStore(out)) == 3


@pytest.mark.slow
def test_traces_stream_their_share_one_batch_at_a_time_and_skip_done_examples(cli, tmp_path, monkeypatch):
    drawn: list[tuple[int, weakref.ref]] = []  # PIL images are unhashable: no WeakSet
    peak = [0]
    draw = SyntheticCharts.example

    def tracked(self, index):
        example = draw(self, index)
        gc.collect()
        drawn.extend((index, weakref.ref(image)) for image in example.images)
        peak[0] = max(peak[0], sum(ref() is not None for _, ref in drawn))
        return example

    monkeypatch.setattr(SyntheticCharts, "example", tracked)
    args = ["traces", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--prompts", "1", "--max-new-tokens-step1", "2", "--max-new-tokens-step2", "2"]
    out = tmp_path / "store"
    assert cli(*args, "--limit", "6", "--batch-size", "1", "--out", out).exit_code == 0
    # never the whole share at once: the batch in use, the one before it, the next one being decoded
    assert sorted(i for i, _ in drawn) == list(range(6)) and peak[0] <= 3
    drawn.clear()
    assert cli(*args, "--limit", "7", "--batch-size", "2", "--out", out).exit_code == 0
    assert [i for i, _ in drawn] == [6]  # done examples are not decoded again
    assert TraceStore(out).example_indices == list(range(7))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--store-dtype", "int8"], "--store-dtype 'int8' is not one of"),
        (["--layers", "1,x"], "--layers '1,x' is not a comma-separated list"),
        (["--prompts", "99"], "has 8 prompts; cannot select 99"),
        (["--pack", "visual_reasonin"], "Did you mean 'visual_reasoning'?"),
    ],
)
def test_bad_trace_options_fail_in_one_sentence(cli, tmp_path, extra, message):
    result = cli(*TRACE_ARGS, "--limit", "1", "--out", tmp_path / "s", *extra)
    assert result.exit_code == 1
    assert message in result.err
    assert "Traceback" not in result.output
    assert not (tmp_path / "s" / "shards").exists()


def test_missing_out_and_dataset_are_named(cli):
    assert "choose an output directory with --out" in cli("traces", "--dataset", "synthetic-charts").err
    assert "choose a dataset with --dataset" in cli("traces", "--out", "x", "--backbone", "llava-next-tiny").err


def _sdrt(*args, env=None):
    return [sys.executable, "-m", "sdrt_cli", *map(str, args)]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    args = [*TRACE_ARGS, "--limit", "4", "--batch-size", "1"]
    clean = tmp_path / "clean"
    subprocess.run(_sdrt(*args, "--out", clean), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_sdrt(*args, "--out", killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = killed / "progress" / "r000.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and progress.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = progress.read_text().count("\n")
    assert 1 <= committed < 4, "the kill should land mid-run"
    with pytest.raises(SdrtError, match="unfinished"):
        TraceStore(killed)
    subprocess.run(_sdrt(*args, "--out", killed), check=True, capture_output=True)
    a, b = TraceStore(clean), TraceStore(killed)
    assert len(a) == len(b) == 12
    assert b.manifest.num_records == 12  # nothing duplicated
    # ids and texts exactly; tensors to float tolerance (separate processes on a loaded machine
    # may split matmuls across threads differently)
    for ra, rb in zip(a.records(), b.records()):
        assert_records_equal(ra, rb, exact_tensors=False)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_equal_one_process(tmp_path):
    args = [*TRACE_ARGS, "--limit", "3", "--batch-size", "1"]
    single = tmp_path / "single"
    subprocess.run(_sdrt(*args, "--out", single), check=True, capture_output=True)
    double = tmp_path / "double"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sdrt_cli", *args, "--out", str(double)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = TraceStore(single), TraceStore(double)
    assert {e.name[:4] for e in b.entries} == {"r000", "r001"}  # each rank wrote its own shards
    assert len(a) == len(b) == 9
    for ra, rb in zip(a.records(), b.records()):
        assert_records_equal(ra, rb, exact_tensors=False)
    # only rank 0 prints
    assert result.stdout.count("Wrote 9 trace records") == 1
