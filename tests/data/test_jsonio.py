"""Shared JSON / JSON-lines readers: errors name the file and the line, and use the caller's class."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medalign.data.jsonio import read_json, read_jsonl


class CustomError(Exception):
    pass


def test_read_json_returns_content_and_names_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('{"x": [1, 2]}', encoding="utf-8")
    assert read_json(path) == {"x": [1, 2]}
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match=re.escape(f"'{missing}' does not exist (see the docs)")):
        read_json(missing, hint=" (see the docs)")
    with pytest.raises(ValueError, match=re.escape(f"'{tmp_path / 'gone.jsonl'}' does not exist")):
        read_jsonl(tmp_path / "gone.jsonl")


def test_read_json_bad_content_says_cannot_parse(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"cannot parse '{path}'")):
        read_json(path)
    path.write_bytes(b'{"x": "\xff"}')
    with pytest.raises(ValueError, match=re.escape(f"cannot parse '{path}'")):
        read_json(path)


def test_read_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n   \r\n{"a": "x\u2028y"}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": "x\u2028y"}]
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    assert read_jsonl(tmp_path / "empty.jsonl") == []


def test_read_jsonl_bad_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"'{path}' line 3: invalid JSON (")):
        read_jsonl(path)


def test_read_jsonl_non_object_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"'{path}' line 2: expected a JSON object, got list")):
        read_jsonl(path)


def test_read_jsonl_bad_utf8_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(ValueError, match=re.escape(f"'{path}' is not valid UTF-8 (line 2, byte 16)")):
        read_jsonl(path)


def test_custom_error_class_is_raised(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("nope\n", encoding="utf-8")
    with pytest.raises(CustomError, match="line 1: invalid JSON"):
        read_jsonl(path, error=CustomError)
    with pytest.raises(CustomError, match="does not exist"):
        read_json(tmp_path / "missing.json", error=CustomError)
    with pytest.raises(CustomError, match="cannot parse"):
        read_json(path, error=CustomError)
