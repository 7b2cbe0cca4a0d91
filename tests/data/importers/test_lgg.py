"""LGG importer: a hand-built release layout (TIFF and JPEG), broken layouts, and the real pack."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medalign.data.importers import DatasetImportError, load_dataset
from medalign.data.validation import validate_manifest

HEADER = "Patient,RNASeqCluster,histological_type,neoplasm_histologic_grade,gender,death01\n"


def _slice(path: Path) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    Image.fromarray(rgb).save(path)


def _mask(path: Path) -> None:
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:8, 4:8] = 255
    Image.fromarray(mask).save(path)


def make_lgg(root: Path) -> Path:
    """Patient 1 in the release's TIFF, patient 2 in the pack's JPEG+PNG (with a stray JPEG copy,
    an orphan mask and a slice whose mask is missing), patient 3 absent from data.csv."""
    one = root / "TCGA_AA_0001_19990101"
    one.mkdir(parents=True)
    for n in (2, 10):
        _slice(one / f"{one.name}_{n}.tif")
        _mask(one / f"{one.name}_{n}_mask.tif")
    _slice(one / f"{one.name}_2.jpg")  # same slice in a second format: the TIFF is used
    two = root / "TCGA_AA_0002_20000202"
    two.mkdir()
    _slice(two / f"{two.name}_1.jpg")
    _mask(two / f"{two.name}_1_mask.png")
    _slice(two / f"{two.name}_3.jpg")  # no mask
    _mask(two / f"{two.name}_7_mask.png")  # no image
    (two / "notes.txt").write_text("x", encoding="utf-8")
    three = root / "TCGA_BB_0003_20010303"
    three.mkdir()
    _slice(three / f"{three.name}_5.jpg")
    _mask(three / f"{three.name}_5_mask.png")
    (root / "data.csv").write_text(
        HEADER + "TCGA_AA_0001,2,1,2.0,1,1\nTCGA_AA_0002,,3,1,2,\nTCGA_ZZ_9999,1,1,1,1,0\n",
        encoding="utf-8",
    )
    return root


def test_lgg_fixture_columns_channels_and_labels(tmp_path: Path) -> None:
    manifest = load_dataset("lgg", make_lgg(tmp_path))
    table = manifest.table
    assert list(table.columns[:7]) == [
        "case_id",
        "patient_id",
        "split",
        "image:pre",
        "image:flair",
        "image:post",
        "mask",
    ]
    assert table["case_id"].tolist() == [
        "TCGA_AA_0001_19990101_2",
        "TCGA_AA_0001_19990101_10",
        "TCGA_AA_0002_20000202_1",
        "TCGA_AA_0002_20000202_3",
        "TCGA_BB_0003_20010303_5",
    ]
    first = table.iloc[0]
    assert first["image:pre"] == "TCGA_AA_0001_19990101/TCGA_AA_0001_19990101_2.tif#channel=0"
    assert first["image:flair"] == "TCGA_AA_0001_19990101/TCGA_AA_0001_19990101_2.tif#channel=1"
    assert first["image:post"] == "TCGA_AA_0001_19990101/TCGA_AA_0001_19990101_2.tif#channel=2"
    assert first["mask"] == "TCGA_AA_0001_19990101/TCGA_AA_0001_19990101_2_mask.tif"
    assert table["patient_id"].tolist() == ["TCGA_AA_0001"] * 2 + ["TCGA_AA_0002"] * 2 + ["TCGA_BB_0003"]
    assert table["attr:slice"].tolist() == ["2", "10", "1", "3", "5"]
    assert table["label:death"].tolist() == ["1", "1", "", "", ""]
    assert table["label:grade"].tolist() == ["2", "2", "1", "1", ""]  # "2.0" read as the code 2
    assert table["attr:histological_type"].tolist() == ["1", "1", "3", "3", ""]
    assert "attr:patient" not in table.columns and "attr:death01" not in table.columns
    assert manifest.meta.classes == {"label:death": ["0", "1"], "label:grade": ["1", "2"]}
    extra = manifest.meta.extra
    assert extra["patients_missing_from_clinical"] == ["TCGA_BB_0003"]
    assert extra["clinical_patients_without_images"] == ["TCGA_ZZ_9999"]
    assert extra["patients_with_empty_labels"] == {"label:death": ["TCGA_AA_0002"]}
    assert extra["masks_without_image"] == ["TCGA_AA_0002_20000202/TCGA_AA_0002_20000202_7_mask.png"]
    assert extra["unused_files"] == [
        "TCGA_AA_0001_19990101/TCGA_AA_0001_19990101_2.jpg",
        "TCGA_AA_0002_20000202/notes.txt",
    ]


def test_lgg_record_text_states_the_record_but_never_the_labels(tmp_path: Path) -> None:
    """record_text: the patient's data.csv fields as a sentence for Stage II, labels left out."""
    root = make_lgg(tmp_path)
    table = load_dataset("lgg", root, record_text=True).table
    assert table["text"].tolist() == [
        "Glioma record: histological type 1, RNA-seq cluster 2.",
        "Glioma record: histological type 1, RNA-seq cluster 2.",
        "Glioma record: histological type 3.",  # an empty field is left out
        "Glioma record: histological type 3.",
        "",  # absent from data.csv: nothing to say
    ]
    assert "text" not in load_dataset("lgg", root).table.columns
    with pytest.raises(DatasetImportError, match="record_text needs the clinical table"):
        load_dataset("lgg", root, clinical="", record_text=True)


