"""utils/jsonl.py: crash-safe JSONL files (torn last line cut on open, whole fsynced lines, keyed resume)."""

from __future__ import annotations

import json
import os

import pytest

from utils import jsonl
from utils.jsonl import JsonlAppender, done_keys, key_of, line_refs, read_jsonl, read_keyed, write_jsonl


def test_a_torn_last_line_is_cut_on_open_and_appended_lines_start_fresh(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "resp', encoding="utf-8")
    with JsonlAppender(path) as out:
        assert path.read_text(encoding="utf-8") == '{"id": 1}\n{"id": 2}\n'
        out.append([{"id": 3, "response": "é"}])
    records, bad = read_jsonl(path)
    assert records == [{"id": 1}, {"id": 2}, {"id": 3, "response": "é"}] and bad == []
    assert "é" in path.read_text(encoding="utf-8")  # kept as is, not escaped


def test_a_file_of_only_a_torn_line_is_emptied_and_a_whole_file_is_untouched(tmp_path):
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"id": 1, "x', encoding="utf-8")
    JsonlAppender(torn).close()
    assert torn.read_bytes() == b""
    whole = tmp_path / "whole.jsonl"
    whole.write_text('{"id": 1}\n', encoding="utf-8")
    JsonlAppender(whole).close()
    assert whole.read_text(encoding="utf-8") == '{"id": 1}\n'
    JsonlAppender(tmp_path / "new.jsonl").close()  # a missing file is created
    assert (tmp_path / "new.jsonl").read_bytes() == b""


def test_each_append_is_whole_lines_flushed_then_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    seen = []
    real = os.fsync

    def fsync(fd):
        seen.append(path.read_text(encoding="utf-8"))  # what is in the file when fsync is asked for
        real(fd)

    monkeypatch.setattr(jsonl.os, "fsync", fsync)
    with JsonlAppender(path) as out:
        out.append([{"id": 1}, {"id": 2}])
        out.append([])  # nothing to write: no fsync either
        out.append(iter([{"id": 3}]))
    assert seen == ['{"id": 1}\n{"id": 2}\n', '{"id": 1}\n{"id": 2}\n{"id": 3}\n']


def test_bad_lines_are_reported_with_their_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1}\n\nnot json\n[1, 2]\n{"id": 2\n', encoding="utf-8")
    records, bad = read_jsonl(path)
    assert records == [{"id": 1}, [1, 2]]
    assert bad == [3, 5]  # blank line 2 is neither a record nor bad
    assert line_refs("a.jsonl", bad) == "a.jsonl:3, a.jsonl:5"
    assert line_refs("f", list(range(1, 13)), limit=2) == "f:1, f:2, ..."


def test_resume_keys_come_from_every_file_and_skip_torn_and_foreign_lines(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "a.jsonl.partial"
    first.write_text('{"id": 1, "v": "old"}\n{"id": "1"}\n{"no_id": true}\n', encoding="utf-8")
    second.write_text(json.dumps({"id": 1, "v": "new"}) + "\n" + '{"id": 7, "v"', encoding="utf-8")
    done = read_keyed([first, second, tmp_path / "missing.jsonl"])
    assert set(done) == {key_of(1), key_of("1")}  # 1 and "1" are different rows; the torn id 7 is not done
    assert done[key_of(1)]["v"] == "new"  # a later file's record wins
    assert done_keys([first]) == {key_of(1), key_of("1")}
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\n")
    assert read_keyed([tmp_path / "binary.jsonl"]) == {}
    assert done_keys([first], key="no_id") == {key_of(True)}


def test_write_jsonl_replaces_the_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n", encoding="utf-8")
    write_jsonl(path, [{"id": 1}, {"id": 2}])
    assert read_jsonl(path) == ([{"id": 1}, {"id": 2}], [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(jsonl.os, "replace", fail)
    with pytest.raises(OSError):
        write_jsonl(path, [{"id": 3}])
    assert read_jsonl(path)[0] == [{"id": 1}, {"id": 2}]  # the old file is whole until the rename
