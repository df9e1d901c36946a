"""`sdrt calibrate` on the tiny backbone: the pools and the report it writes, resuming, refusing
another configuration on the same run, reusing traced records, and bad options in one sentence.

One calibrated run (metric assessor, two iterations, held-out scoring) is shared by the tests that
read it; the judge assessor gets one iteration of its own, and one kill-and-resume run is slow."""

from __future__ import annotations

import contextlib
import io
import json
import random
import time
from pathlib import Path

import pytest

from sdrt_cli import calibration
from sdrt_cli.assessment import Assessment

# the smallest run that still goes through every stage: 2 examples, 2 prompts (an ensemble needs
# more than one adapter), a few new tokens, one epoch
TRACE_SETS = [
    "--set", "traces.prompts=2", "--set", "traces.max_new_tokens_step1=2", "--set", "traces.max_new_tokens_step2=2",
    "--set", "traces.pos=3", "--set", "traces.store_dtype=fp32",
]
TINY = [
    "calibrate", "--dataset", "synthetic-charts", "--split", "train", "--limit", "2", "--backbone", "llava-next-tiny",
    "--max-new-tokens", "2", "--max-new-tokens-step1", "2", "--augment-max-new-tokens", "6", "--judge-max-new-tokens", "6",
    *TRACE_SETS, "--set", "distill.epochs=1", "--set", "ensemble.steps=2",
]
METRIC = ["--assessor", "metric", "--tau", "0.33", "--eval-split", "test", "--eval-limit", "1"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def metric_run(tmp_path_factory) -> tuple[Path, list]:
    """One calibration with the metric assessor, run in-process once for the module: one iteration,
    then the same command with --iterations 2, which continues it (iteration 1 is not run again)."""
    from sdrt_cli.cli import main

    out = tmp_path_factory.mktemp("calibrate") / "run"
    args = [*TINY, *METRIC, "--out", out]
    for iterations in ("1", "2"):
        output = io.StringIO()
        code = 0
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                main([*map(str, args), "--iterations", iterations])
            except SystemExit as exc:
                code = exc.code
        assert code in (0, None), output.getvalue()[-3000:]
    assert "iteration 1:" not in output.getvalue() and "iteration 2: update" in output.getvalue()
    return out, [*args, "--iterations", "2"]


def test_metric_calibration_writes_consistent_pools_and_report(metric_run):
    out, _ = metric_run
    report = json.loads((out / "report.json").read_text())
    assert [s["iteration"] for s in report["iterations"]] == [1, 2]
    assert (out / "report.png").stat().st_size > 0 and "Held-out accuracy (95% CI)" in (out / "report.md").read_text()
    for n, summary in enumerate(report["iterations"], 1):
        # each iteration's student scored on the untouched test split, by `sdrt eval` itself
        heldout = rows(out / f"iter-{n}" / "heldout" / "predictions" / "sdrt.jsonl")
        assert [r["id"] for r in heldout] == ["synthetic-charts/test/0"]
        assert summary["heldout_accuracy"]["value"] == pytest.approx(heldout[0]["score"])
        assessed = [r for r in rows(out / f"iter-{n}" / "assessed.jsonl") if r.get("assessed_in") == n]
        labelled = [r for r in assessed if r["label"] is not None]
        assert labelled, "no instruction was assessed"
        assert summary["difficult"] + summary["easy"] + summary["excluded"] == summary["cache_pool"] == len(assessed)
        for row in labelled:  # Eq. 6 on the recorded scores, and the threshold
            assessment = Assessment(row["scores"]["teacher"], row["scores"]["student"])
            assert row["difficulty"] == pytest.approx(assessment.difficulty())
            assert row["label"] == ("difficult" if assessment.difficulty() >= 0.33 else "easy")
        for row in assessed:  # the metric scores only instructions with a gold answer
            assert (row["excluded"] == "no gold answer to score with the metric") == (row["origin"] == "augmented")
        candidates = rows(out / f"iter-{n}" / "augmented.jsonl")
        assert [c["parent_id"] for c in candidates] == [r["id"] for r in assessed if r["label"] == "difficult"]
        assert summary["accepted"] == sum(c["status"] == "accepted" for c in candidates)
        for candidate in candidates:
            assert candidate["origin"] == "augmented" and candidate["iteration"] == n
            assert (candidate["status"] == "rejected") == (candidate["reason"] is not None)
    # iteration 2 assessed iteration 1's new questions: augmentation ran and fed the next iteration
    assert any(r["origin"] == "augmented" for r in rows(out / "iter-2" / "assessed.jsonl"))
    # the latest pools: the cache holds every instruction ever (rejected ones marked), the tuning pool
    # replaced each parent with its accepted child
    cache = rows(out / "pools" / "cache.jsonl")
    tuning = rows(out / "pools" / "tuning.jsonl")
    accepted = [r for r in cache if r["origin"] == "augmented" and r["status"] == "accepted"]
    assert len({r["id"] for r in cache}) == len(cache)
    assert {r["id"] for r in tuning} <= {r["id"] for r in cache if r["status"] == "accepted"}
    # iteration 2 traced exactly its tuning pool
    manifest = json.loads((out / "iter-2" / "traces" / "manifest.json").read_text())
    assert manifest["num_examples"] == len(rows(out / "iter-2" / "tuning.jsonl"))
    # a pool reads as a dataset over the source images
    from sdrt_cli.data import open_dataset

    data = open_dataset("pool", pool=str(out / "pools" / "cache.jsonl"), source="synthetic-charts", source_split="train")
    assert len(data) == len([r for r in cache if r["status"] != "rejected"]) == 2 + len(accepted)


def test_the_same_command_again_reuses_every_stage_and_changes_no_pool(cli, metric_run):
    out, args = metric_run
    before = {p: p.read_bytes() for p in sorted(out.glob("iter-*/*.jsonl")) + sorted((out / "pools").iterdir())}
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "iteration 1:" not in again.output and "iteration 2:" not in again.output
    assert {p: p.read_bytes() for p in before} == before


def test_another_configuration_on_the_run_is_refused_naming_what_differs(cli, metric_run):
    out, args = metric_run
    config = (out / "calibrate.json").read_bytes()
    refused = cli(*[a if a != "0.33" else "0.5" for a in args])
    assert refused.exit_code == 1
    assert "another configuration" in refused.output and "tau: 0.33 (run) vs 0.5 (now)" in refused.output
    assert (out / "calibrate.json").read_bytes() == config


def test_a_seeded_store_keeps_the_records_of_instructions_traced_before(cli, metric_run, tmp_path):
    """What iteration N+1's traces stage does when instructions stay in the tuning pool: the records
    of those are copied from iteration N's store, `sdrt traces` accepts the copy and traces only the
    new instructions."""
    from sdrt_cli.calibration.pools import seed_store
    from sdrt_cli.trace_store import TraceStore

    out, _ = metric_run
    pool = out / "iter-2" / "cache.jsonl"  # iteration 1's instructions and their new questions
    store = tmp_path / "store"
    old_ids = [r["id"] for r in rows(out / "iter-1" / "tuning.jsonl")]
    assert seed_store(out / "iter-1" / "traces", store, pool) == len(old_ids)
    options = [f"pool={pool}", "source=synthetic-charts", "source_split=train"]
    stage_options = [s.removeprefix("traces.").split("=") for s in TRACE_SETS if s != "--set"]
    traced = cli("traces", "--out", store, "--dataset", "pool", *[x for o in options for x in ("--dataset-option", o)],
                 "--backbone", "llava-next-tiny", *[x for key, value in stage_options for x in (f"--{key.replace('_', '-')}", value)])
    assert traced.exit_code == 0, traced.output
    first, seeded = TraceStore(out / "iter-1" / "traces"), TraceStore(store)
    pool_ids = [r["id"] for r in rows(pool) if r["status"] != "rejected"]
    assert len(seeded.example_indices) == len(pool_ids) > len(old_ids)
    by_id = {first.meta(i, p)["example_id"]: i for i, p in first._index}
    for new_index, example_id in enumerate(pool_ids):
        if example_id in by_id:
            for prompt in first.prompt_ids:
                a, b = first.record(by_id[example_id], prompt), seeded.record(new_index, prompt)
                assert (a.y2, a.hidden.tolist(), a.confidence) == (b.y2, b.hidden.tolist(), b.confidence)


def test_judge_calibration_counts_unreadable_verdicts_and_excludes_them(cli, tmp_path):
    out = tmp_path / "run"
    result = cli(*TINY, "--assessor", "judge", "--iterations", "1", "--out", out)
    assert result.exit_code == 0, result.output
    judgements = rows(out / "iter-1" / "judge.jsonl")
    assert sorted((j["index"], j["order"]) for j in judgements) == sorted((i, o) for i in range(2) for o in ("teacher-first", "student-first"))
    summary = json.loads((out / "report.json").read_text())["iterations"][0]
    parsed = sum(calibration.parse_judge_scores(j["output"]) is not None for j in judgements)
    assert summary["judgements"] == 4 and summary["judgements_parsed"] == parsed and summary["parse_rate"] == parsed / 4
    assessed = rows(out / "iter-1" / "assessed.jsonl")
    for row in assessed:  # an unreadable verdict is excluded, never guessed
        result = calibration.judge(row["judgements"]["teacher-first"], row["judgements"]["student-first"])
        assert (row["excluded"] == "unparseable judgement") == (result.assessment() is None)
    assert "Parse rate" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--assessor", "gpt"], "--assessor 'gpt' is not judge or metric"),
        (["--teacher", "three-step"], "--teacher 'three-step' is not two-step or single-step"),
        (["--set", "distill.adapter=lora"], "needs reft or loreft adapters"),
        (["--set", "traces.out=x"], "--set traces.out: `sdrt calibrate` sets this option"),
        (["--set", "eval.limit=2"], "'eval' is not a stage"),
        (["--eval-split", "train"], "--eval-split 'train' is the split the pools start from"),
        (["--roles", "no-such-roles.toml"], "role pack 'no-such-roles.toml' is neither a shipped role pack"),
    ],
)
def test_bad_options_are_one_sentence_before_anything_is_written(cli, tmp_path, extra, message):
    out = tmp_path / "run"
    result = cli(*TINY, "--out", out, *extra)
    assert result.exit_code == 1
    assert message in result.output, result.output
    assert not (out / "calibrate.json").exists()


