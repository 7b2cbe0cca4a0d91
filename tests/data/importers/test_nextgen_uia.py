"""NextGen-UIA importer: the release's all/ + split lists, BUSI-style folds, images/ + masks/, errors, real BUSI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medalign.data.importers import DatasetImportError, load_dataset
from medalign.data.validation import validate_manifest


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def make_release(root: Path) -> Path:
    for name in ("b1.png", "b2.png", "m1.png", "m2.png", "t1.png"):
        _png(root / "all" / "images" / name, 70)
        _png(root / "all" / "masks" / name, 255)
    seg, cls = root / "segmentation" / "BUSI", root / "classification" / "BUSI"
    seg.mkdir(parents=True)
    cls.mkdir(parents=True)
    (seg / "train.txt").write_text("b1.png\nm1.png\n")
    (seg / "val.txt").write_text("b2.png\n")
    (seg / "test.txt").write_text("m2.png\n")
    (cls / "train.txt").write_text("b1.png\nm1.png\nb2.png\n")
    (cls / "test.txt").write_text("m2.png\n")
    (cls / "labels.csv").write_text("b1.png,0\nb2.png,0\nm1.png,1\nm2.png,1\n")
    (root / "segmentation" / "TN3K").mkdir()
    (root / "segmentation" / "TN3K" / "train.txt").write_text("t1.png\n")
    return root


def test_nextgen_release_segmentation(tmp_path: Path) -> None:
    make_release(tmp_path)
    manifest = load_dataset("nextgen-uia", tmp_path, dataset="BUSI", classes=["benign", "malignant"])
    table = manifest.table.set_index("case_id")
    assert list(manifest.table.columns) == ["case_id", "patient_id", "split", "image", "mask", "label"]
    assert table["split"].to_dict() == {"b1": "train", "m1": "train", "b2": "val", "m2": "test"}
    assert (table.loc["m1", "image"], table.loc["m1", "mask"]) == ("all/images/m1.png", "all/masks/m1.png")
    assert table.loc["m1", "label"] == "malignant"
    assert manifest.meta.classes == {"label": ["benign", "malignant"]}
    assert manifest.meta.extra["split_source"] == [
        "segmentation/BUSI/train.txt",
        "segmentation/BUSI/val.txt",
        "segmentation/BUSI/test.txt",
    ]
    assert not [p for p in validate_manifest(manifest) if p.severity == "error"]
    tn3k = load_dataset("nextgen-uia", tmp_path, dataset="TN3K")
    assert tn3k.table["case_id"].tolist() == ["t1"] and "label" not in tn3k.table.columns


def test_nextgen_release_classification_and_errors(tmp_path: Path) -> None:
    make_release(tmp_path)
    manifest = load_dataset("nextgen-uia", tmp_path, task="classification")
    assert manifest.table.set_index("case_id")["split"].to_dict() == {
        "b1": "train",
        "m1": "train",
        "b2": "train",
        "m2": "test",
    }
    assert manifest.table["label"].tolist() == ["0", "1", "0", "1"]
    with pytest.raises(DatasetImportError, match=r"holds 2 datasets.*pass dataset"):
        load_dataset("nextgen-uia", tmp_path)
    with pytest.raises(DatasetImportError, match="option task must be one of segmentation, classification, got 'detection'"):
        load_dataset("nextgen-uia", tmp_path, task="detection")
    (tmp_path / "classification" / "BUSI" / "test.txt").write_text("m2.png\nt1.png\n")
    with pytest.raises(DatasetImportError, match=r"test\.txt' line 2: 't1\.png' has no row in .*labels\.csv"):
        load_dataset("nextgen-uia", tmp_path, task="classification")
    (tmp_path / "segmentation" / "BUSI" / "val.txt").write_text("b2.png\nb1.png\n")
    with pytest.raises(
        DatasetImportError, match=r"val\.txt' line 2: 'b1\.png' is already listed in .*train\.txt' line 1"
    ):
        load_dataset("nextgen-uia", tmp_path, dataset="BUSI")


def make_folds(root: Path) -> Path:
    for label, count in (("benign", 4), ("malignant", 3), ("normal", 2)):
        for n in range(1, count + 1):
            _png(root / "Dataset" / label / f"{label} ({n}).png", 60)
            _png(root / "Dataset" / label / f"{label} ({n})_mask.png", 255 if label != "normal" else 0)
    folds = root / "folds"
    folds.mkdir()
    for k in (1, 2):
        (folds / f"x_train{k}.txt").write_text("benign (1)\nbenign (2)\nmalignant (1)\nmalignant (2)\n")
        (folds / f"x_val{k}.txt").write_text("benign (3)\nbenign (4).png\nmalignant (3)\n")
    return root


def test_nextgen_folds_layout(tmp_path: Path) -> None:
    manifest = load_dataset("nextgen-uia", make_folds(tmp_path), fold=2)
    table = manifest.table.set_index("case_id")
    assert table["split"].value_counts().to_dict() == {"train": 4, "val": 3, "test": 2}
    assert table.loc["benign_4", "split"] == "val"
    assert table.loc["benign_4", "image"] == "Dataset/benign/benign (4).png"
    assert table.loc["normal_2", "mask"] == "Dataset/normal/normal (2)_mask.png"
    assert table["label"].value_counts().to_dict() == {"benign": 4, "malignant": 3, "normal": 2}
    extra = manifest.meta.extra
    assert extra["fold"] == 2 and extra["label_from"] == "folder"
    assert extra["not_in_split_files"] == ["normal_1", "normal_2"]
    assert load_dataset("nextgen-uia", tmp_path).meta.extra["fold"] == 1
    dropped = load_dataset("nextgen-uia", tmp_path, fold=1, unlisted="drop")
    assert len(dropped) == 7 and dropped.meta.extra["not_in_split_files"] == ["normal_1", "normal_2"]
    assert not [p for p in validate_manifest(manifest) if p.severity == "error"]


def test_nextgen_folds_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetImportError, match="no split lists"):
        load_dataset("nextgen-uia", tmp_path)
    make_folds(tmp_path)
    with pytest.raises(DatasetImportError, match=r"fold 3 not found.*\[1, 2\]"):
        load_dataset("nextgen-uia", tmp_path, fold=3)
    (tmp_path / "folds" / "x_val1.txt").write_text("benign (3)\nbenign (99)\n")
    with pytest.raises(DatasetImportError, match=r"x_val1\.txt' line 2: 'benign \(99\)' matches no image"):
        load_dataset("nextgen-uia", tmp_path, fold=1)
    (tmp_path / "folds" / "x_val1.txt").write_text("benign (1).png\n")
    with pytest.raises(
        DatasetImportError, match=r"x_val1\.txt' line 1: 'benign \(1\)\.png' names an image listed again"
    ):
        load_dataset("nextgen-uia", tmp_path, fold=1)
    with pytest.raises(DatasetImportError, match="option label_from must be one of auto, csv, folder, stem, none"):
        load_dataset("nextgen-uia", tmp_path, label_from="x")


def test_nextgen_images_masks_folders_with_plain_lists(tmp_path: Path) -> None:
    for name in ("benign_01", "benign_02", "malignant_01", "malignant_02"):
        _png(tmp_path / "images" / f"{name}.png", 40)
    _png(tmp_path / "masks" / "benign_01.png", 255)
    (tmp_path / "train.txt").write_text("benign_01\nmalignant_01\n")
    (tmp_path / "val.txt").write_text("benign_02\n")
    (tmp_path / "test.txt").write_text("malignant_02\n")
    manifest = load_dataset("nextgen-uia", tmp_path, label_from="stem")
    table = manifest.table.set_index("case_id")
    assert table["split"].to_dict() == {
        "benign_01": "train",
        "benign_02": "val",
        "malignant_01": "train",
        "malignant_02": "test",
    }
    assert table.loc["benign_01", "mask"] == "masks/benign_01.png" and table.loc["benign_02", "mask"] == ""
    assert manifest.meta.classes == {"label": ["benign", "malignant"]}
    assert "label" not in load_dataset("nextgen-uia", tmp_path).table.columns
    (tmp_path / "labels.csv").write_text(
        "image,label\nbenign_01.png,0\nbenign_02.png,0\nmalignant_01.png,1\nmalignant_02.png,1\n"
    )
    labelled = load_dataset("nextgen-uia", tmp_path, classes=["benign", "malignant"])
    assert labelled.table["label"].tolist() == ["benign", "benign", "malignant", "malignant"]
    assert labelled.meta.extra["label_rows_without_image"] == []
    with (tmp_path / "labels.csv").open("a") as table:
        table.write("gone.png,1\n")  # a labels.csv row whose image is missing is named, not lost
    assert load_dataset("nextgen-uia", tmp_path).meta.extra["label_rows_without_image"] == ["gone"]
    _png(tmp_path / "masks" / "ghost.png")
    with pytest.raises(DatasetImportError, match=r"masks without an image.*ghost\.png"):
        load_dataset("nextgen-uia", tmp_path)


@pytest.mark.realdata
def test_nextgen_on_real_busi_fold1(real_dataset) -> None:
    manifest = load_dataset("nextgen-uia", real_dataset("busi"), fold=1)
    table = manifest.table
    assert len(table) == 780
    assert table["split"].value_counts().to_dict() == {"train": 452, "val": 195, "test": 133}
    assert table["label"].value_counts().to_dict() == {"benign": 437, "malignant": 210, "normal": 133}
    busi = load_dataset("busi", real_dataset("busi"), fold=1).table
    assert table.set_index("case_id")["split"].equals(busi.set_index("case_id")["split"])
    problems = validate_manifest(manifest)
    assert not [p for p in problems if p.severity == "error"], problems[:5]


@pytest.mark.parametrize(
    ("relative", "content", "where"),
    [
        ("classification/BUSI/labels.csv", b"b1.png,0\nb2.png,0\nm1\xe9.png,1\n", "line 3, byte 20"),
        ("classification/BUSI/train.txt", b"b1.png\n\xffm1.png\n", "line 2, byte 7"),
    ],
)
def test_non_utf8_lists_name_the_file_line_and_byte(
    tmp_path: Path, relative: str, content: bytes, where: str
) -> None:
    make_release(tmp_path)
    (tmp_path / relative).write_bytes(content)
    with pytest.raises(DatasetImportError, match=rf"{relative}' is not valid UTF-8 \({where}\)"):
        load_dataset("nextgen-uia", tmp_path, task="classification")
