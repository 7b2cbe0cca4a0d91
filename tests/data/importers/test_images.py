"""The generic importer on generated layouts (conftest.py): counts, what is reported, nothing dropped silently."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medalign.data.importers import DatasetImportError, import_dataset, load_dataset
from medalign.data.importers.registry import import_warnings
from medalign.data.manifest import Manifest, summarize
from medalign.data.validation import errors, validate_manifest


def accounted(manifest: Manifest) -> dict:
    """The import report, after checking that every input's items add up."""
    report = manifest.meta.extra["import_report"]
    for entry in report["inputs"]:
        listed = [e for e in report["not_imported"] if e["input"] == entry["input"]]
        assert entry["items"] == entry["imported"] + entry["not_imported"] == entry["imported"] + len(listed)
    assert report["rows"] == len(manifest)
    return report


def reasons(report: dict, key: str = "not_imported", item: str = "item") -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for entry in report[key]:
        grouped.setdefault(entry["reason"], []).append(entry[item])
    return grouped


def test_ultrasound_image_and_mask_folders_with_a_headerless_table(tmp_path: Path, layouts) -> None:
    src = layouts.ultrasound(tmp_path / "us")
    manifest = load_dataset(
        "images",
        src,
        images="images",
        masks="masks",
        mask_suffix="_mask",
        labels="diagnosis.csv",
        label_columns=["4"],
    )
    table = manifest.table
    assert list(table.columns) == [
        "case_id", "patient_id", "split", "image", "mask", "label", "attr:column2", "attr:column3",
    ]  # fmt: skip
    assert len(table) == 6 and table["case_id"].tolist() == [f"case{n}" for n in range(1, 7)]
    assert table.set_index("case_id").loc["case2", "mask"] == "masks/case2_mask.png"
    assert table.set_index("case_id").loc["case6", "mask"] == ""
    assert manifest.meta.classes == {"label": ["benign", "malignant"]}
    assert table["attr:column3"].tolist() == [str(40 + n) for n in range(1, 7)]
    report = accounted(manifest)
    assert [(e["items"], e["imported"]) for e in report["inputs"]] == [(6, 6), (6, 5), (7, 6)]
    assert reasons(report) == {
        "no image with this stem": ["masks/case9_mask.png"],
        "no image with this id": ["diagnosis.csv line 7 'case7'"],
    }
    assert reasons(report, "incomplete", "case_id") == {"no mask": ["case6"]}
    assert "first row read as data (no header)" in report["notes"][0]
    assert manifest.meta.extra["split_seeded"]["stratify"] == "label"
    assert set(table["split"]) <= {"train", "val", "test"}
    assert not errors(validate_manifest(manifest))


def test_original_and_ground_truth_folders_with_gif_masks(tmp_path: Path, layouts) -> None:
    src = layouts.colonoscopy(tmp_path / "cvc")
    out = tmp_path / "manifests" / "cvc.csv"
    manifest = import_dataset("images", src, out, images="Original", masks="Ground Truth")
    assert len(manifest) == 6 and manifest.table["mask"].iloc[0] == "Ground Truth/1.gif"
    assert manifest.root == src.resolve() and manifest.meta.source == str(src.resolve())
    assert manifest.meta.description == (
        "'cvc' imported with the 'images' importer: 6 images from 'Original', 6 masks from 'Ground Truth'"
    )
    assert manifest.meta.extra["importer"] == {
        "format": "images",
        "options": {"images": "Original", "masks": "Ground Truth"},
    }
    report = accounted(manifest)
    assert report["not_imported"] == [] and report["incomplete"] == []
    problems = validate_manifest(manifest)
    assert not problems, problems  # the GIF masks are read (first frame), binary, the right size


def test_masks_next_to_their_images_are_told_apart_by_the_naming_rule(tmp_path: Path, layouts) -> None:
    src = layouts.side_by_side(tmp_path / "lgg_like")
    manifest = load_dataset(
        "images", src, masks=".", mask_suffix="_mask", recursive=True, group_regex=r"^(P\d+)_"
    )
    table = manifest.table.set_index("case_id")
    assert len(table) == 10 and table.loc["P1_P1_2", "mask"] == "P1/P1_2_mask.png"
    assert table.loc["P1_P1_3", "mask"] == "" and table.loc["P2_P2_1_mask_2", "mask"] == ""
    assert not table.index.str.endswith("_mask").any()  # no mask became an image
    assert table.groupby("patient_id")["split"].nunique().max() == 1 and table["patient_id"].nunique() == 3
    report = accounted(manifest)
    assert [(e["input"], e["items"], e["imported"]) for e in report["inputs"]] == [
        ("image files in '.'", 11, 10),
        ("mask files (<stem>_mask) in '.'", 9, 8),
    ]
    assert reasons(report) == {
        "not an image file (by its suffix)": ["notes.txt"],
        "no image with this stem": ["P2/P2_9_mask.png"],
    }
    assert reasons(report, "incomplete", "case_id") == {"no mask": ["P1_P1_3", "P2_P2_1_mask_2"]}
    assert any("not named <stem>_mask; imported as images: P2/P2_1_mask_2.png" in n for n in report["notes"])


