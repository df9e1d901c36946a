"""The on-disk formats: old files still load and save unchanged, bad ones are refused in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdrt_cli.distill import read_manifest, write_manifest
from sdrt_cli.errors import SdrtError
from sdrt_cli.formats import AdaptersManifest, EnsembleManifest, EvalResults, TraceManifest, check_example_id

# written by `sdrt distill` before the formats had their own module (tiny backbone, 2 prompts, 1 step)
V1_RUN = Path(__file__).parent / "fixtures" / "formats" / "adapters-v1"


def test_a_manifest_written_by_earlier_sdrt_loads_and_saves_byte_for_byte(tmp_path):
    manifest = AdaptersManifest.load(V1_RUN)
    assert manifest.status == "complete" and manifest.adapter == "reft" and manifest.mode == "traces"
    assert manifest.prompts == ["extract-relevant-facts", "plan-then-solve"]
    assert manifest.adapters["plan-then-solve"] == "adapters/plan-then-solve"
    assert manifest.backbone["backbone"] == "llava-next-tiny"
    manifest.save(tmp_path)
    assert (tmp_path / "manifest.json").read_bytes() == (V1_RUN / "manifest.json").read_bytes()
    # the dict-level API reads and writes the same bytes
    assert read_manifest(V1_RUN) == json.loads((V1_RUN / "manifest.json").read_text())
    (tmp_path / "again").mkdir()
    write_manifest(tmp_path / "again", read_manifest(V1_RUN))
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (V1_RUN / "manifest.json").read_bytes()


def test_unknown_fields_are_kept_after_the_known_ones(tmp_path):
    document = json.loads((V1_RUN / "manifest.json").read_text())
    document["from_a_newer_sdrt"] = {"x": 1}
    loaded = AdaptersManifest.from_json(document, "m.json")
    assert list(loaded.to_json()) == list(document)


def bad(field_name, value):
    document = json.loads((V1_RUN / "manifest.json").read_text())
    document[field_name] = value
    return document


@pytest.mark.parametrize(
    "document, message",
    [
        (bad("kind", "ensemble"), r"is not an adapters manifest \(field 'kind' is 'ensemble'\)"),
        (bad("format_version", 2), r"field 'format_version' is 2, this sdrt reads 1"),
        (bad("prompts", "plan-then-solve"), r"field 'prompts' must be a list of prompt ids, got 'plan-then-solve'"),
        (bad("adapters", {"plan-then-solve": "adapters/plan-then-solve"}), r"field 'adapters' has no directory for prompt 'extract-relevant-facts'"),
        (bad("backbone", "llava"), r"field 'backbone' must be a backbone identity object"),
        (bad("adapter", ""), r"field 'adapter' must be an adapter name"),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_file_and_the_field(tmp_path, document, message):
    (tmp_path / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(SdrtError, match=message) as caught:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(caught.value)


def test_an_unreadable_manifest_names_the_file(tmp_path):
    (tmp_path / "manifest.json").write_text('{"kind": "adapters", ')
    with pytest.raises(SdrtError, match="manifest.json is not readable JSON"):
        AdaptersManifest.load(tmp_path)
    with pytest.raises(SdrtError, match="holds no distilled adapters"):
        AdaptersManifest.load(tmp_path / "nothing")


def test_one_example_id_check():
    check_example_id(3, "charts", "ex-3", "ex-3", "trace store S", "use the store's dataset")
    with pytest.raises(SdrtError, match=r"^dataset 'charts' example 3 is 'ex-3' but trace store S has 'ex-9' there; use the store's dataset$"):
        check_example_id(3, "charts", "ex-3", "ex-9", "trace store S", "use the store's dataset")


# ---------------------------------------------------------------------------------------------
# An ensemble's adapter.json
# ---------------------------------------------------------------------------------------------

# written by `save_ensemble` before it used EnsembleManifest: a predictor ensemble and a uniform one
V1_ENSEMBLES = Path(__file__).parent / "fixtures" / "formats" / "ensemble-v1"


@pytest.mark.parametrize("name, kind", [("k2", "predictor"), ("uniform-k2", "uniform")])
def test_an_ensemble_written_by_earlier_sdrt_loads_and_saves_byte_for_byte(tmp_path, name, kind):
    manifest, tensors = EnsembleManifest.load(V1_ENSEMBLES / name)
    assert manifest.name == name and manifest.kind == kind and manifest.feature_layer == 1
    assert manifest.members == ["extract-relevant-facts", "plan-then-solve"]
    assert manifest.backbone["backbone"] == "llava-next-tiny"
    assert (manifest.predictor is None) == (kind == "uniform") and bool(tensors) == (kind == "predictor")
    manifest.save(tmp_path, tensors)
    for file in ("adapter.json", "adapter.safetensors"):
        assert (tmp_path / file).read_bytes() == (V1_ENSEMBLES / name / file).read_bytes()


def test_save_ensemble_writes_through_the_typed_manifest(tmp_path):
    from sdrt_cli.ensemble import Ensemble, EnsemblePredictor, save_ensemble

    original, tensors = EnsembleManifest.load(V1_ENSEMBLES / "k2")
    predictor = EnsemblePredictor(16, 8, 2)
    predictor.load_state_dict(tensors)
    ensemble = Ensemble(name="k2", members=original.members, adapters=[], feature_layer=1, predictor=predictor)
    save_ensemble(tmp_path, ensemble, {"backbone": original.backbone, **original.details})
    assert (tmp_path / "adapter.json").read_bytes() == (V1_ENSEMBLES / "k2" / "adapter.json").read_bytes()


def bad_ensemble(field_name, value):
    document = json.loads((V1_ENSEMBLES / "k2" / "adapter.json").read_text())
    document[field_name] = value
    return document


@pytest.mark.parametrize(
    "document, message",
    [
        (bad_ensemble("format", "sdrt-intervention-adapter"), r"field 'format' is 'sdrt-intervention-adapter', expected 'sdrt-ensemble'"),
        (bad_ensemble("format_version", 2), r"field 'format_version' is 2, this sdrt reads 1"),
        (bad_ensemble("kind", "mixture"), r"field 'kind' must be 'predictor' or 'uniform', got 'mixture'"),
        (bad_ensemble("members", []), r"field 'members' must be a non-empty list of prompt ids, got \[\]"),
        (bad_ensemble("feature", {"layer": "1"}), r"field 'feature.layer' must be a decoder layer index, got '1'"),
        (bad_ensemble("predictor", None), r"field 'predictor' must be an object with integer input_size and hidden_size, got None"),
        (bad_ensemble("backbone", "llava"), r"field 'backbone' must be a backbone identity object, got 'llava'"),
    ],
)
def test_a_bad_ensemble_is_refused_naming_the_file_and_the_field(tmp_path, document, message):
    for file in ("adapter.safetensors",):
        (tmp_path / file).write_bytes((V1_ENSEMBLES / "k2" / file).read_bytes())
    (tmp_path / "adapter.json").write_text(json.dumps(document))
    with pytest.raises(SdrtError, match=message) as caught:
        EnsembleManifest.load(tmp_path)
    assert str(caught.value).startswith(str(tmp_path / "adapter.json"))


# ---------------------------------------------------------------------------------------------
# An eval run's results.json
# ---------------------------------------------------------------------------------------------

# written by `sdrt eval` before results.json had a class (tiny backbone, synthetic-charts, 3 examples, prompt + cot)
V1_EVAL = Path(__file__).parent / "fixtures" / "formats" / "eval-v1"


def test_eval_results_written_by_earlier_sdrt_load_and_save_byte_for_byte(tmp_path):
    results = EvalResults.load(V1_EVAL)
    assert (results.dataset, results.split, results.examples, results.scored) == ("synthetic-charts", "validation", 3, True)
    assert list(results.methods) == ["prompt", "cot"] and results.score("cot") == 0.0 and results.score("sdrt") is None
    assert results.warning is None
    results.save(tmp_path)
    assert (tmp_path / "results.json").read_bytes() == (V1_EVAL / "results.json").read_bytes()
    # the readers go through it: the report's reader and ablate's score
    from sdrt_cli.ablate import read_score
    from sdrt_cli.report import read_eval

    assert read_eval(V1_EVAL)[0] == json.loads((V1_EVAL / "results.json").read_text())
    assert read_score(V1_EVAL, "prompt") == 0.0 and read_score(tmp_path / "not-run", "prompt") is None


def test_a_warning_and_unknown_fields_keep_their_place(tmp_path):
    document = json.loads((V1_EVAL / "results.json").read_text())
    document["warning"] = "scored on trained-on examples"
    document["from_a_newer_sdrt"] = 1
    assert list(EvalResults.from_json(document, "r.json").to_json()) == list(document)


def bad_results(value, *keys):
    document = json.loads((V1_EVAL / "results.json").read_text())
    target = document
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return document


@pytest.mark.parametrize(
    "document, message",
    [
        ([], r"is not an eval result \(a JSON object\), got list"),
        (bad_results("yes", "scored"), r"field 'scored' must be true or false, got 'yes'"),
        (bad_results(-1, "examples"), r"field 'examples' must be a count, got -1"),
        (bad_results(["prompt"], "methods"), r"field 'methods' must be an object of per-method results"),
        (bad_results("0.5", "methods", "cot", "overall"), r"field 'methods.cot.overall' must be a score or null, got '0.5'"),
        (bad_results(3, "warning"), r"field 'warning' must be a string, got 3"),
    ],
)
def test_bad_eval_results_are_refused_naming_the_file_and_the_field(tmp_path, document, message):
    (tmp_path / "results.json").write_text(json.dumps(document))
    with pytest.raises(SdrtError, match=message) as caught:
        EvalResults.load(tmp_path)
    assert str(caught.value).startswith(str(tmp_path / "results.json"))


# ---------------------------------------------------------------------------------------------
# A trace store's manifest.json
# ---------------------------------------------------------------------------------------------

# written by `sdrt traces` before the manifest had a class (tiny backbone, synthetic-charts, 2 examples, 2 prompts)
V1_TRACES = Path(__file__).parent / "fixtures" / "formats" / "traces-v1"


def test_a_trace_store_written_by_earlier_sdrt_loads_and_saves_byte_for_byte(tmp_path):
    from sdrt_cli.trace_store import TraceStore

    manifest = TraceManifest.load(V1_TRACES)
    assert manifest.status == "complete" and manifest.num_examples == 2 and manifest.num_records == 4
    assert [s["name"] for s in manifest.shards] == ["r000-000000"]
    assert manifest.fingerprint["backbone"]["backbone"] == "llava-next-tiny"
    assert list(manifest.details) == ["lm_token_forwards_this_run_rank0"]
    manifest.save(tmp_path)
    assert (tmp_path / "manifest.json").read_bytes() == (V1_TRACES / "manifest.json").read_bytes()
    store = TraceStore(V1_TRACES)  # the reader goes through it, shards verified against its checksums
    assert store.manifest == manifest and len(store) == 4 and store.prompt_ids == manifest.fingerprint["pack"]["prompts"]


def test_a_new_store_starts_with_the_running_manifest_and_finalize_completes_it_byte_for_byte(tmp_path):
    from sdrt_cli.trace_store import TraceWriter, finalize

    recorded = json.loads((V1_TRACES / "manifest.json").read_text())
    store = tmp_path / "store"
    TraceWriter(store, recorded["fingerprint"])
    running = {"format_version": 1, "status": "running", "fingerprint": recorded["fingerprint"]}
    assert (store / "manifest.json").read_text() == json.dumps(running, indent=2) + "\n"
    for sub in ("shards", "progress"):  # the committed shards of the recorded store
        for file in (V1_TRACES / sub).iterdir():
            (store / sub / file.name).write_bytes(file.read_bytes())
    finalize(store, {"lm_token_forwards_this_run_rank0": recorded["lm_token_forwards_this_run_rank0"]})
    assert (store / "manifest.json").read_bytes() == (V1_TRACES / "manifest.json").read_bytes()


def bad_trace_manifest(value, *keys):
    document = json.loads((V1_TRACES / "manifest.json").read_text())
    target = document
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return document


@pytest.mark.parametrize(
    "document, message",
    [
        (bad_trace_manifest(2, "format_version"), r"has trace format version 2; this sdrt reads version 1"),
        (bad_trace_manifest("done", "status"), r"field 'status' must be 'running' or 'complete', got 'done'"),
        (bad_trace_manifest("plan-then-solve", "fingerprint", "pack", "prompts"), r"field 'fingerprint.pack.prompts' must be a list of prompt ids"),
        (bad_trace_manifest([{"name": "r000-000000"}], "shards"), r"field 'shards' must be a list of \{name, sha256, examples, records, bytes\} shard entries"),
        (bad_trace_manifest(None, "num_records"), r"field 'num_records' must be a count, got None"),
    ],
)
def test_a_bad_trace_manifest_is_refused_naming_the_file_and_the_field(tmp_path, document, message):
    (tmp_path / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(SdrtError, match=message) as caught:
        TraceManifest.load(tmp_path)
    assert str(caught.value).startswith(str(tmp_path / "manifest.json"))


def test_show_reports_a_bad_record_as_corrupt_naming_the_file_and_the_field(tmp_path):
    from sdrt_cli.show import CORRUPT, inspect

    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    (ensemble / "adapter.json").write_text(json.dumps(bad_ensemble("members", [])))
    results = tmp_path / "eval"
    results.mkdir()
    (results / "results.json").write_text(json.dumps(bad_results("0.5", "methods", "cot", "overall")))
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "manifest.json").write_text(json.dumps(bad_trace_manifest("done", "status")))
    for directory, field_name in ((ensemble, "members"), (results, "methods.cot.overall"), (traces, "status")):
        summary = inspect(directory)
        assert summary.status == CORRUPT and f"field {field_name!r}" in summary.detail and str(directory) in summary.detail
