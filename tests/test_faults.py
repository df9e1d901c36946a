"""Faults survived everywhere: a torn last JSONL line; a full disk and a read-only file system injected
into the one write path (sdrt_cli.io._write) give one sentence and lose nothing.  SIGKILL at seeded
points of every long command: tests/test_kill_resume_*.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import sdrt_cli.io as sdrt_io
from fault_helpers import (
    TRACE_ARGS,
    assert_same_adapters,
    assert_same_store,
    lines,
)
from sdrt_cli.errors import SdrtError
from sdrt_cli.io import read_jsonl
from sdrt_cli.trace_store import TraceStore

slow = pytest.mark.slow


# -- torn JSONL lines ------------------------------------------------------------------------------


@slow
def test_a_torn_progress_line_does_not_break_resume(cli, tmp_path):
    args = [*TRACE_ARGS, "--batch-size", "1"]
    clean = tmp_path / "clean"
    assert cli(*args, "--limit", "3", "--out", clean).exit_code == 0
    out = tmp_path / "torn"
    assert cli(*args, "--limit", "2", "--out", out).exit_code == 0
    progress = out / "progress" / "r000.jsonl"
    text = progress.read_bytes()
    progress.write_bytes(text[: text.rindex(b"\n", 0, len(text) - 1) + 20])  # the second commit cut mid-line
    resumed = cli(*args, "--limit", "3", "--out", out)
    assert resumed.exit_code == 0, resumed.output
    assert lines(progress) == 3 and len(read_jsonl(progress)) == 3  # re-traced example 1, then example 2
    assert_same_store(clean, out)
    assert len(TraceStore(out)) == 6


# -- readers verify what they read -----------------------------------------------------------------


@slow
def test_duplicate_records_and_miscounted_manifests_are_refused_naming_the_shard(cli, tmp_path):
    out = tmp_path / "store"
    assert cli(*TRACE_ARGS, "--limit", "2", "--batch-size", "1", "--out", out).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    first, second = manifest["shards"]
    # a second writer's copy of shard 0 listed again (what two unlocked writers produced)
    doubled = {**manifest, "shards": [first, second, {**first, "name": "r000-000002"}], "num_records": 6}
    for kind in first["sha256"]:  # the tensors, the records and (with the student baseline) the per-example answers
        shutil.copy(out / "shards" / f"r000-000000.{kind}", out / "shards" / f"r000-000002.{kind}")
    (out / "manifest.json").write_text(json.dumps(doubled))
    with pytest.raises(SdrtError, match=r"shards/r000-000002.jsonl repeats the record of example 0 and prompt '[\w-]+' already in shard r000-000000"):
        TraceStore(out)
    # its progress log listing the copy: a resume refuses instead of adding to it
    (out / "progress" / "r000.jsonl").write_text("".join(json.dumps(e) + "\n" for e in doubled["shards"]))
    resumed = cli(*TRACE_ARGS, "--limit", "3", "--batch-size", "1", "--out", out)
    assert resumed.exit_code == 1 and "shards/r000-000002 repeats example 0 of an earlier shard" in resumed.err
    # counts that disagree with the shards
    (out / "manifest.json").write_text(json.dumps({**manifest, "shards": [{**first, "records": 3}, second]}))
    with pytest.raises(SdrtError, match="shards/r000-000000.jsonl holds 2 records but manifest.json lists 3"):
        TraceStore(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "num_records": 5}))
    with pytest.raises(SdrtError, match="manifest.json counts 5 records but its shards hold 4"):
        TraceStore(out)


def test_a_writer_never_appends_a_record_the_store_holds(cli, tmp_path):
    from sdrt_cli.trace_store import TraceWriter

    out = tmp_path / "store"
    assert cli(*TRACE_ARGS, "--limit", "1", "--out", out).exit_code == 0
    store = TraceStore(out)
    writer = TraceWriter(out, store.fingerprint, is_main=False)
    writer.done_examples()
    with pytest.raises(SdrtError, match="already holds example 0; refusing to write it twice"):
        writer.write(list(store.records()))
    assert len(TraceStore(out)) == len(store)


# -- full disks, read-only file systems, files in the way -------------------------------------------


def fail_writes(monkeypatch, code: int, when=lambda path: True):
    """Make the project's single write path raise ``code`` for files that ``when(path)`` picks."""
    original = sdrt_io._write

    def write(fh, data, path):
        if when(Path(path)):
            raise OSError(code, os.strerror(code))
        original(fh, data, path)

    monkeypatch.setattr(sdrt_io, "_write", write)