def test_one_folder_for_images_and_masks_needs_a_naming_rule(tmp_path: Path, layouts) -> None:
    src = layouts.side_by_side(tmp_path / "lgg_like")
    with pytest.raises(DatasetImportError, match="name the same folder: give mask_prefix or mask_suffix"):
        load_dataset("images", src, masks=".", recursive=True)


@pytest.mark.realdata
def test_lgg_release_with_masks_beside_images_grouped_by_patient(real_dataset, tmp_path: Path) -> None:
    """The LGG release as a user has it, through the generic importer: 110 patients kept whole."""
    src = real_dataset("lgg_mri")
    manifest = load_dataset(
        "images", src, masks=".", mask_suffix="_mask", recursive=True, group_regex=r"^(TCGA_[A-Z0-9]+_[A-Z0-9]+)_"
    )
    report = accounted(manifest)
    assert [(e["items"], e["imported"]) for e in report["inputs"]] == [(1375, 1373), (1373, 1373)]
    assert reasons(report) == {"not an image file (by its suffix)": ["data.csv", "README.md"]}
    table = manifest.table
    assert (table["mask"] != "").all() and table["patient_id"].nunique() == 110
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    assert "near_duplicate_stems_across_splits" not in manifest.meta.extra
    assert "ungrouped_cases" not in manifest.meta.extra["groups"]


def test_a_mask_naming_rule_is_suggested_when_no_mask_matches(tmp_path: Path, layouts) -> None:
    for n in range(1, 3):
        layouts.picture(tmp_path / "img" / f"p{n}.png", n)
        layouts.mask(tmp_path / "gt" / f"mask_p{n}_seg.png")
    with pytest.raises(DatasetImportError, match=r"try -O 'mask_prefix=mask_' -O 'mask_suffix=_seg'"):
        load_dataset("images", tmp_path, images="img", masks="gt")
    manifest = load_dataset(
        "images", tmp_path, images="img", masks="gt", mask_prefix="mask_", mask_suffix="_seg"
    )
    assert manifest.table["mask"].tolist() == ["gt/mask_p1_seg.png", "gt/mask_p2_seg.png"]


def test_tricky_table_every_row_is_accounted_for(tmp_path: Path, layouts) -> None:
    src = layouts.tricky(tmp_path / "tricky")
    manifest = load_dataset("images", src, images="frames", labels="scores.csv", label_columns=["3"], seed=3)
    table = manifest.table
    assert len(table) == 12
    report = accounted(manifest)
    assert [(e["input"], e["items"], e["imported"]) for e in report["inputs"]] == [
        ("image files in 'frames'", 13, 12),
        ("rows of the label table 'scores.csv'", 13, 9),
    ]
    assert reasons(report) == {
        "not an image file (by its suffix)": ["frames/Thumbs.db"],
        "repeats an earlier row": ["scores.csv line 10 'seq2_f001.png' (= scores.csv line 4)"],
        "no image with this id": ["scores.csv line 11 'seq9_f001.png'", "scores.csv line 12 'ghost'"],
        "empty id cell": ["scores.csv line 13"],
    }
    assert reasons(report, "incomplete", "case_id") == {
        "missing label": ["seq1_f003"],
        "no row in the label table": ["seq1_f004", "seq2_f004", "seq3_f004"],
    }
    assert any("subfolder(s) of 'frames' not searched: old" in note for note in report["notes"])
    # "None" is a missing label: never a class, counted as missing
    assert manifest.meta.classes == {"label": ["mild", "moderate", "severe"]}
    summary = summarize(manifest)
    assert summary["labels"]["label"] == {"mild": 2, "moderate": 3, "severe": 3}
    assert summary["missing_labels"] == {"label": 4}
    # frames of one sequence were split apart by the per-image split: reported, with the fix
    assert manifest.meta.extra["near_duplicate_stems_across_splits"]
    warnings = [p for p in validate_manifest(manifest, check_images=False) if p.severity == "warning"]
    assert any("near-duplicate file stems" in p.reason and "--group-regex" in p.reason for p in warnings)
    assert any(p.column == "label" and "4 of 12 rows have no label" in p.reason for p in warnings)