def test_lgg_split_is_by_patient_and_seeded(tmp_path: Path) -> None:
    root = make_lgg(tmp_path)
    table = load_dataset("lgg", root).table
    assert set(table["split"]) <= {"train", "val", "test"}
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    assert load_dataset("lgg", root).table["split"].tolist() == table["split"].tolist()
    assert set(load_dataset("lgg", root, fractions={"train": 1.0}, seed=3).table["split"]) == {"train"}


def test_lgg_validation_names_the_missing_mask(tmp_path: Path) -> None:
    problems = validate_manifest(load_dataset("lgg", make_lgg(tmp_path)))
    errors = [p for p in problems if p.severity == "error"]
    assert [(p.case_id, p.column) for p in errors] == [("TCGA_AA_0002_20000202_3", "mask")]
    assert "TCGA_AA_0002_20000202_3_mask.png" in errors[0].reason


def test_lgg_without_clinical_table(tmp_path: Path) -> None:
    root = make_lgg(tmp_path)
    (root / "data.csv").unlink()
    with pytest.raises(
        DatasetImportError, match=re.escape('pass clinical="" to import the images without labels')
    ):
        load_dataset("lgg", root)
    manifest = load_dataset("lgg", root, clinical="")
    assert len(manifest.table) == 5
    assert not manifest.label_columns and manifest.meta.classes == {}


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("Patient,neoplasm_histologic_grade\nTCGA_AA_0001,1\n", "lacks column(s) ['death01']"),
        (
            HEADER + "TCGA_AA_0001,1,1,1,1,0\nTCGA_AA_0001,1,1,1,1,0\n",
            "line 3: patient 'TCGA_AA_0001' appears more than once",
        ),
        (HEADER + ",1,1,1,1,0\n", "line 2: empty 'Patient'"),
    ],
)
def test_lgg_broken_clinical_table(tmp_path: Path, csv: str, message: str) -> None:
    root = make_lgg(tmp_path)
    (root / "data.csv").write_text(csv, encoding="utf-8")
    with pytest.raises(DatasetImportError, match=re.escape(message)):
        load_dataset("lgg", root)


def test_lgg_folder_without_slices(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(HEADER, encoding="utf-8")
    (tmp_path / "TCGA_AA_0001_19990101").mkdir()
    with pytest.raises(DatasetImportError, match="no patient folders with slices"):
        load_dataset("lgg", tmp_path)


@pytest.mark.realdata
def test_lgg_real_pack(real_dataset: Any) -> None:
    manifest = load_dataset("lgg", real_dataset("lgg_mri"))
    table = manifest.table
    assert len(table) == 1373
    assert table["patient_id"].nunique() == 110
    assert table["case_id"].is_unique
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    assert table.drop_duplicates("patient_id")["split"].value_counts().to_dict() == {
        "train": 77,
        "test": 22,
        "val": 11,
    }
    assert manifest.meta.classes == {"label:death": ["0", "1"], "label:grade": ["1", "2"]}
    assert manifest.meta.extra["patients_with_empty_labels"] == {
        "label:death": ["TCGA_HT_A61B"],
        "label:grade": ["TCGA_HT_A61B"],
    }
    assert "patients_missing_from_clinical" not in manifest.meta.extra
    assert table["image:flair"].str.endswith(".jpg#channel=1").all()
    assert table["mask"].str.endswith("_mask.png").all()
    assert [p for p in validate_manifest(manifest) if p.severity == "error"] == []
