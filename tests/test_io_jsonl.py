"""JSON-lines appends survive a kill mid-append: the torn last line is cut before the next append and
skipped by the reader; a damaged complete line is refused naming the file and line."""

from __future__ import annotations

import pytest

from sdrt_cli.errors import SdrtError
from sdrt_cli.io import append_jsonl, read_jsonl


def test_append_then_read_round_trips(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, {"index": 0, "text": "é"})
    append_jsonl(path, {"index": 1})
    assert read_jsonl(path) == [{"index": 0, "text": "é"}, {"index": 1}]


@pytest.mark.parametrize("torn", ['{"index": 1, "te', "{", "x" * 70000])
def test_a_torn_last_line_is_skipped_by_the_reader_and_cut_by_the_next_append(tmp_path, torn):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"index": 0})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(torn)  # a kill mid-append leaves a line without its newline
    assert read_jsonl(path) == [{"index": 0}]
    append_jsonl(path, {"index": 1})
    assert path.read_text(encoding="utf-8") == '{"index": 0}\n{"index": 1}\n'


def test_a_file_that_is_only_a_torn_line_starts_over(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"ind', encoding="utf-8")
    assert read_jsonl(path) == []
    append_jsonl(path, {"index": 2})
    assert read_jsonl(path) == [{"index": 2}]


def test_a_damaged_complete_line_is_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"index": 0}\nnot json\n{"index": 2}\n', encoding="utf-8")
    with pytest.raises(SdrtError, match=r"log\.jsonl is corrupt at line 2"):
        read_jsonl(path)
