"""MedPix 2.0 importer: a hand-built release layout, broken layouts, and the real pack."""

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


def _describe(
    image: str, case: str, kind: str, plane: str | None, region: str, caption: str
) -> dict[str, Any]:
    return {
        "Type": kind,
        "U_id": case,
        "image": image,
        "Description": {
            "ACR Codes": "1.2",
            "Age": "40",
            "Caption": caption,
            "Figure Part": None,
            "Modality": f"{kind} - noncontrast",
            "Plane": plane,
            "Sex": "female",
        },
        "Location": "Brain and Neuro",
        "Location Category": region,
    }


def _case(uid: str, ct: list[str], mr: list[str], findings: str, diagnosis: str) -> dict[str, Any]:
    return {
        "U_id": uid,
        "TAC": ct,
        "MRI": mr,
        "Case": {
            "Title": diagnosis,
            "History": "headache",
            "Findings": findings,
            "Case Diagnosis": diagnosis,
        },
        "Topic": {"Title": diagnosis, "Category": "Neoplasm", "ACR Code": "1.3"},
    }


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _image(path: Path) -> None:
    Image.fromarray(np.full((8, 8), 100, dtype=np.uint8)).save(path)


def make_medpix(root: Path) -> Path:
    """Three cases; one image only in PNG, one in both formats, one on disk but undescribed,
    one described but missing, one described but in no split file."""
    descriptions = [
        _describe("MPX2_synpic3", "MPX2", "MR", "Coronal", "Head", "Mass in the left frontal lobe."),
        _describe("MPX1_synpic1", "MPX1", "CT", "Axial", "Thorax", "Nodule in the right upper lobe."),
        _describe("MPX1_synpic2", "MPX1", "CT", None, "Thorax", "Same nodule, lung window."),
        _describe("MPX3_synpic4", "MPX3", "MR", "Sagittal", "Spine and Muscles", "Disc herniation."),
        _describe("MPX3_synpic5", "MPX3", "MR", "Axial", "Spine and Muscles", "Missing file."),
    ]
    cases = [
        _case("MPX1", ["MPX1_synpic1", "MPX1_synpic2"], [], "Spiculated nodule.", "Lung cancer"),
        _case("MPX2", [], ["MPX2_synpic3"], "Enhancing mass.", "Glioma"),
        _case("MPX3", [], ["MPX3_synpic4", "MPX3_synpic5"], "L4-L5 protrusion.", "Disc herniation"),
    ]
    (root / "Descriptions.json").write_text(json.dumps(descriptions), encoding="utf-8")
    (root / "Case_topic.json").write_text(json.dumps(cases), encoding="utf-8")
    images = root / "images"
    images.mkdir()
    _image(images / "MPX1_synpic1.jpg")
    _image(images / "MPX1_synpic2.png")
    _image(images / "MPX2_synpic3.jpg")
    _image(images / "MPX2_synpic3.png")
    _image(images / "MPX3_synpic4.jpg")
    _image(images / "MPX9_synpic9.jpg")  # not described anywhere
    splits = root / "splitted_dataset"
    splits.mkdir()
    _write_jsonl(splits / "descriptions_train.jsonl", [descriptions[1], descriptions[2]])
    _write_jsonl(splits / "descriptions_train_1.jsonl", [descriptions[1]])
    _write_jsonl(splits / "descriptions_train_2.jsonl", [descriptions[2]])
    _write_jsonl(splits / "descriptions_dev.jsonl", [descriptions[0]])
    _write_jsonl(splits / "descriptions_test.jsonl", [])
    _write_jsonl(splits / "data_train.jsonl", [cases[0]])
    _write_jsonl(splits / "data_dev.jsonl", [cases[1]])
    return root


