"""Reading text, JSON and JSON-lines files with errors that name the file (and the line).

Manifests and several importers read CSV, JSON and text lists; they share these readers so that a
missing file, bad UTF-8 (with its line and byte offset) or a broken line is reported the same way
everywhere. ``error`` is the exception class
the caller's users expect (``ManifestError``, ``DatasetImportError``); it must accept one message.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


_BOM = b"\xef\xbb\xbf"


def read_text(path: Path, *, error: type[Exception] = ValueError) -> str:
    """The UTF-8 text of a file (a leading byte-order mark dropped); bad bytes name line and offset.

    Decoding the whole file here, rather than inside a CSV parser, is what makes the offset the
    file's own (pandas reports it relative to an internal chunk).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"'{path}' does not exist")
    data = path.read_bytes()
    skip = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise error(f"'{path}' is not valid UTF-8 (line {line}, byte {offset}): {err.reason}") from err


def read_json(path: Path, *, error: type[Exception] = ValueError, hint: str = "") -> Any:
    """The parsed content of a JSON file; ``hint`` is appended to the "does not exist" message."""
    path = Path(path)
    if not path.is_file():
        raise error(f"'{path}' does not exist{hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"cannot parse '{path}': {err}") from err


def read_jsonl(path: Path, *, error: type[Exception] = ValueError) -> list[dict[str, Any]]:
    """One dict per non-blank line of a JSON-lines file; errors name the line (1-based, blanks counted).

    Lines are split on newlines only (``\\n``, ``\\r\\n``, ``\\r``), not on every character
    ``str.splitlines`` treats as a break, since JSON strings may hold U+2028 unescaped.
    """
    text = read_text(path, error=error)
    records = []
    for number, line in enumerate(_LINE_BREAK.split(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"'{path}' line {number}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise error(f"'{path}' line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