@slow
def test_a_full_disk_while_writing_a_shard_is_one_sentence_and_the_store_resumes(cli, tmp_path, monkeypatch):
    args = [*TRACE_ARGS, "--limit", "3", "--batch-size", "1"]
    clean = tmp_path / "clean"
    assert cli(*args, "--out", clean).exit_code == 0
    out = tmp_path / "full"
    # the disk fills up while the second shard's tensors are written
    fail_writes(monkeypatch, errno.ENOSPC, lambda p: p.name == "r000-000001.safetensors")
    full = cli(*args, "--out", out)
    assert full.exit_code == 1 and "Traceback" not in full.output
    assert f"cannot write {out / 'shards' / 'r000-000001.safetensors'}: the disk is full (no space left on device)" in full.err
    assert "re-run the same command to continue" in full.err
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["r000-000000.jsonl", "r000-000000.safetensors", "r000-000000.students.jsonl"]  # no temp files
    monkeypatch.undo()
    assert cli(*args, "--out", out).exit_code == 0
    assert_same_store(clean, out)


@slow
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_one(cli, tmp_path, monkeypatch, tiny_trace_store):
    args = ["distill", "--traces", tiny_trace_store, "--epochs", "2", "--batch-size", "2", "--rank", "2", "--save-every", "1", "--resume"]
    clean = tmp_path / "clean"
    assert cli(*args, "--out", clean).exit_code == 0
    out = tmp_path / "full"
    fail_writes(monkeypatch, errno.ENOSPC, lambda p: "step-00000003" in str(p))
    full = cli(*args, "--out", out)
    assert full.exit_code == 1 and "Traceback" not in full.output
    assert f"cannot write {out / 'checkpoints' / 'step-00000003'}" in full.err and "the disk is full" in full.err
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"] == "step-00000002"
    monkeypatch.undo()
    assert cli(*args, "--out", out).exit_code == 0
    assert_same_adapters(clean, out)


@pytest.mark.parametrize("command", ["traces", "eval"])
def test_a_read_only_output_is_one_sentence(cli, tmp_path, monkeypatch, command):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fail_writes(monkeypatch, errno.EROFS)
    if command == "traces":
        result = cli(*TRACE_ARGS, "--limit", "1", "--out", out)
    else:
        result = cli("eval", "--backbone", "llava-next-tiny", "--dataset", "synthetic-charts", "--limit", "1", "--method", "prompt",
                     "--max-new-tokens", "2", "--out", out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot write {out}/" in result.err and "the file system is read-only; choose a writable output directory" in result.err
    assert (out / "keep.txt").read_text() == "mine"


def test_a_read_only_file_system_outside_the_write_helpers_is_one_sentence(cli, tmp_path, monkeypatch):
    # a raw OSError from a library call (here mkdir) still ends as one sentence, not a traceback
    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    result = cli(*TRACE_ARGS, "--limit", "1", "--out", tmp_path / "x")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot write {tmp_path / 'x'}: the file system is read-only" in result.err


@pytest.mark.parametrize("dataset", ["docvqa", "chartqa", "mmmu", "figureqa"])
def test_a_data_dir_that_is_a_file_is_one_sentence(cli, tmp_path, dataset):
    data = tmp_path / "data.txt"
    data.write_text("not a dataset")
    result = cli(*TRACE_ARGS[:3], "--dataset", dataset, "--data-dir", data, "--limit", "1", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(data) in result.err and result.err.count("Error:") == 1
    assert not (tmp_path / "o").exists()  # nothing was left behind