@pytest.mark.slow
def test_calibrate_killed_at_a_seeded_point_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL in a seeded stage after a seeded delay into it (so the kill lands mid-stage or
    mid-write), then the same command: the same pools, adapters and ensembles as a run never interrupted."""
    from fault_helpers import assert_same_adapters, assert_same_ensemble, kill_when, run

    args = [*TINY, "--assessor", "metric", "--iterations", "2", "--batch-size", "1"]
    clean, out = tmp_path / "clean", tmp_path / "killed"
    run(*args, "--out", clean)
    stages = len(list(clean.glob("iter-*/stages/*.done")))
    assert stages == 18

    rng = random.Random(5)
    target, delay = rng.randrange(stages - 1), rng.uniform(0.0, 3.0)
    reached: list[float] = []

    def ready() -> bool:
        if not reached and len(list(out.glob("iter-*/stages/*.done"))) >= target:
            reached.append(time.time())
        return bool(reached) and time.time() - reached[0] >= delay

    assert kill_when([*args, "--out", out], ready)
    assert len(list(out.glob("iter-*/stages/*.done"))) < stages
    run(*args, "--out", out)
    for pool in sorted(clean.glob("iter-*/*.jsonl")) + sorted(clean.glob("pools/*.jsonl")):
        assert (out / pool.relative_to(clean)).read_bytes() == pool.read_bytes(), pool
    for n in (1, 2):
        assert_same_adapters(clean / f"iter-{n}" / "adapters", out / f"iter-{n}" / "adapters", (clean, out))
        assert_same_ensemble(clean / f"iter-{n}" / "adapters" / "ensembles" / "calibrate", out / f"iter-{n}" / "adapters" / "ensembles" / "calibrate", (clean, out))
    assert (out / "report.md").read_text() == (clean / "report.md").read_text()


def test_distill_init_from_starts_every_adapter_from_an_earlier_run(cli, tmp_path, tiny_trace_store):
    """--init-from: with a learning rate too small to move anything, the adapters stay the earlier
    run's, while a fresh start from the same seed does not; another shape is refused in one sentence."""
    from safetensors.torch import load_file

    base = ["distill", "--traces", tiny_trace_store, "--epochs", "1", "--batch-size", "4", "--cache-ram-gb", "0", "--cache-disk-gb", "0"]
    first, warm, cold = tmp_path / "first", tmp_path / "warm", tmp_path / "cold"
    assert cli(*base, "--out", first, "--seed", "1", "--lr", "0.5").exit_code == 0
    assert cli(*base, "--out", warm, "--init-from", first, "--lr", "1e-12").exit_code == 0
    assert cli(*base, "--out", cold, "--lr", "1e-12").exit_code == 0
    manifest = json.loads((first / "manifest.json").read_text())
    for prompt in manifest["prompts"]:
        a, w, c = (load_file(run / "adapters" / prompt / "adapter.safetensors") for run in (first, warm, cold))
        for key in a:
            assert (a[key] - w[key]).abs().max() < 1e-6, key
        assert any((a[key] - c[key]).abs().max() > 1e-3 for key in a)
    assert json.loads((warm / "manifest.json").read_text())["fingerprint"]["source"]["init_from"]["path"] == str(first.resolve())
    refused = cli(*base, "--out", tmp_path / "other", "--init-from", first, "--rank", "2")
    assert refused.exit_code == 1 and "has rank 4, this run trains 2" in refused.output


