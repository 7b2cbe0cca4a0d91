"""LLaVA importer: fixtures only (no LLaVA data set is in the shared pack)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medalign.data.importers import DatasetImportError, load_dataset
from medalign.data.validation import validate_manifest


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [
        {"from": "human", "value": f"<image>\n{question}"},
        {"from": "gpt", "value": answer},
        {"from": "human", "value": "Anything else?"},
        {"from": "gpt", "value": "No."},
    ]


RECORDS: list[dict[str, Any]] = [
    {"id": "b", "image": "pmc/b.jpg", "conversations": _turns("What modality?", "A chest CT scan.")},
    {"id": "a", "image": "pmc/a.jpg", "conversations": _turns("Describe the image.", "An axial brain MRI.")},
    {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
]


def make_llava(root: Path, records: list[dict[str, Any]] | None = None, name: str = "llava_med.json") -> Path:
    (root / name).write_text(json.dumps(RECORDS if records is None else records), encoding="utf-8")
    return root


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)


def test_llava_rows_text_and_conversation(tmp_path: Path) -> None:
    manifest = load_dataset("llava", make_llava(tmp_path), image_folder="images", split="train")
    table = manifest.table
    assert list(table.columns) == [
        "case_id",
        "patient_id",
        "split",
        "image",
        "text",
        "attr:question",
        "attr:conversation",
    ]
    assert table["case_id"].tolist() == ["b", "a", "t"]  # file order: LLaVA files are curated lists
    assert table["image"].tolist() == ["images/pmc/b.jpg", "images/pmc/a.jpg", ""]
    assert table["text"].tolist() == ["A chest CT scan.", "An axial brain MRI.", "Hello."]
    assert table["attr:question"].tolist() == ["What modality?", "Describe the image.", "Hi"]
    assert json.loads(table.iloc[0]["attr:conversation"]) == RECORDS[0]["conversations"]
    assert set(table["split"]) == {"train"}
    assert manifest.meta.extra["text_only_records"] == ["t"]
    assert manifest.meta.extra["annotation"] == "llava_med.json"


def test_llava_validation_flags_text_only_record(tmp_path: Path) -> None:
    root = make_llava(tmp_path)
    _image(root / "pmc" / "a.jpg")
    _image(root / "pmc" / "b.jpg")
    problems = validate_manifest(load_dataset("llava", root))
    assert [(p.case_id, p.severity) for p in problems if p.severity == "error"] == [("t", "error")]


def test_llava_default_split_is_seeded(tmp_path: Path) -> None:
    records = [{"id": f"r{i}", "image": f"{i}.png", "conversations": _turns("q", "a")} for i in range(20)]
    root = make_llava(tmp_path, records)
    first = load_dataset("llava", root).table["split"].tolist()
    assert first == load_dataset("llava", root).table["split"].tolist()
    assert sorted(set(first)) == ["test", "train", "val"]
    assert first.count("train") == 14


def test_llava_several_images_per_record(tmp_path: Path) -> None:
    records = [
        {"id": "m", "image": ["x/1.png", "x/2.png"], "conversations": _turns("Compare", "Larger now.")},
        {"id": "s", "image": "x/3.png", "conversations": _turns("What?", "CT.")},
    ]
    table = load_dataset("llava", make_llava(tmp_path, records)).table
    assert [c for c in table.columns if c.startswith("image")] == ["image:0", "image:1"]
    assert table["image:0"].tolist() == ["x/1.png", "x/3.png"]
    assert table["image:1"].tolist() == ["x/2.png", ""]


def test_llava_jsonl_and_named_annotation(tmp_path: Path) -> None:
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]), encoding="utf-8")
    (tmp_path / "other.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DatasetImportError, match=re.escape("found *.json/*.jsonl: other.json, qa.jsonl")):
        load_dataset("llava", tmp_path)
    assert len(load_dataset("llava", tmp_path, annotation="qa.jsonl").table) == 2


def test_llava_src_must_be_a_folder(tmp_path: Path) -> None:
    make_llava(tmp_path)
    with pytest.raises(DatasetImportError, match=re.escape("annotation='llava_med.json'")):
        load_dataset("llava", tmp_path / "llava_med.json")


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"id": "a"}, "expected a JSON list of records"),
        ([*RECORDS, {**RECORDS[1], "image": "other.jpg"}], "record 3: duplicate id 'a' (first at record 1)"),
        ([{"image": "a.jpg", "conversations": _turns("q", "a")}], "record 0: missing 'id'"),
        (
            [{"id": "a", "image": 5, "conversations": _turns("q", "a")}],
            "record 0: 'image' must be a path or a list",
        ),
        ([{"id": "a", "image": "a.jpg"}], "record 0: 'conversations' must be a non-empty list"),
        (
            [{"id": "a", "conversations": [{"from": "gpt"}]}],
            "record 0, turn 0: each turn needs string 'from' and 'value'",
        ),
        ([], "contains no records"),
    ],
)
def test_llava_broken_records(tmp_path: Path, records: Any, message: str) -> None:
    with pytest.raises(DatasetImportError, match=re.escape(message)):
        load_dataset("llava", make_llava(tmp_path, records))


def test_llava_bad_split_name(tmp_path: Path) -> None:
    with pytest.raises(DatasetImportError, match="split 'dev' is not one of"):
        load_dataset("llava", make_llava(tmp_path), split="dev")