def test_tricky_frames_grouped_by_regex_or_column_stay_together(tmp_path: Path, layouts) -> None:
    src = layouts.tricky(tmp_path / "tricky")
    common = {"images": "frames", "labels": "scores.csv", "label_columns": ["3"], "seed": 3}
    by_regex = load_dataset("images", src, group_regex=r"^(seq\d+)_", **common)
    assert by_regex.table.groupby("patient_id")["split"].nunique().max() == 1
    assert sorted(set(by_regex.table["patient_id"])) == ["seq1", "seq2", "seq3"]
    assert "near_duplicate_stems_across_splits" not in by_regex.meta.extra
    assert "regex" in by_regex.meta.extra["split_source"]
    by_column = load_dataset("images", src, group_by="2", **common)  # the table's patient column
    grouped = by_column.table[by_column.table["attr:column2"] != ""]
    assert grouped.groupby("attr:column2")["split"].nunique().max() == 1
    assert by_column.meta.extra["groups"]["ungrouped_cases"] == ["seq1_f004", "seq2_f004", "seq3_f004"]
    (ungrouped,) = [line for line in import_warnings(by_column.meta) if "no group" in line]
    assert ungrouped.startswith("the column 'attr:column2' gives no group for 3 case(s)")


def test_two_images_with_one_stem_are_an_error(tmp_path: Path, layouts) -> None:
    layouts.picture(tmp_path / "seq1_f001.png", 1)
    layouts.picture(tmp_path / "seq1_f001.jpg", 2)
    with pytest.raises(DatasetImportError, match="two images with the name stem 'seq1_f001'"):
        load_dataset("images", tmp_path)


def test_header_map_drop_and_split_column(tmp_path: Path, layouts) -> None:
    for n in range(1, 7):
        layouts.picture(tmp_path / "img" / f"{n:03d}.png", n)
    frame = pd.DataFrame(
        {
            "file": [f"{n:03d}.png" for n in range(1, 7)],
            "BI-RADS": ["2", "3", "4", "5", "0", "3"],
            "fold": ["train", "train", "Training", "test", "train", "VAL"],
            "Patient ID": ["a", "a", "b", "c", "d", "e"],
        }
    )
    frame.to_excel(tmp_path / "table.xlsx", index=False)
    manifest = load_dataset(
        "images", tmp_path, images="img", labels="table.xlsx", id_column="file", label_columns=["BI-RADS"],
        split_column="fold", map_values={"2": "benign", "3": "benign", "4": "malignant", "5": "malignant"},
        drop_values=["0"], group_by="Patient ID",
    )  # fmt: skip
    table = manifest.table.set_index("case_id")
    assert list(table.index) == ["001", "002", "003", "004", "006"]  # 005 dropped on request, and listed
    assert table["split"].to_dict() == {
        "001": "train",
        "002": "train",
        "003": "train",
        "004": "test",
        "006": "val",
    }
    assert table["label"].tolist() == ["benign", "benign", "malignant", "malignant", "benign"]
    assert table["patient_id"].tolist() == ["a", "a", "b", "c", "e"]
    assert "attr:fold" not in table.columns and "attr:patient_id" in table.columns
    report = accounted(manifest)
    assert reasons(report) == {
        "label value '0' is in drop_values": ["img/005.png"],
        "its image is left out: label value '0' is in drop_values": ["table.xlsx row 6"],
    }
    assert "first row read as the header (file, BI-RADS, fold, Patient ID)" in report["notes"][0]
    assert manifest.meta.extra["split_source"] == "column 'fold' of the label table"


def test_several_label_columns_each_keep_their_classes_and_missing_values(tmp_path: Path, layouts) -> None:
    for n in range(1, 5):
        layouts.picture(tmp_path / f"us{n}.png", n)
    (tmp_path / "labels.tsv").write_text(
        "id\tBI-RADS\tPathology\tsite\nus1\t3\tbenign\tA\nus2\tNone\tmalignant\tB\nus3\t5\tNA\tA\n"
    )
    manifest = load_dataset("images", tmp_path, labels="labels.tsv", label_columns=["BI-RADS", "3"])
    table = manifest.table.set_index("case_id")
    assert [c for c in table.columns if c.startswith(("label", "attr"))] == [
        "label:bi-rads", "label:pathology", "attr:site",
    ]  # fmt: skip
    assert manifest.meta.classes == {"label:bi-rads": ["3", "5"], "label:pathology": ["benign", "malignant"]}
    assert table["label:pathology"].tolist() == ["benign", "malignant", "", ""]
    summary = summarize(manifest)
    assert summary["missing_labels"] == {"label:bi-rads": 2, "label:pathology": 2}
    assert reasons(accounted(manifest), "incomplete", "case_id") == {
        "missing label:bi-rads": ["us2"],
        "missing label:pathology": ["us3"],
        "no row in the label table": ["us4"],
    }


