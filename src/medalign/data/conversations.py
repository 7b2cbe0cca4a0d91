"""Conversations for visual instruction tuning, built from any manifest.

Every source ends as the same thing: a manifest with one row per conversation whose
``attr:conversation`` holds the turns as JSON (LLaVA's ``[{"from", "value"}, ...]``), the
format the ``llava`` importer writes. A row keeps its case's images, patient and split, so
patient-level splits hold; ``case_id`` becomes ``<case>/<k>`` when a case gives several
conversations. ``attr:kind`` says what a conversation asks (``caption``, a report section, a
phantom attribute, ``open``) and ``attr:options`` lists the allowed answers of a closed
question ("|"-joined; empty for open questions), which is how evaluation scores it.

Sources (``conversation_rows(manifest, source)``):

* ``llava``: the ``attr:conversation`` already there (the ``llava`` importer's column);
* ``caption``: "Describe this image." -> the case's ``text``;
* ``report``: each section of a report ("Findings: ...", "Impression: ...") as a question and
  its answer; a report without known headings becomes a caption;
* ``phantom``: closed questions with known answers from the phantom's attributes: the lesion
  count, the side, whether each zone holds a lesion (yes/no) and the diagnosis. One row per
  question, which the row asks first (``attr:kind``/``attr:options`` describe it, evaluation
  asks only it); the case's other questions follow as further turns, so a training step
  teaches six answers per image encoded instead of one (the image is the step's main cost).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pandas as pd

from medalign.data.manifest import Manifest

SOURCES = ("auto", "llava", "caption", "report", "phantom")
CAPTION_QUESTION = "Describe this image."
SECTION_HEADINGS = (
    "history", "indication", "technique", "comparison", "findings", "impression", "conclusion",
    "diagnosis", "discussion", "caption",
)  # fmt: skip
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
YES_NO = ("yes", "no")

Question = tuple[str, str, str, tuple[str, ...]]  # (kind, question, answer, options)


def phantom_questions(attrs: dict[str, str], label: str) -> list[Question]:
    """Closed questions about one phantom case, answered from its true attributes."""
    from medalign.data.phantom import DIAGNOSES, ZONES

    count = int(attrs["count"])
    zones = set(attrs["zone"].split(";"))
    questions: list[Question] = [
        ("count", "How many lesions are there?", NUMBER_WORDS[count], NUMBER_WORDS[:4]),
        ("side", "On which side are the lesions: left, right, bilateral or none?", attrs["side"],
         ("none", "left", "right", "bilateral")),
    ]  # fmt: skip
    for zone in ZONES:
        answer = "yes" if zone in zones else "no"
        questions.append(("zone", f"Is there a lesion in the {zone} zone?", answer, YES_NO))
    if label:
        questions.append(
            ("diagnosis", "What is the diagnosis: normal, benign or malignant?", label, DIAGNOSES)
        )
    return questions


def report_sections(text: str) -> list[tuple[str, str]]:
    """``(heading, body)`` for each known section heading of a report ("Findings: ...")."""
    pattern = re.compile(r"\b(" + "|".join(SECTION_HEADINGS) + r")\s*:", re.IGNORECASE)
    marks = list(pattern.finditer(text))
    sections = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[mark.end() : end].strip()
        if body:
            sections.append((mark.group(1).lower(), body))
    return sections


def _turns(question: str, answer: str, *more: tuple[str, str]) -> str:
    """LLaVA's JSON turns: the question and its answer, then any further (question, answer) pairs."""
    pairs = [(question, answer), *more]
    return json.dumps(
        [turn for q, a in pairs for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    )


def _caption(row: pd.Series) -> list[tuple[str, str, str]]:
    text = str(row.get("text", "")).strip()
    return [("caption", _turns(CAPTION_QUESTION, text), "")] if text else []


def _report(row: pd.Series) -> list[tuple[str, str, str]]:
    sections = report_sections(str(row.get("text", "")))
    if not sections:
        return _caption(row)
    return [(heading, _turns(f"What is the {heading}?", body), "") for heading, body in sections]


def _phantom(row: pd.Series) -> list[tuple[str, str, str]]:
    attrs = {c.split(":", 1)[1]: str(row[c]) for c in row.index if c.startswith("attr:")}
    missing = [k for k in ("count", "side", "zone") if k not in attrs]
    if missing:
        raise ValueError(
            f"case {row['case_id']!r}: phantom conversations need attr:{missing[0]} (a phantom manifest)"
        )
    asked = phantom_questions(attrs, str(row.get("label", "")))
    rows = []
    for k, (kind, question, answer, options) in enumerate(asked):
        others = [(q, a) for j, (_, q, a, _) in enumerate(asked) if j != k]
        rows.append((kind, _turns(question, answer, *others), "|".join(options)))
    return rows


def _llava(row: pd.Series) -> list[tuple[str, str, str]]:
    text = str(row.get("attr:conversation", ""))
    turns = turns_of(text, f"case {row['case_id']!r}")
    answer = next((str(t.get("value", "")) for t in turns if t.get("from") in ("gpt", "assistant")), "")
    closed = answer.strip().lower().rstrip(".") in YES_NO
    return [("closed" if closed else "open", text, "|".join(YES_NO) if closed else "")]


BUILDERS: dict[str, Callable[[pd.Series], list[tuple[str, str, str]]]] = {
    "llava": _llava,
    "caption": _caption,
    "report": _report,
    "phantom": _phantom,
}


def resolve_source(manifest: Manifest, source: str) -> str:
    """``auto``: LLaVA conversations when present, phantom questions on the phantom, else captions."""
    if source not in SOURCES:
        raise ValueError(f"conversations must be one of {SOURCES}, got {source!r}")
    if source != "auto":
        return source
    if "attr:conversation" in manifest.table.columns:
        return "llava"
    return "phantom" if manifest.meta.source == "phantom" else "caption"


def conversation_rows(manifest: Manifest, source: str) -> tuple[Manifest, dict[str, Any]]:
    """One row per conversation; and a summary (source, rows per split, cases that gave none)."""
    source = resolve_source(manifest, source)
    build = BUILDERS[source]
    rows, empty = [], []
    for _, row in manifest.table.iterrows():
        made = build(row)
        if not made:
            empty.append(str(row["case_id"]))
        for k, (kind, turns, options) in enumerate(made):
            new = row.copy()
            if len(made) > 1:
                new["case_id"] = f"{row['case_id']}/{k}"
            new["attr:conversation"], new["attr:kind"], new["attr:options"] = turns, kind, options
            rows.append(new)
    if not rows:
        raise ValueError(f"no conversation could be built from the manifest with source {source!r}")
    table = pd.DataFrame(rows).reset_index(drop=True)
    summary: dict[str, Any] = {"source": source, "n_rows": len(table)}
    if "split" in table.columns:
        summary["rows_per_split"] = {str(k): int(v) for k, v in table["split"].value_counts().items()}
    if empty:
        summary["cases_without_conversation"] = len(empty)
        summary["cases_without_conversation_examples"] = empty[:10]
    return Manifest(table, manifest.base_dir, manifest.meta), summary


def turns_of(value: str, where: str) -> list[dict[str, str]]:
    """The turns stored in an ``attr:conversation`` cell; ``where`` names the row in errors."""
    try:
        turns = json.loads(value)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: attr:conversation is not JSON: {err}") from err
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "value" in t for t in turns):
        raise ValueError(f"{where}: attr:conversation must be a list of {{from, value}} turns")
    return turns
