"""R2Gen importer: both annotation variants, broken files, and the real IU X-ray reports."""

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


def _study(study: str, report: str, n_images: int = 2, split: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": study,
        "report": report,
        "image_path": [f"{study}/{i}.png" for i in range(n_images)],
    }
    if split is not None:
        entry["split"] = split
    return entry


def make_r2gen(root: Path, *, with_images: bool = False) -> Path:
    """R2Gen's own layout: ids ``CXR####_IM-####``, images under ``images/<id>/<n>.png``."""
    data = {
        "train": [
            _study("CXR2_IM-0002", "Heart size normal.", split="train"),
            _study("CXR1_IM-0001", "No acute disease.", 3, split="train"),
        ],
        "val": [_study("CXR3_IM-0003", "", 1, split="val")],
        "test": [_study("CXR4_IM-0004", "Small effusion.", split="test")],
    }
    (root / "annotation.json").write_text(json.dumps(data), encoding="utf-8")
    if with_images:
        for entries in data.values():
            for entry in entries:
                for image in entry["image_path"]:
                    path = root / "images" / image
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)
    return root


def test_r2gen_fixture_columns_splits_and_paths(tmp_path: Path) -> None:
    manifest = load_dataset("r2gen", make_r2gen(tmp_path))
    table = manifest.table
    assert list(table.columns) == [
        "case_id",
        "patient_id",
        "split",
        "image:frontal",
        "image:lateral",
        "text",
        "attr:extra_images",
        "attr:n_images",
    ]
    assert table["case_id"].tolist() == ["CXR2_IM-0002", "CXR1_IM-0001", "CXR3_IM-0003", "CXR4_IM-0004"]
    assert table["patient_id"].tolist() == ["CXR2", "CXR1", "CXR3", "CXR4"]
    assert table["split"].tolist() == ["train", "train", "val", "test"]
    row = table.iloc[1]
    assert row["image:frontal"] == "images/CXR1_IM-0001/0.png"
    assert row["image:lateral"] == "images/CXR1_IM-0001/1.png"
    assert row["attr:extra_images"] == "images/CXR1_IM-0001/2.png"
    assert table.iloc[2]["image:lateral"] == ""
    assert manifest.meta.text_only is False
    assert manifest.meta.extra["empty_reports"] == ["CXR3_IM-0003"]


def test_r2gen_images_dir_and_text_only(tmp_path: Path) -> None:
    root = make_r2gen(tmp_path)
    manifest = load_dataset("r2gen", root, images_dir="iu_xray/images", text_only=True)
    assert manifest.table.iloc[0]["image:frontal"] == "iu_xray/images/CXR2_IM-0002/0.png"
    assert manifest.meta.text_only is True


def test_r2gen_validation_missing_images_and_empty_report(tmp_path: Path) -> None:
    root = make_r2gen(tmp_path)
    missing = [p for p in validate_manifest(load_dataset("r2gen", root)) if p.severity == "error"]
    assert len(missing) == 7  # every referenced view
    assert all("does not exist" in p.reason for p in missing)
    text_only = validate_manifest(load_dataset("r2gen", root, text_only=True))
    assert [(p.case_id, p.column) for p in text_only if p.severity == "error"] == [("CXR3_IM-0003", "text")]
    (tmp_path / "full").mkdir()
    present = validate_manifest(load_dataset("r2gen", make_r2gen(tmp_path / "full", with_images=True)))
    assert [p for p in present if p.severity == "error"] == []


def test_r2gen_derived_variant_bare_file_names(tmp_path: Path) -> None:
    """The variant with numeric ids and bare file names (this pack's IU X-ray)."""
    data = {
        "train": [{"id": "12", "report": "Clear.", "image_path": ["CXR12_IM-0100-1001.png"]}],
        "val": [],
        "test": [],
    }
    (tmp_path / "annotation.json").write_text(json.dumps(data), encoding="utf-8")
    row = load_dataset("r2gen", tmp_path).table.iloc[0]
    assert (row["case_id"], row["patient_id"], row["image:frontal"]) == (
        "12",
        "CXR12",
        "images/CXR12_IM-0100-1001.png",
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected {"),
        ({"training": []}, "unknown split key(s) ['training']"),
        ({"train": {"id": "a"}}, "['train'] should be a list of studies"),
        ({"train": [{"report": "x"}]}, "['train'][0]: expected an object with 'id'"),
        (
            {"train": [_study("A", "x")], "test": [_study("A", "y")]},
            "['test'][0]: id 'A' already used at ['train'][0]",
        ),
        ({"val": [_study("A", "x", split="train")]}, "entry says split 'train' but is listed under 'val'"),
        ({"train": [{"id": "A", "report": "x", "image_path": 3}]}, "'image_path' must be a list of paths"),
        ({"train": [{"id": "A", "report": None, "image_path": []}]}, "'report' must be a string"),
    ],
)
def test_r2gen_broken_annotation(tmp_path: Path, data: Any, message: str) -> None:
    (tmp_path / "annotation.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DatasetImportError, match=re.escape(message)):
        load_dataset("r2gen", tmp_path)


def test_r2gen_missing_annotation(tmp_path: Path) -> None:
    with pytest.raises(DatasetImportError, match=re.escape("annotation.json' does not exist")):
        load_dataset("r2gen", tmp_path)


@pytest.mark.realdata
def test_r2gen_real_iu_xray_reports(real_dataset: Any) -> None:
    root = real_dataset("iu_xray_reports")
    manifest = load_dataset("r2gen", root)
    table = manifest.table
    assert table["split"].value_counts().to_dict() == {"train": 3062, "val": 382, "test": 382}
    assert table["case_id"].is_unique
    assert table["patient_id"].str.fullmatch(r"CXR\d+").all()
    assert (table["text"] != "").all()
    assert "empty_reports" not in manifest.meta.extra
    # the pack ships reports only: every referenced view is reported missing
    errors = [p for p in validate_manifest(manifest) if p.severity == "error"]
    assert errors and all("does not exist" in p.reason for p in errors)
    assert {p.column for p in errors} == {"image:frontal", "image:lateral"}
    text_only = load_dataset("r2gen", root, text_only=True)
    assert [p for p in validate_manifest(text_only) if p.severity == "error"] == []
