"""Conversations for instruction tuning: phantom closed questions, report sections, LLaVA rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medalign.data.conversations import conversation_rows, phantom_questions, report_sections, turns_of
from medalign.data.manifest import Manifest, ManifestMeta, read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom


def test_phantom_questions_answer_from_the_true_attributes() -> None:
    attrs = {"count": "2", "side": "bilateral", "zone": "lower;upper", "type": "cyst", "size": "large"}
    asked = {(kind, q): (a, options) for kind, q, a, options in phantom_questions(attrs, "benign")}
    answers = {q: a for (_, q), (a, _) in asked.items()}
    assert answers["How many lesions are there?"] == "two"
    assert answers["Is there a lesion in the upper zone?"] == "yes"
    assert answers["Is there a lesion in the middle zone?"] == "no"
    assert answers["What is the diagnosis: normal, benign or malignant?"] == "benign"
    assert all(a in options for a, options in asked.values())  # every answer is one of its options


def test_phantom_manifest_gives_one_row_per_question_in_the_case_split(tmp_path: Path) -> None:
    manifest = read_manifest(generate_phantom(tmp_path, PhantomConfig(n=6, size=64)))
    rows, summary = conversation_rows(manifest, "auto")
    assert summary["source"] == "phantom" and len(rows) == 6 * 6
    first = rows.table[rows.table["case_id"].str.startswith("ph0000/")]
    assert set(first["split"]) == set(manifest.table.loc[manifest.table.case_id == "ph0000", "split"])
    assert set(first["attr:kind"]) == {"count", "side", "zone", "diagnosis"}
    conversations = [turns_of(c, "row") for c in first["attr:conversation"]]
    assert all([t["from"] for t in turns] == ["human", "gpt"] * 6 for turns in conversations)
    # each row asks its own question first, and the same six questions in all
    assert len({turns[0]["value"] for turns in conversations}) == 6
    assert len({frozenset(t["value"] for t in turns[::2]) for turns in conversations}) == 1


def test_report_sections_become_questions_and_plain_text_a_caption() -> None:
    text = "Findings: a small cyst on the left. Impression: benign."
    assert report_sections(text) == [("findings", "a small cyst on the left."), ("impression", "benign.")]
    table = pd.DataFrame({"case_id": ["x", "y"], "text": [text, "An axial CT."], "image": ["x.png", "y.png"]})
    rows, _ = conversation_rows(Manifest(table, Path("."), ManifestMeta()), "report")
    assert rows.table["case_id"].tolist() == ["x/0", "x/1", "y"]
    assert rows.table["attr:kind"].tolist() == ["findings", "impression", "caption"]


def test_llava_rows_keep_their_conversation_and_yes_no_is_closed() -> None:
    closed = json.dumps(
        [{"from": "human", "value": "<image>\nIs it normal?"}, {"from": "gpt", "value": "Yes."}]
    )
    table = pd.DataFrame({"case_id": ["a"], "image": ["a.png"], "attr:conversation": [closed]})
    rows, _ = conversation_rows(Manifest(table, Path("."), ManifestMeta()), "auto")
    assert rows.table.iloc[0]["attr:kind"] == "closed" and rows.table.iloc[0]["attr:options"] == "yes|no"
    broken = pd.DataFrame({"case_id": ["b"], "image": ["b.png"], "attr:conversation": ["{not json"]})
    with pytest.raises(ValueError, match="case 'b': attr:conversation is not JSON"):
        conversation_rows(Manifest(broken, Path("."), ManifestMeta()), "llava")
