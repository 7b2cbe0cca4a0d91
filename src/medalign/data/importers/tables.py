"""Label tables and split files as users have them: CSV, TSV or XLSX, with or without a header.

Cells are read as text exactly as written (``007`` keeps its zeros, ``None`` stays the word
``None``), each row keeps the line (or spreadsheet row) it came from so that every message and
every entry of an import report can point at it, and columns are named by their header or, in
a header-less table, by their 1-based position (``1`` is the first column), as in ``cut -f``
and spreadsheets. Whether the first row is a header is the caller's decision (it needs the
image names to guess), made with :func:`looks_like_header`.
"""

from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medalign.data.importers.registry import DatasetImportError
from medalign.data.jsonio import read_text

DELIMITERS: dict[str, str | None] = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".txt": None}
EXCEL_SUFFIXES: tuple[str, ...] = (".xlsx", ".xlsm", ".xls")


@dataclass(frozen=True)
class TableRow:
    line: int  # 1-based line of a text file, or spreadsheet row
    cells: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    path: Path
    names: tuple[str, ...] | None  # header names; None for a header-less table
    rows: tuple[TableRow, ...]
    width: int

    def where(self, row: TableRow) -> str:
        unit = "row" if self.path.suffix.lower() in EXCEL_SUFFIXES else "line"
        return f"{self.path.name} {unit} {row.line}"

    def column(self, ref: str, option: str) -> int:
        """0-based index of a column given by header name or by 1-based position."""
        if self.names is not None and ref in self.names:
            return self.names.index(ref)
        if ref.isdigit() and 1 <= int(ref) <= self.width:
            return int(ref) - 1
        valid = list(self.names) if self.names is not None else [str(i + 1) for i in range(self.width)]
        close = difflib.get_close_matches(ref, valid, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        kind = "columns" if self.names is not None else "a header-less table: columns by position"
        raise DatasetImportError(
            f"{option} {ref!r} is not a column of '{self.path}'{hint}; {kind} {', '.join(valid)}"
        )

    def name(self, index: int) -> str:
        """A column's name for output columns: its header, or ``column<N>`` in a header-less table."""
        return self.names[index] if self.names is not None else f"column{index + 1}"

    def cell(self, row: TableRow, index: int) -> str:
        return row.cells[index] if index < len(row.cells) else ""


def read_rows(path: Path, sheet: str | None = None) -> list[TableRow]:
    """Non-blank rows of a CSV/TSV/TXT/XLSX file, every cell as stripped text."""
    if not path.is_file():
        raise DatasetImportError(f"table '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix in EXCEL_SUFFIXES:
        return _excel_rows(path, sheet)
    if suffix not in DELIMITERS:
        raise DatasetImportError(
            f"'{path}': unsupported table format {suffix or '(none)'!r}; use one of "
            f"{', '.join([*DELIMITERS, *EXCEL_SUFFIXES])}"
        )
    if sheet is not None:
        raise DatasetImportError(f"sheet={sheet!r} applies to spreadsheets, not to '{path}'")
    text = read_text(path, error=DatasetImportError)
    delimiter = DELIMITERS[suffix] or _sniff(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                rows.append(TableRow(reader.line_num, _trimmed(cells)))
    except csv.Error as err:
        raise DatasetImportError(f"'{path}' line {reader.line_num}: {err}") from err
    return rows


def _sniff(text: str) -> str:
    try:
        return csv.Sniffer().sniff(text[:4096], delimiters=",\t;|").delimiter
    except csv.Error:  # one column, or nothing to tell delimiters apart: commas
        return ","


def _excel_rows(path: Path, sheet: str | None) -> list[TableRow]:
    try:
        frame = pd.read_excel(path, header=None, dtype=str, keep_default_na=False, sheet_name=sheet or 0)
    except Exception as err:  # openpyxl/zipfile/xlrd raise their own types on a damaged or absent sheet
        raise DatasetImportError(f"cannot read '{path}': {type(err).__name__}: {err}") from err
    frame = frame.fillna("")
    rows = []
    for index, values in enumerate(frame.itertuples(index=False), 1):
        cells = _trimmed([str(v) for v in values])
        if cells:
            rows.append(TableRow(index, cells))
    return rows


def _trimmed(cells: list[str]) -> tuple[str, ...]:
    """Stripped cells without trailing empty ones (``a,b,`` is two cells: editors add the comma)."""
    stripped = [cell.strip() for cell in cells]
    while stripped and not stripped[-1]:
        stripped.pop()
    return tuple(stripped)


def looks_like_header(rows: list[TableRow], id_index: int, is_image: Callable[[str], bool]) -> bool:
    """Whether the first row names the columns: its id cell names no image while later rows' do,
    and none of its cells is a number (headers are words)."""

    def ident(row: TableRow) -> str:
        return row.cells[id_index] if id_index < len(row.cells) else ""

    if is_image(ident(rows[0])) or not any(is_image(ident(r)) for r in rows[1:]):
        return False
    return not any(_is_number(cell) for cell in rows[0].cells)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def make_table(path: Path, rows: list[TableRow], header: bool) -> Table:
    """A :class:`Table` from raw rows; with ``header`` the first row gives the column names."""
    if not rows:
        raise DatasetImportError(f"table '{path}' has no rows")
    if not header:
        return Table(path, None, tuple(rows), max(len(r.cells) for r in rows))
    names = rows[0].cells
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        raise DatasetImportError(f"'{path}' line {rows[0].line}: repeated column name(s) {repeated}")
    blank = [i + 1 for i, n in enumerate(names) if not n]
    if blank:
        raise DatasetImportError(
            f"'{path}' line {rows[0].line}: column(s) {blank} have no name in the header"
        )
    longer = next((r for r in rows[1:] if len(r.cells) > len(names)), None)
    if longer is not None:
        raise DatasetImportError(
            f"'{path}' line {longer.line}: {len(longer.cells)} cells but the header names {len(names)} columns"
        )
    return Table(path, tuple(names), tuple(rows[1:]), len(names))
