"""`gpt2lab.fileio`: the line reader (lines split on "\\n" only, one "FILE:LINE: problem" message format)
and the atomic file writer."""

from __future__ import annotations

import errno
import json
import os

import pytest

from gpt2lab.errors import UserError
from gpt2lab.fileio import (
    LineError,
    atomic_file,
    iter_jsonl,
    iter_lines,
    read_text,
    str_field,
    str_field_problem,
    write_atomic,
)

SEPARATORS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"  # all cut by str.splitlines(), none by a JSONL reader


def test_iter_lines_splits_on_newline_only(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(f"\ufeffa{SEPARATORS}b\r\n\nlast".encode())
    assert list(iter_lines(path)) == [(1, f"a{SEPARATORS}b"), (2, ""), (3, "last")]
    path.write_bytes(b"one\ntwo\n\n")  # the final "\n" ends a line; it does not start another
    assert list(iter_lines(path)) == [(1, "one"), (2, "two"), (3, "")]


def test_iter_jsonl_numbers_records_and_skips_blank_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    records = [{"text": f"x{SEPARATORS}y"}, {"text": "z"}]
    path.write_text(json.dumps(records[0], ensure_ascii=False) + "\n  \n" + json.dumps(records[1]) + "\r\n")
    assert list(iter_jsonl(path)) == [(1, records[0]), (3, records[1])]


@pytest.mark.parametrize("content, message", [
    (b'{"a": 1}\n{"a": \n', "r.jsonl:2: invalid JSON at column 7: Expecting value"),
    (b'{"a": 1}\n\n[1, 2]\n', "r.jsonl:3: expected a JSON object, got array"),
    (b'{"a": 1}\n"text"\n', "r.jsonl:2: expected a JSON object, got string"),
    (b'{"a": 1}\n{"a": "caf\xe9"}\n', r"r.jsonl:2: not UTF-8 text \(byte offset 19\); convert the file to UTF-8"),
])
def test_every_bad_line_is_file_colon_line(tmp_path, content, message):
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    with pytest.raises(LineError, match=message) as err:
        list(iter_jsonl(path))
    assert str(err.value).startswith(f"{path}:") and "\n" not in str(err.value)


def test_invalid_lines_can_be_collected_instead(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{oops\n[]\n{"a": 2}\n')
    bad: list[LineError] = []
    assert list(iter_jsonl(path, bad.append)) == [(1, {"a": 1}), (4, {"a": 2})]
    assert [(e.line, e.problem) for e in bad] == [
        (2, "invalid JSON at column 2: Expecting property name enclosed in double quotes"),
        (3, "expected a JSON object, got array"),
    ]


def test_string_fields(tmp_path):
    assert str_field({"text": "hi"}, "text", "f.jsonl", 4) == "hi"
    with pytest.raises(LineError, match=r"^f.jsonl:4: missing 'text'; pass --text-field NAME$"):
        str_field({"body": "hi"}, "text", "f.jsonl", 4, fix="pass --text-field NAME")
    with pytest.raises(LineError, match=r"^f.jsonl:5: field 'text' must be a string, got number$"):
        str_field({"text": 3}, "text", "f.jsonl", 5)
    assert str_field_problem({"text": None}, "text") == "field 'text' must be a string, got null"
    assert str_field_problem({"input": None}, "input", optional=True) is None
    assert str_field_problem({}, "input", optional=True) is None
    assert str_field_problem({"input": True}, "input", optional=True) == "field 'input' must be a string, got boolean"


def test_read_text_names_the_line_of_a_bad_byte(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"ok\nok\n\xff\n")
    with pytest.raises(LineError, match=r"t.txt:3: not UTF-8 text \(byte offset 6\)"):
        read_text(path)
    with pytest.raises(UserError, match=r"cannot read .*missing.txt"):
        read_text(tmp_path / "missing.txt")


def test_write_atomic_replaces_the_file_with_the_modes_of_a_plain_open(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("old")
    old_mask = os.umask(0o027)
    try:
        write_atomic(path, "new \u00e9")
        assert path.read_text(encoding="utf-8") == "new \u00e9" and (path.stat().st_mode & 0o777) == 0o640
        write_atomic(path, b"\x00\x01")
        assert path.read_bytes() == b"\x00\x01"
    finally:
        os.umask(old_mask)
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="stop"), atomic_file(path) as f:
        f.write("half")
        raise RuntimeError("stop")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_the_run_config_on_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    """save_yaml wrote `.config.yaml.tmp` and renamed it: a full disk raised a bare OSError and left
    the temporary file beside the run's config (two writers also shared that one name)."""
    from gpt2lab.config import RunConfig
    from gpt2lab.configparse import save_yaml

    path = tmp_path / "config.yaml"
    path.write_text("name: earlier\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"^no space left on device writing .*config.yaml \(.* free\)"):
        save_yaml(RunConfig(), path)
    assert path.read_text() == "name: earlier\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
