"""`sdrt show`: kind, status (complete / resumable / corrupt naming the file), settings, sizes and
metrics of every sdrt directory; one example's traces; JSON for scripts."""

from __future__ import annotations

import json
import shutil

from test_eval_fixtures import run_cli


def show_json(cli, *args):
    result = cli("show", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.out)


def test_show_a_trace_store_its_settings_sizes_and_status(cli, traces_dir, tmp_path):  # noqa: F811
    summary = show_json(cli, traces_dir)
    assert (summary["kind"], summary["status"]) == ("trace store", "complete")
    assert summary["settings"]["pos"] == 3 and summary["settings"]["backbone"] == "llava-next-tiny"
    assert summary["sizes"]["records"] == 6 and summary["sizes"]["examples"] == 3
    assert set(summary["metrics"]["mean_confidence"]) == {"extract-relevant-facts", "plan-then-solve"}
    table = cli("show", traces_dir)
    assert table.exit_code == 0 and "trace store" in table.out and "complete" in table.out

    copy = tmp_path / "store"
    shutil.copytree(traces_dir, copy)
    (copy / "lock").write_text("held")  # files show does not know are ignored
    assert show_json(cli, copy)["status"] == "complete"

    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    summary = show_json(cli, copy)
    assert summary["status"] == "resumable" and "re-run the same `sdrt traces` command" in summary["detail"]

    shard = sorted((copy / "shards").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    summary = show_json(cli, copy)
    assert summary["status"] == "corrupt" and str(shard) in summary["detail"]


def test_show_one_example_marks_the_most_confident_trace(cli, traces_dir):  # noqa: F811
    from sdrt_cli.trace_store import TraceStore

    store = TraceStore(traces_dir)
    metas = [store.meta(1, pid) for pid in store.prompt_ids]
    best = max(metas, key=lambda m: m["confidence"])["prompt_id"]
    by_id = show_json(cli, traces_dir, "--example", metas[0]["example_id"])
    assert by_id == show_json(cli, traces_dir, "--example", "1")
    assert by_id["most_confident"] == best
    assert [t["y2"] for t in by_id["traces"]] == [m["y2"] for m in metas]
    printed = cli("show", traces_dir, "--example", "1")
    assert printed.exit_code == 0 and f"{best} ★ most confident" in printed.out and metas[0]["step2_text"].splitlines()[0] in printed.out
    missing = cli("show", traces_dir, "--example", "nope")
    assert missing.exit_code == 1 and "has no example 'nope'" in missing.err


def test_show_adapter_runs_and_ensembles(cli, adapters_dir, tmp_path):  # noqa: F811
    summary = show_json(cli, adapters_dir)
    assert (summary["kind"], summary["status"]) == ("adapter run", "complete")
    assert summary["settings"]["adapter"] == "reft" and summary["sizes"]["ensembles"] == ["k2", "uniform-k2"]
    ensemble = show_json(cli, adapters_dir / "ensembles" / "k2")
    assert (ensemble["kind"], ensemble["status"]) == ("ensemble", "complete")
    assert ensemble["settings"]["kind"] == "predictor" and len(ensemble["settings"]["members"]) == 2

    copy = tmp_path / "run"
    shutil.copytree(adapters_dir, copy)
    shutil.rmtree(copy / "adapters" / "plan-then-solve")
    summary = show_json(cli, copy)
    assert summary["status"] == "corrupt" and str(copy / "adapters" / "plan-then-solve") in summary["detail"]
    (copy / "ensembles" / "k2" / "adapter.safetensors").unlink()
    assert show_json(cli, copy / "ensembles" / "k2")["status"] == "corrupt"


def test_show_an_eval_run_and_its_damage(cli, tmp_path):
    out = tmp_path / "eval"
    run_cli("eval", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--limit", "2", "--max-new-tokens", "2",
            "--method", "prompt", "--no-report", "--out", out)
    assert not (out / "report.html").exists()  # --no-report
    summary = show_json(cli, out)
    assert (summary["kind"], summary["status"]) == ("eval", "complete")
    assert summary["settings"]["methods"] == ["prompt"] and summary["sizes"]["examples"] == 2
    assert summary["metrics"] == {"prompt": json.loads((out / "results.json").read_text())["methods"]["prompt"]["overall"]}
    predictions = out / "predictions" / "prompt.jsonl"
    predictions.write_text(predictions.read_text().splitlines()[0] + "\n")
    summary = show_json(cli, out)
    assert summary["status"] == "corrupt" and str(predictions) in summary["detail"]
    (out / "results.json").unlink()
    assert show_json(cli, out)["status"] == "resumable"


def test_show_refuses_what_is_not_an_sdrt_directory(cli, tmp_path, traces_dir):  # noqa: F811
    (tmp_path / "notes.txt").write_text("x")
    result = cli("show", tmp_path)
    assert result.exit_code == 1 and "is not an sdrt directory" in result.err
    assert cli("show", tmp_path / "absent").exit_code == 1
    eval_only = cli("show", tmp_path, "--example", "0")
    assert eval_only.exit_code == 1