def test_medpix_fixture_rows_labels_and_paths(tmp_path: Path) -> None:
    manifest = load_dataset("medpix", make_medpix(tmp_path))
    table = manifest.table.set_index("case_id")
    assert list(table.index) == sorted(table.index)
    assert list(table.index) == [
        "MPX1_synpic1",
        "MPX1_synpic2",
        "MPX2_synpic3",
        "MPX3_synpic4",
        "MPX3_synpic5",
    ]
    assert {
        "image",
        "text",
        "label:modality",
        "label:plane",
        "label:region",
        "attr:findings",
        "attr:diagnosis",
    } <= set(manifest.table.columns)
    assert table.loc["MPX1_synpic1", "image"] == "images/MPX1_synpic1.jpg"
    assert table.loc["MPX2_synpic3", "image"] == "images/MPX2_synpic3.png"  # release format wins
    assert table.loc["MPX3_synpic5", "image"] == "images/MPX3_synpic5.png"  # missing: kept, named
    assert table["patient_id"].tolist() == ["MPX1", "MPX1", "MPX2", "MPX3", "MPX3"]
    assert table["split"].tolist() == ["train", "train", "val", "train", "train"]
    assert table.loc["MPX1_synpic1", "text"] == "Nodule in the right upper lobe."
    assert table.loc["MPX1_synpic2", "attr:findings"] == "Spiculated nodule."
    assert table.loc["MPX2_synpic3", "attr:diagnosis"] == "Glioma"
    assert table.loc["MPX1_synpic1", "attr:subsplit"] == "train_1"
    assert table.loc["MPX1_synpic2", "label:plane"] == ""
    assert manifest.meta.classes == {
        "label:modality": ["CT", "MR"],
        "label:plane": ["Axial", "Coronal", "Sagittal"],
        "label:region": ["Head", "Spine and Muscles", "Thorax"],
    }
    extra = manifest.meta.extra
    assert extra["unsplit_images_assigned_train"] == ["MPX3_synpic4", "MPX3_synpic5"]
    assert extra["images_without_description"] == ["images/MPX9_synpic9.jpg"]
    assert extra["missing_labels"] == {"label:plane": ["MPX1_synpic2"]}


def test_medpix_fixture_validation_names_the_missing_image(tmp_path: Path) -> None:
    problems = validate_manifest(load_dataset("medpix", make_medpix(tmp_path)))
    errors = [p for p in problems if p.severity == "error"]
    assert [(p.case_id, p.column) for p in errors] == [("MPX3_synpic5", "image")]
    assert "does not exist" in errors[0].reason


def test_medpix_without_split_folder_splits_by_case(tmp_path: Path) -> None:
    root = make_medpix(tmp_path)
    for path in (root / "splitted_dataset").iterdir():
        path.unlink()
    (root / "splitted_dataset").rmdir()
    table = load_dataset("medpix", root).table
    assert set(table["split"]) <= {"train", "val", "test"}
    assert table.groupby("patient_id")["split"].nunique().max() == 1


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda r: (r / "Descriptions.json").unlink(), "Descriptions.json' does not exist"),
        (lambda r: (r / "Case_topic.json").write_text("{not json", encoding="utf-8"), "cannot parse"),
        (
            lambda r: (r / "Descriptions.json").write_text('{"a": 1}', encoding="utf-8"),
            "expected a JSON list",
        ),
        (
            lambda r: (r / "Descriptions.json").write_text(json.dumps([{"image": "x"}]), encoding="utf-8"),
            "entry 0: missing 'image' or 'U_id'",
        ),
        (
            lambda r: (r / "Descriptions.json").write_text(
                json.dumps([_describe("A_1", "A", "CT", "Axial", "Head", "x")] * 2), encoding="utf-8"
            ),
            "entry 1: image 'A_1' is described twice (first at entry 0)",
        ),
        (
            lambda r: _write_jsonl(
                r / "splitted_dataset" / "descriptions_test.jsonl",
                [{"image": "MPX1_synpic1", "U_id": "MPX1"}],
            ),
            "image 'MPX1_synpic1' is in split",
        ),
    ],
)
def test_medpix_broken_layouts_name_the_problem(tmp_path: Path, breakage: Any, message: str) -> None:
    root = make_medpix(tmp_path)
    breakage(root)
    with pytest.raises(DatasetImportError, match=re.escape(message)):
        load_dataset("medpix", root)


@pytest.mark.realdata
def test_medpix_real_pack(real_dataset: Any) -> None:
    manifest = load_dataset("medpix", real_dataset("medpix-2"))
    table = manifest.table
    assert len(table) == 2050
    assert table["case_id"].is_unique
    assert table["patient_id"].nunique() == 671
    assert table["split"].value_counts().to_dict() == {"train": 1653, "val": 197, "test": 200}
    assert table.groupby("patient_id")["split"].nunique().max() == 1  # case-disjoint
    assert (table["text"] != "").all()
    assert manifest.meta.classes["label:modality"] == ["CT", "MR"]
    assert len(manifest.meta.classes["label:region"]) == 5
    assert "Axial" in manifest.meta.classes["label:plane"]
    assert table["image"].str.match(r"images/MPX\d+_synpic\d+\.jpg$").all()
    assert "unsplit_images_assigned_train" not in manifest.meta.extra
    assert [p for p in validate_manifest(manifest) if p.severity == "error"] == []
