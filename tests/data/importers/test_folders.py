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


# Identifying values of every kind the privacy rule names; none may appear in anything written or printed.
IDENTITY: dict[str, str] = {
    "PatientName": "Doe^Jane^Secret",
    "PatientID": "PID-998877",
    "PatientBirthDate": "19610203",
    "PatientAddress": "12 Secret Lane",
    "OtherPatientIDs": "OTHER-4455",
    "InstitutionName": "St Hidden Hospital",
    "ReferringPhysicianName": "Dr^Whoknows",
    "AccessionNumber": "ACC-778899",
    "StudyDate": "20240229",
}


def test_dicom_identity_reaches_no_written_file_and_no_output(tmp_path: Path, caplog) -> None:
    """folders import -> validate -> predict masks / classify on DICOMs that carry patient identity."""
    import logging

    import torch
    from pydicom import examples
    from typer.testing import CliRunner

    from medalign.bundle import save_bundle
    from medalign.cli import app
    from medalign.models import create_model

    for label, shift in [("benign", 0), ("malignant", 50)]:
        ds = examples.ct  # a real CT slice (128 x 128, int16, rescaled to HU)
        for keyword, value in IDENTITY.items():
            setattr(ds, keyword, value)
        ds.PixelData = (ds.pixel_array + shift).astype(ds.pixel_array.dtype).tobytes()
        (tmp_path / "src" / label).mkdir(parents=True)
        ds.save_as(tmp_path / "src" / label / f"scan_{label}.dcm")
    torch.manual_seed(0)
    work = tmp_path / "work"
    unet = save_bundle(create_model("unet", image_size=32, channels=[4, 8, 16]), work / "unet")
    align = save_bundle(create_model("align_tiny", in_channels=1, image_size=32), work / "align")
    src, manifest = str(tmp_path / "src"), str(work / "m.csv")
    commands = [
        ["data", "import", "folders", src, "--out", manifest],
        ["data", "validate", manifest],
        ["data", "summary", manifest],
        ["predict", "masks", "--model", str(unet), src, "--out", str(work / "masks"), "--probabilities"],
        [
            "predict",
            "classify",
            "--model",
            str(align),
            src,
            "--out",
            str(work / "cls"),
            "-l",
            "benign",
            "-l",
            "x",
        ],
    ]
    printed = []
    with caplog.at_level(logging.DEBUG):
        for args in commands:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, (args, result.output)
            printed.append(result.output + (result.stderr if result.stderr_bytes else ""))
    written = [p for p in work.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert {p.name for p in written} >= {
        "m.csv",
        "m.meta.json",
        "results.csv",
        "results.json",
        "scan_benign.png",
    }
    secrets = [*IDENTITY.values(), "Doe", "Secret", "Whoknows", "Hidden Hospital", "19610203"]
    for secret in secrets:
        assert secret not in "\n".join(printed) + caplog.text, secret
        for path in written:
            assert secret.encode() not in path.read_bytes(), (secret, path)