def test_a_run_another_process_writes_is_refused_and_left_untouched(cli, tmp_path):
    from test_locking import hold_in_another_process

    out = tmp_path / "run"
    holder = hold_in_another_process(out)
    try:
        result = cli(*TINY, "--out", out)
        assert result.exit_code == 1 and f"{out} is being written by pid {holder.pid}" in result.output
        assert sorted(p.name for p in out.iterdir()) == [".sdrt.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_generation_is_dealt_to_ranks_kept_across_a_kill_and_written_in_one_order(tmp_path, monkeypatch):
    """The generation phases' dealing (unit i to rank i mod W), with each rank of a 2-process run in
    turn: records an interrupted attempt left are not generated again, and rank 0 writes every
    record in the units' order, as one process would."""
    from sdrt_cli.calibration.stages import generate_in_shards
    from sdrt_cli.io import append_jsonl

    path = tmp_path / "judge.jsonl"
    units = [(i, lambda i=i: ({"index": i}, f"question {i}")) for i in range(7)]
    append_jsonl(path.with_name("judge.partial") / "r000.jsonl", {"index": 2, "output": "QUESTION 2"})  # a killed attempt's
    seen: dict[int, list[int]] = {}

    def generate(batch):
        seen.setdefault(rank, []).extend(key["index"] for key, _ in batch)
        return [{**key, "output": text.upper()} for key, text in batch]

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        generate_in_shards(path, units, lambda record: record["index"], 2, "judgements", generate)
    assert seen == {1: [1, 3, 5], 0: [0, 4, 6]}
    assert rows(path) == [{"index": i, "output": f"QUESTION {i}"} for i in range(7)]
    assert not path.with_name("judge.partial").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_give_the_pools_and_assessments_of_one_process(tmp_path):
    """Two iterations under torchrun (gloo, 2 CPU processes): the answers, new questions, assessments,
    pools, held-out predictions and report equal one process's; rank 0 alone writes and reports."""
    import subprocess
    import sys

    from fault_helpers import ENV, run

    args = [*TINY, "--assessor", "metric", "--tau", "0", "--iterations", "2", "--batch-size", "1", "--eval-split", "test", "--eval-limit", "2"]
    args[args.index("--limit") + 1] = "3"  # shares of 2 and 1 instructions: the ranks' shares differ
    one, two = tmp_path / "one", tmp_path / "two"
    run(*args, "--out", one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sdrt_cli", *args, "--out", str(two)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Calibration of 2 iterations") == 1 and result.stderr.count("iteration 2: answers") == 1
    files = sorted(p.relative_to(one) for pattern in ("iter-*/*.jsonl", "iter-*/answers/*.jsonl", "pools/*.jsonl", "iter-*/heldout/predictions/*.jsonl") for p in one.glob(pattern))
    # per iteration 6 pool and assessment files, 2 answers and the held-out predictions; the pools of
    # iteration 3; the latest pools
    assert len(files) == 2 * 9 + 2 + 2
    for rel in files:
        assert (two / rel).read_bytes() == (one / rel).read_bytes(), rel
    assert rows(one / "iter-2" / "augment.jsonl"), "tau 0: every instruction is difficult, so there are new questions"
    assert (two / "report.md").read_text() == (one / "report.md").read_text()
    assert sorted(p.name for p in (two / "iter-2" / "traces" / "progress").iterdir()) == ["r000.jsonl", "r001.jsonl"]
    assert not list(two.glob("iter-*/**/*.partial"))
