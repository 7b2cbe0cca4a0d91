"""Accounting for an import: every item of every input is imported or listed with its reason.

An importer that joins several inputs (image files, mask files, the rows of a label table, a
split file) can lose items at every join. The :class:`Ledger` makes the loss impossible to
hide: each input declares how many items it has, each item is either used or skipped with a
reason, and :meth:`Ledger.report` refuses to produce a report whose numbers do not add up.
The report goes to the sidecar (``extra["import_report"]``) and :func:`format_report` prints it
after ``medalign data import``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

REPORT_KEY = "import_report"
SHOWN_PER_REASON = 5


@dataclass
class _Tally:
    label: str
    total: int
    used: int = 0
    skipped: int = 0


@dataclass
class Ledger:
    """Counts per input, the items left out (with reasons) and the rows imported incomplete."""

    inputs: dict[str, _Tally] = field(default_factory=dict)
    not_imported: list[dict[str, str]] = field(default_factory=list)
    incomplete: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_input(self, key: str, label: str, total: int) -> None:
        """Declare an input (``key`` for the code, ``label`` for people) with ``total`` items."""
        self.inputs[key] = _Tally(label, total)

    def use(self, key: str, count: int = 1) -> None:
        self.inputs[key].used += count

    def skip(self, key: str, item: str, reason: str) -> None:
        """An item of input ``key`` that is not in the manifest, and why."""
        self.inputs[key].skipped += 1
        self.not_imported.append({"input": self.inputs[key].label, "item": item, "reason": reason})

    def mark_incomplete(self, case_id: str, reason: str) -> None:
        """A row that is in the manifest without one of its parts (no mask, no label)."""
        self.incomplete.append({"case_id": case_id, "reason": reason})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def report(self, rows: int) -> dict[str, Any]:
        """The sidecar's report; raises if an input's items are not all accounted for."""
        for key, tally in self.inputs.items():
            if tally.used + tally.skipped != tally.total:
                raise RuntimeError(
                    f"import accounting bug: input {key!r} has {tally.total} items but "
                    f"{tally.used} were used and {tally.skipped} skipped"
                )
        return {
            "inputs": [
                {"input": t.label, "items": t.total, "imported": t.used, "not_imported": t.skipped}
                for t in self.inputs.values()
            ],
            "rows": rows,
            "not_imported": self.not_imported,
            "incomplete": self.incomplete,
            "notes": self.notes,
        }


def _by_reason(entries: list[Mapping[str, str]], item_key: str) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for entry in entries:
        grouped.setdefault(entry["reason"], []).append(entry[item_key])
    return grouped


def _reason_lines(entries: list[Mapping[str, str]], item_key: str) -> list[str]:
    lines = []
    for reason, items in _by_reason(entries, item_key).items():
        shown = ", ".join(items[:SHOWN_PER_REASON])
        more = f", ... ({len(items)} in all)" if len(items) > SHOWN_PER_REASON else ""
        lines.append(f"  {reason} ({len(items)}): {shown}{more}")
    return lines


def format_report(report: Mapping[str, Any]) -> list[str]:
    """The import summary for the terminal: counts per input, then what was left out and why."""
    lines = ["import summary:"]
    for entry in report["inputs"]:
        lines.append(
            f"  {entry['input']}: {entry['items']}, imported {entry['imported']}, "
            f"not imported {entry['not_imported']}"
        )
    incomplete = report["incomplete"]
    lines.append(
        f"  rows written: {report['rows']}" + (f" ({len(incomplete)} incomplete)" if incomplete else "")
    )
    lines += [f"  note: {note}" for note in report["notes"]]
    if report["not_imported"]:
        lines.append(
            f"not imported ({len(report['not_imported'])}; listed in the sidecar under {REPORT_KEY}):"
        )
        lines += _reason_lines(report["not_imported"], "item")
    if incomplete:
        lines.append(f"incomplete rows ({len(incomplete)}; imported, listed in the sidecar):")
        lines += _reason_lines(incomplete, "case_id")
    return lines
