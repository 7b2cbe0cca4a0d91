"""BUSI importer: a hand-built release layout (with an extra lesion mask and folds), broken layouts, the real set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medalign.data.importers import DatasetImportError, load_dataset
from medalign.data.validation import validate_manifest

COUNTS = {"benign": 6, "malignant": 4, "normal": 3}


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 10), value, dtype=np.uint8)).save(path)


def make_busi(root: Path) -> Path:
    release = root / "Dataset_BUSI_with_GT"
    for label, count in COUNTS.items():
        for n in range(1, count + 1):
            _png(release / label / f"{label} ({n}).png", 80)
            _png(release / label / f"{label} ({n})_mask.png", 255 if label != "normal" else 0)
    _png(release / "benign" / "benign (2)_mask_1.png", 255)
    (release / "benign" / "Thumbs.db").write_bytes(b"\0")
    folds = root / "folds"
    folds.mkdir()
    (folds / "busi_train1.txt").write_text(
        "benign (1)\nbenign (2)\nbenign (3)\nmalignant (1)\nmalignant (2)\n"
    )
    (folds / "busi_val1.txt").write_text("benign (4)\nmalignant (3)\n\n")
    return root


def test_busi_default_split_is_seeded_and_stratified(tmp_path: Path) -> None:
    manifest = load_dataset("busi", make_busi(tmp_path))
    table = manifest.table
    assert list(table.columns) == ["case_id", "patient_id", "split", "image", "mask", "mask:1", "label"]
    assert len(table) == sum(COUNTS.values())
    assert table["label"].value_counts().to_dict() == COUNTS
    assert manifest.meta.classes == {"label": ["benign", "malignant", "normal"]}
    assert set(table["split"]) <= {"train", "val", "test"}
    for label in COUNTS:
        assert "train" in set(table.loc[table["label"] == label, "split"])
    row = table.set_index("case_id").loc["benign_2"]
    assert row["image"] == "Dataset_BUSI_with_GT/benign/benign (2).png"
    assert row["mask"] == "Dataset_BUSI_with_GT/benign/benign (2)_mask.png"
    assert row["mask:1"] == "Dataset_BUSI_with_GT/benign/benign (2)_mask_1.png"
    assert (table["patient_id"] == table["case_id"]).all()
    assert manifest.meta.extra["ignored_files"] == ["Dataset_BUSI_with_GT/benign/Thumbs.db"]
    assert manifest.meta.extra["lesion_mask_union"] == ["mask", "mask:1"]
    for cell in list(table["image"]) + [m for m in table["mask:1"] if m]:
        assert (tmp_path / cell).is_file()
    again = load_dataset("busi", tmp_path)
    assert again.table.equals(table)
    assert load_dataset("busi", tmp_path, seed=1).table["split"].tolist() != table["split"].tolist()
    assert not [p for p in validate_manifest(manifest) if p.severity == "error"]


def test_busi_release_folder_itself_is_accepted(tmp_path: Path) -> None:
    make_busi(tmp_path)
    manifest = load_dataset("busi", tmp_path / "Dataset_BUSI_with_GT")
    assert manifest.table["image"].iloc[0] == "benign/benign (1).png"


def test_busi_fold_gives_train_val_and_the_rest_is_test(tmp_path: Path) -> None:
    manifest = load_dataset("busi", make_busi(tmp_path), fold=1)
    split = manifest.table.set_index("case_id")["split"]
    assert split.value_counts().to_dict() == {"train": 5, "val": 2, "test": 6}
    assert split["benign_4"] == "val" and split["malignant_1"] == "train" and split["normal_1"] == "test"
    assert manifest.meta.extra["split_source"] == ["folds/busi_train1.txt", "folds/busi_val1.txt"]


def test_busi_image_without_mask_is_named(tmp_path: Path) -> None:
    make_busi(tmp_path)
    (tmp_path / "Dataset_BUSI_with_GT" / "malignant" / "malignant (3)_mask.png").unlink()
    with pytest.raises(DatasetImportError, match=r"malignant \(3\)\.png"):
        load_dataset("busi", tmp_path)


def test_busi_orphan_mask_is_named(tmp_path: Path) -> None:
    make_busi(tmp_path)
    _png(tmp_path / "Dataset_BUSI_with_GT" / "normal" / "normal (9)_mask.png")
    with pytest.raises(DatasetImportError, match=r"normal \(9\)_mask\.png"):
        load_dataset("busi", tmp_path)


def test_busi_bad_fold_entries_name_file_and_line(tmp_path: Path) -> None:
    make_busi(tmp_path)
    (tmp_path / "folds" / "busi_val1.txt").write_text("benign (4)\nbenign (77)\n")
    with pytest.raises(DatasetImportError, match=r"busi_val1\.txt' line 2: 'benign \(77\)'"):
        load_dataset("busi", tmp_path, fold=1)
    (tmp_path / "folds" / "busi_val1.txt").write_text("benign (1)\n")
    with pytest.raises(DatasetImportError, match=r"line 1: 'benign \(1\)' is already listed"):
        load_dataset("busi", tmp_path, fold=1)
    with pytest.raises(DatasetImportError, match=r"busi_train2\.txt' does not exist"):
        load_dataset("busi", tmp_path, fold=2)


def test_busi_unexpected_folder_and_missing_release(tmp_path: Path) -> None:
    make_busi(tmp_path)
    (tmp_path / "Dataset_BUSI_with_GT" / "other").mkdir()
    with pytest.raises(DatasetImportError, match="unexpected folder"):
        load_dataset("busi", tmp_path)
    with pytest.raises(DatasetImportError, match="Dataset_BUSI_with_GT"):
        load_dataset("busi", tmp_path / "folds")


@pytest.mark.realdata
def test_busi_real_release(real_dataset) -> None:
    src = real_dataset("busi")
    manifest = load_dataset("busi", src, fold=1)
    table = manifest.table
    assert len(table) == 780
    assert table["label"].value_counts().to_dict() == {"benign": 437, "malignant": 210, "normal": 133}
    assert table["split"].value_counts().to_dict() == {"train": 452, "val": 195, "test": 133}
    assert set(table.loc[table["split"] == "test", "label"]) == {"normal"}
    default = load_dataset("busi", src).table
    assert default["split"].value_counts().to_dict() == {"train": 546, "val": 78, "test": 156}
    problems = validate_manifest(manifest)
    assert not [p for p in problems if p.severity == "error"], problems[:5]
