"""Class-folder importer: flat and pre-split layouts, mask pairing, ignored files, errors, BUSI as folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medalign.data.importers import DatasetImportError, load_dataset
from medalign.data.validation import validate_manifest


def _image(path: Path, value: int = 60, shape: tuple[int, ...] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)


def make_flat(root: Path) -> Path:
    for n in range(1, 5):
        _image(root / "cat" / f"c{n}.png")
        _image(root / "dog" / "sub" / f"d{n}.jpg", shape=(8, 8, 3))
    _image(root / "cat" / "c1_mask.png", 255)
    _image(root / "cat" / "c1_mask_2.png", 255)
    (root / "cat" / "README.txt").write_text("notes")
    (root / "labels.xls").write_bytes(b"x")
    _image(root / "cat" / ".ipynb_checkpoints" / "c1-checkpoint.png")
    return root


def test_folders_flat_layout(tmp_path: Path) -> None:
    manifest = load_dataset("folders", make_flat(tmp_path))
    table = manifest.table
    assert list(table.columns) == ["case_id", "patient_id", "split", "image", "mask", "mask:2", "label"]
    assert len(table) == 8
    assert manifest.meta.classes == {"label": ["cat", "dog"]}
    assert table["label"].value_counts().to_dict() == {"cat": 4, "dog": 4}
    row = table.set_index("case_id").loc["cat_c1"]
    assert (row["image"], row["mask"], row["mask:2"]) == (
        "cat/c1.png",
        "cat/c1_mask.png",
        "cat/c1_mask_2.png",
    )
    assert table.set_index("case_id").loc["dog_sub_d2", "image"] == "dog/sub/d2.jpg"
    assert table.set_index("case_id").loc["cat_c2", "mask"] == ""
    assert set(table["split"]) <= {"train", "val", "test"}
    assert manifest.meta.extra["ignored_files"] == [
        "cat/.ipynb_checkpoints/c1-checkpoint.png",
        "cat/README.txt",
        "labels.xls",
    ]
    assert manifest.meta.mask_threshold is None
    assert load_dataset("folders", tmp_path).table.equals(table)
    assert not [p for p in validate_manifest(manifest) if p.severity == "error"]


def test_folders_presplit_layout_and_jpeg_masks(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for i in range(n):
            _image(tmp_path / split / "a" / f"{split}{i}.jpg")
            _image(tmp_path / split / "b" / f"{split}{i}.jpg")
    _image(tmp_path / "train" / "a" / "train0_mask.jpg", 255)
    manifest = load_dataset("folders", tmp_path)
    table = manifest.table
    assert table["split"].value_counts().to_dict() == {"train": 6, "test": 4, "val": 2}
    assert table.set_index("case_id").loc["val_b_val0", "split"] == "val"
    assert manifest.meta.extra["split_source"] == "folders"
    assert manifest.meta.mask_threshold == 127


def test_folders_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetImportError, match="no class folders"):
        load_dataset("folders", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetImportError, match="no image files"):
        load_dataset("folders", tmp_path)
    _image(tmp_path / "a" / "x.png")
    _image(tmp_path / "a" / "y_mask.png")
    with pytest.raises(DatasetImportError, match=r"y_mask\.png' has no image"):
        load_dataset("folders", tmp_path)
    (tmp_path / "a" / "y_mask.png").unlink()
    _image(tmp_path / "a" / "x.jpg")
    with pytest.raises(DatasetImportError, match=r"same name stem.*x\.(png|jpg)"):
        load_dataset("folders", tmp_path)


@pytest.mark.realdata
def test_folders_on_real_busi(real_dataset) -> None:
    manifest = load_dataset("folders", real_dataset("busi") / "Dataset_BUSI_with_GT")
    assert len(manifest) == 780
    assert manifest.table["label"].value_counts().to_dict() == {
        "benign": 437,
        "malignant": 210,
        "normal": 133,
    }
    assert (manifest.table["mask"] != "").all()
    problems = validate_manifest(manifest)
    assert not [p for p in problems if p.severity == "error"], problems[:5]
