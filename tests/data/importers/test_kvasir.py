"""Kvasir-SEG importer: JPEG pairs, normalised boxes, rows kept for missing images, errors, the real set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medalign.data.importers import DatasetImportError, load_dataset
from medalign.data.validation import validate_manifest


def _jpg(path: Path, value: int, shape: tuple[int, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path, quality=90)


def make_kvasir(root: Path, n: int = 10) -> Path:
    boxes = {}
    for i in range(n):
        _jpg(root / "images" / f"id{i:02d}.jpg", 120, (12, 16, 3))
        _jpg(root / "masks" / f"id{i:02d}.jpg", 250, (12, 16))
        boxes[f"id{i:02d}"] = {
            "height": 24,
            "width": 32,
            "bbox": [{"label": "polyp", "xmin": 8, "ymin": 6, "xmax": 16, "ymax": 12}],
        }
    boxes["id01"]["bbox"].append({"label": "polyp", "xmin": 0, "ymin": 0, "xmax": 32, "ymax": 24})
    (root / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    return root


def test_kvasir_columns_boxes_and_split(tmp_path: Path) -> None:
    manifest = load_dataset("kvasir", make_kvasir(tmp_path))
    table = manifest.table
    assert list(table.columns) == [
        "case_id",
        "patient_id",
        "split",
        "image",
        "mask",
        "attr:n_polyps",
        "attr:bbox",
    ]
    assert len(table) == 10
    assert table["split"].value_counts().to_dict() == {"train": 8, "val": 1, "test": 1}
    row = table.set_index("case_id").loc["id01"]
    assert (row["image"], row["mask"]) == ("images/id01.jpg", "masks/id01.jpg")
    assert row["attr:n_polyps"] == "2"
    assert json.loads(row["attr:bbox"]) == [[0.25, 0.25, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]
    assert manifest.meta.mask_threshold == 127
    assert load_dataset("kvasir", tmp_path).table.equals(table)
    assert not [p for p in validate_manifest(manifest) if p.severity == "error"]


def test_kvasir_orphan_mask_and_box_keep_rows_that_validate_flags(tmp_path: Path) -> None:
    make_kvasir(tmp_path, 3)
    (tmp_path / "images" / "id02.jpg").unlink()
    boxes = json.loads((tmp_path / "kavsir_bboxes.json").read_text())
    boxes["ghost"] = {"height": 10, "width": 10, "bbox": []}
    del boxes["id00"]
    (tmp_path / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    manifest = load_dataset("kvasir", tmp_path)
    table = manifest.table.set_index("case_id")
    assert sorted(table.index) == ["ghost", "id00", "id01", "id02"]
    assert table.loc["id02", "image"] == "images/id02.jpg"
    assert table.loc["ghost", "attr:n_polyps"] == "0"
    assert table.loc["id00", "attr:bbox"] == ""
    assert manifest.meta.extra["images_missing"] == ["ghost", "id02"]
    assert manifest.meta.extra["without_bbox"] == ["id00"]
    flagged = {p.case_id for p in validate_manifest(manifest) if p.severity == "error"}
    assert flagged == {"ghost", "id02"}


def test_kvasir_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetImportError, match="images' does not exist"):
        load_dataset("kvasir", tmp_path)
    make_kvasir(tmp_path, 2)
    (tmp_path / "masks" / "id01.jpg").unlink()
    with pytest.raises(DatasetImportError, match=r"without a mask.*images/id01\.jpg"):
        load_dataset("kvasir", tmp_path)
    _jpg(tmp_path / "masks" / "id01.jpg", 255, (12, 16))
    (tmp_path / "kavsir_bboxes.json").write_text('{"id00": {"bbox": [{"xmin": 1}]}}')
    with pytest.raises(DatasetImportError, match=r"kavsir_bboxes\.json' entry 'id00'"):
        load_dataset("kvasir", tmp_path)
    (tmp_path / "kavsir_bboxes.json").write_text("{not json")
    with pytest.raises(DatasetImportError, match="cannot parse"):
        load_dataset("kvasir", tmp_path)


@pytest.mark.realdata
def test_kvasir_real_release(real_dataset) -> None:
    manifest = load_dataset("kvasir", real_dataset("kvasir-seg"))
    table = manifest.table
    assert len(table) == 1000
    assert table["split"].value_counts().to_dict() == {"train": 800, "val": 100, "test": 100}
    assert table["attr:n_polyps"].astype(int).sum() == 1071
    problems = validate_manifest(manifest)
    assert not [p for p in problems if p.severity == "error"], problems[:5]