def test_table_ids_that_are_paths_match_by_their_end(tmp_path: Path, layouts) -> None:
    src = layouts.side_by_side(tmp_path / "lgg_like")
    (src / "grades.csv").write_text(
        "path,grade\nlgg_like/P1/P1_1.png,2\nC:\\scans\\P2\\P2_2.png,3\nP3_3,2\nP9/P1_2.png,4\nP1/P9_1.png,4\n"
    )
    manifest = load_dataset(
        "images", src, masks=".", mask_suffix="_mask", recursive=True, labels="grades.csv", label_columns=["grade"]
    )
    labelled = manifest.table[manifest.table["label"] != ""].set_index("case_id")["label"].to_dict()
    # P9/P1_2.png: the folder part differs but P1_2 names one image only, so it is that image
    assert labelled == {"P1_P1_1": "2", "P1_P1_2": "4", "P2_P2_2": "3", "P3_P3_3": "2"}
    assert reasons(accounted(manifest))["no image with this id"] == ["grades.csv line 6 'P1/P9_1.png'"]


def test_split_file_and_images_it_does_not_list(tmp_path: Path, layouts) -> None:
    for n in range(1, 5):
        layouts.picture(tmp_path / f"x{n}.png", n)
    (tmp_path / "splits.tsv").write_text("name\tsplit\nx1\ttrain\nx2\ttest\nx9\ttrain\nx3\tvalidation\n")
    manifest = load_dataset("images", tmp_path, split_file="splits.tsv")
    assert manifest.table.set_index("case_id")["split"].to_dict() == {
        "x1": "train",
        "x2": "test",
        "x3": "val",
    }
    report = accounted(manifest)
    assert reasons(report) == {
        "not in the split file": ["x4.png"],
        "no image with this id": ["splits.tsv line 4 'x9'"],
    }
    assert "split_seeded" not in manifest.meta.extra


def test_header_is_guessed_and_label_columns_are_asked_for(tmp_path: Path, layouts) -> None:
    for n in range(1, 4):
        layouts.picture(tmp_path / "im" / f"a{n}.png", n)
    (tmp_path / "t.csv").write_text("image,diagnosis,age\na1,x,3\na2,y,4\na3,x,5\n")
    with pytest.raises(
        DatasetImportError, match="has columns image, diagnosis, age: choose the label column"
    ):
        load_dataset("images", tmp_path, images="im", labels="t.csv")
    manifest = load_dataset("images", tmp_path, images="im", labels="t.csv", label_columns=["2"])
    assert manifest.table["label"].tolist() == ["x", "y", "x"] and "attr:age" in manifest.table.columns
    assert "first row read as the header (image, diagnosis, age)" in accounted(manifest)["notes"][0]
    with pytest.raises(DatasetImportError, match=r"'diagnsis' is not a column.*did you mean 'diagnosis'"):
        load_dataset("images", tmp_path, images="im", labels="t.csv", label_columns=["diagnsis"])
    with pytest.raises(DatasetImportError, match=r"no row of .* names an image"):
        load_dataset("images", tmp_path, images="im", labels="t.csv", label_columns=["2"], id_column="3")


def test_options_are_checked_with_the_nearest_name(tmp_path: Path, layouts) -> None:
    layouts.picture(tmp_path / "a.png", 1)
    with pytest.raises(
        DatasetImportError, match=r"unknown option 'mask' for the 'images' importer; did you mean masks\?"
    ):
        load_dataset("images", tmp_path, mask="m")
    with pytest.raises(DatasetImportError, match="option seed expects an integer, got 'x'"):
        load_dataset("images", tmp_path, seed="x")
    with pytest.raises(DatasetImportError, match="option header must be one of auto, yes, no"):
        load_dataset("images", tmp_path, header="maybe")
    with pytest.raises(DatasetImportError, match="fractions must be >= 0 and sum to 1"):
        load_dataset("images", tmp_path, fractions=[0.5, 0.2, 0.2])
