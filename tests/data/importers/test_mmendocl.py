"""MM-EndoCL importer: paired modalities, overlapping vs disjoint CSVs, broken CSVs, the demo release."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medalign.data.importers import DatasetImportError, load_dataset
from medalign.data.validation import validate_manifest

HEADER = "wli_path,nbi_path,label_path\n"


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 9), value, dtype=np.uint8)).save(path)


def _line(case: str) -> str:
    return f"imgs/{case}_1.png,imgs/{case}_2.png,imgs/{case}_1_label.png\n"


def make_endo(root: Path, cases: list[str]) -> Path:
    for case in cases:
        _png(root / "imgs" / f"{case}_1.png", 100)
        _png(root / "imgs" / f"{case}_2.png", 150)
        _png(root / "imgs" / f"{case}_1_label.png", 255)
    return root


def test_mmendocl_identical_csvs_are_merged_and_resplit(tmp_path: Path) -> None:
    cases = [f"1_{n:04d}" for n in range(10)]
    make_endo(tmp_path, cases)
    body = HEADER + "".join(_line(c) for c in cases)
    (tmp_path / "Training.csv").write_text(body)
    (tmp_path / "Test.csv").write_text(body)
    manifest = load_dataset("mmendocl", tmp_path)
    table = manifest.table
    assert list(table.columns) == ["case_id", "patient_id", "split", "image:wli", "image:nbi", "mask"]
    assert table["case_id"].tolist() == cases
    row = table.iloc[0]
    assert (row["image:wli"], row["image:nbi"], row["mask"]) == (
        "imgs/1_0000_1.png",
        "imgs/1_0000_2.png",
        "imgs/1_0000_1_label.png",
    )
    assert table["split"].value_counts().to_dict() == {"train": 7, "test": 2, "val": 1}
    assert manifest.meta.extra["overlap_between_csvs"]["1_0003"] == ["Training.csv", "Test.csv"]
    assert len(manifest.meta.extra["overlap_between_csvs"]) == 10
    assert load_dataset("mmendocl", tmp_path).table.equals(table)
    assert not [p for p in validate_manifest(manifest) if p.severity == "error"]


def test_mmendocl_disjoint_csvs_give_the_split(tmp_path: Path) -> None:
    make_endo(tmp_path, ["a", "b", "c", "d"])
    (tmp_path / "Training.csv").write_text(HEADER + _line("a") + _line("b"))
    (tmp_path / "Val.csv").write_text(HEADER + _line("c"))
    (tmp_path / "Test.csv").write_text(HEADER + _line("d").replace("\n", "") + "\n")
    manifest = load_dataset("mmendocl", tmp_path)
    assert manifest.table.set_index("case_id")["split"].to_dict() == {
        "a": "train",
        "b": "train",
        "c": "val",
        "d": "test",
    }
    assert manifest.meta.extra["overlap_between_csvs"] == {}
    assert manifest.meta.extra["split_source"] == "csv file names"
    only = load_dataset("mmendocl", tmp_path, csv="Val.csv")
    assert only.table["case_id"].tolist() == ["c"] and only.table["split"].tolist() == ["val"]


def test_mmendocl_paths_are_relative_to_the_csv_folder(tmp_path: Path) -> None:
    make_endo(tmp_path / "data", ["a"])
    (tmp_path / "data" / "Training.csv").write_text(HEADER + _line("a"))
    manifest = load_dataset("mmendocl", tmp_path, csv="data/Training.csv")
    assert manifest.table["image:wli"].tolist() == ["data/imgs/a_1.png"]


def test_mmendocl_broken_csvs_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetImportError, match="no split CSV"):
        load_dataset("mmendocl", tmp_path)
    make_endo(tmp_path, ["a", "b"])
    (tmp_path / "Training.csv").write_text("wli_path,nbi\nx,y\n")
    with pytest.raises(
        DatasetImportError, match=r"Training\.csv' lacks column\(s\) \['nbi_path', 'label_path'\]"
    ):
        load_dataset("mmendocl", tmp_path)
    (tmp_path / "Training.csv").write_text(HEADER + _line("a") + "imgs/b_1.png,,imgs/b_1_label.png\n")
    with pytest.raises(DatasetImportError, match=r"Training\.csv' line 3: empty nbi_path"):
        load_dataset("mmendocl", tmp_path)
    (tmp_path / "Training.csv").write_text(HEADER + _line("a") + _line("a"))
    with pytest.raises(
        DatasetImportError, match=r"line 3: wli_path 'imgs/a_1\.png' is already listed on line 2"
    ):
        load_dataset("mmendocl", tmp_path)
    (tmp_path / "Training.csv").write_text(HEADER + _line("a"))
    (tmp_path / "Test.csv").write_text(HEADER + "imgs/a_1.png,imgs/b_2.png,imgs/a_1_label.png\n")
    with pytest.raises(DatasetImportError, match=r"Test\.csv' line 2.*other NBI/mask paths"):
        load_dataset("mmendocl", tmp_path)


@pytest.mark.realdata
def test_mmendocl_real_demo(real_dataset) -> None:
    manifest = load_dataset("mmendocl", real_dataset("wli-nbi-demo"))
    table = manifest.table
    assert len(table) == 17
    assert len(manifest.meta.extra["overlap_between_csvs"]) == 17
    assert table["split"].value_counts().to_dict() == {"train": 12, "test": 3, "val": 2}
    problems = validate_manifest(manifest)
    assert not [p for p in problems if p.severity == "error"], problems[:5]


def test_mmendocl_clashing_case_ids_name_the_csv(tmp_path: Path) -> None:
    """Found by benchmarks/fuzz.py: the clash error named two image paths but not the CSV listing them."""
    make_endo(tmp_path, ["a b", "a_b"])
    (tmp_path / "Training.csv").write_text("wli_path,nbi_path,label_path\n" + _line("a b") + _line("a_b"))
    with pytest.raises(DatasetImportError, match=r"Training\.csv'.*same case_id 'imgs_a_b_1'"):
        load_dataset("mmendocl", tmp_path)
