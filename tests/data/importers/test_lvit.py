"""LViT/C2FVL importer: xlsx text and attributes, the release's name mismatches, broken layouts, MoNuSeg-text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medalign.data.importers import DatasetImportError, load_dataset
from medalign.data.validation import validate_manifest


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _case(folder: Path, image_name: str, mask_name: str) -> None:
    _save(folder / "img" / image_name, np.full((8, 8, 3), 90, dtype=np.uint8))
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:5, 2:5] = 255
    _save(folder / "labelcol" / mask_name, mask)


def make_lvit(root: Path) -> Path:
    """Train: PNGs plus C2FVL-style columns; Val: an image without text and a text without image;
    Test: TIFF images listed as PNG (as in MoNuSeg) and QaTa-style ``mask_`` names."""
    train = root / "Train_Folder"
    for name in ("a1", "a2", "a3"):
        _case(train, f"{name}.png", f"{name}.png")
    pd.DataFrame(
        {
            "Image": ["a1.png", "a2.png", "a3.png"],
            "Description": ["one lesion left", "two lesions", "none"],
            "Lesion Count": ["1", "2", "0"],
            "Side": ["left", "both", ""],
        }
    ).to_excel(train / "Train_text.xlsx", index=False)
    val = root / "Val_Folder"
    _case(val, "b1.png", "b1.png")
    _case(val, "b2.png", "b2.png")
    pd.DataFrame({"Image": ["b1.png", "b9.png"], "Description": ["text b1", "text b9"]}).to_excel(
        val / "Val_text.xlsx"
    )  # index=True: pandas writes an 'Unnamed: 0' column
    test = root / "Test_Folder"
    _case(test, "c1.tif", "c1.png")
    _case(test, "covid_2.png", "mask_covid_2.png")
    pd.DataFrame({"Image": ["c1.png", "mask_covid_2.png"], "Description": ["text c1", "text c2"]}).to_excel(
        test / "Test_text.xlsx", index=False
    )
    return root


def test_lvit_rows_text_attrs_and_splits(tmp_path: Path) -> None:
    manifest = load_dataset("lvit", make_lvit(tmp_path))
    table = manifest.table.set_index("case_id")
    assert list(manifest.table.columns) == [
        "case_id",
        "patient_id",
        "split",
        "image",
        "mask",
        "text",
        "attr:lesion_count",
        "attr:side",
    ]
    assert manifest.table["split"].tolist() == ["train"] * 3 + ["val"] * 3 + ["test"] * 2
    assert table.loc["a2", "text"] == "two lesions"
    assert (table.loc["a2", "attr:lesion_count"], table.loc["a2", "attr:side"]) == ("2", "both")
    assert table.loc["b1", "attr:side"] == ""
    assert (table.loc["c1", "image"], table.loc["c1", "mask"], table.loc["c1", "text"]) == (
        "Test_Folder/img/c1.tif",
        "Test_Folder/labelcol/c1.png",
        "text c1",
    )
    assert (table.loc["covid_2", "image"], table.loc["covid_2", "mask"], table.loc["covid_2", "text"]) == (
        "Test_Folder/img/covid_2.png",
        "Test_Folder/labelcol/mask_covid_2.png",
        "text c2",
    )
    extra = manifest.meta.extra
    assert extra["images_without_text"] == ["Val_Folder/img/b2.png"]
    assert table.loc["b2", "text"] == ""
    assert extra["text_without_image"] == ["Val_Folder/Val_text.xlsx row 3"]
    assert table.loc["b9", "image"] == "Val_Folder/img/b9.png"
    assert extra["ignored_columns"] == ["Val_Folder/Val_text.xlsx:Unnamed: 0"]
    flagged = {p.case_id for p in validate_manifest(manifest) if p.severity == "error"}
    assert flagged == {"b9"}


def test_lvit_broken_layouts_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetImportError, match="Train_Folder"):
        load_dataset("lvit", tmp_path)
    make_lvit(tmp_path)
    (tmp_path / "Train_Folder" / "labelcol" / "a3.png").unlink()
    with pytest.raises(DatasetImportError, match=r"without a mask.*Train_Folder/img/a3\.png"):
        load_dataset("lvit", tmp_path)
    _case(tmp_path / "Train_Folder", "a3.png", "a3.png")
    (tmp_path / "Val_Folder" / "Val_text.xlsx").unlink()
    with pytest.raises(DatasetImportError, match=r"Val_text\.xlsx' does not exist"):
        load_dataset("lvit", tmp_path)
    pd.DataFrame({"Image": ["b1.png"], "Caption": ["x"]}).to_excel(tmp_path / "Val_Folder" / "Val_text.xlsx")
    with pytest.raises(DatasetImportError, match=r"Val_text\.xlsx' lacks column\(s\) \['Description'\]"):
        load_dataset("lvit", tmp_path)
    with pytest.raises(DatasetImportError, match=r"Train_text\.xlsx' lacks column\(s\) \['Caption'\]"):
        load_dataset("lvit", tmp_path, text_column="Caption")
    pd.DataFrame({"Image": ["b1.png", "", "b1.png"], "Description": ["x", "y", "z"]}).to_excel(
        tmp_path / "Val_Folder" / "Val_text.xlsx", index=False
    )
    with pytest.raises(DatasetImportError, match=r"Val_text\.xlsx' row 3: empty 'Image'"):
        load_dataset("lvit", tmp_path)


@pytest.mark.realdata
def test_lvit_real_monuseg_text(real_dataset) -> None:
    manifest = load_dataset("lvit", real_dataset("monuseg-text"))
    table = manifest.table
    assert table["split"].value_counts().to_dict() == {"train": 24, "test": 14, "val": 6}
    assert (table["text"] != "").all()
    assert not manifest.meta.extra["images_without_text"] and not manifest.meta.extra["text_without_image"]
    problems = validate_manifest(manifest)
    assert not [p for p in problems if p.severity == "error"], problems[:5]


def test_lvit_damaged_xlsx_is_named(tmp_path: Path) -> None:
    """Found by benchmarks/fuzz.py: an unsupported zip compression method surfaced as NotImplementedError."""
    xlsx = make_lvit(tmp_path) / "Train_Folder" / "Train_text.xlsx"
    data = bytearray(xlsx.read_bytes())
    at = data.find(b"PK\x01\x02")  # central directory: zipfile takes the compression method from here
    while at != -1:
        data[at + 10 : at + 12] = (99).to_bytes(2, "little")
        at = data.find(b"PK\x01\x02", at + 4)
    xlsx.write_bytes(bytes(data))
    with pytest.raises(DatasetImportError, match=r"cannot read '.*Train_text\.xlsx': NotImplementedError"):
        load_dataset("lvit", tmp_path)


def test_unpaired_images_and_text_rows_are_reported_by_name(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medalign.cli import app

    out = tmp_path / "m.csv"
    imported = CliRunner().invoke(
        app, ["data", "import", "lvit", str(make_lvit(tmp_path / "src")), "--out", str(out)]
    )
    assert imported.exit_code == 0, imported.output
    assert "note: images_without_text (1): Val_Folder/img/b2.png" in imported.output
    assert "note: text_without_image (1): Val_Folder/Val_text.xlsx row 3" in imported.output
    validated = CliRunner().invoke(app, ["data", "validate", str(out)])
    assert validated.exit_code == 1
    assert "warning: row 5 (case_id=b2), column 'text': empty text" in validated.output
    assert "error: row 6 (case_id=b9), column 'image'" in validated.output and "b9.png" in validated.output
