"""MedMNIST importer on synthetic .npz files: 2D gray/RGB, multi-label, 3D, extraction caching, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medalign.data.importers import DatasetImportError, load_dataset
from medalign.data.readers import read_image
from medalign.data.validation import validate_manifest


def _save_npz(path: Path, shape: tuple[int, ...], labels: dict[str, np.ndarray], **extra: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        f"{split}_images": rng.integers(0, 256, (len(values), *shape), dtype=np.uint8)
        for split, values in labels.items()
    }
    arrays |= {f"{split}_labels": values for split, values in labels.items()}
    np.savez(path, **arrays, **extra)
    return path


SINGLE = {
    "train": np.array([[0], [1], [2], [1]]),
    "val": np.array([[2]]),
    "test": np.array([[0], [1]]),
}


def test_medmnist_single_label_gray(tmp_path: Path) -> None:
    _save_npz(tmp_path / "pathmnist.npz", (6, 6), SINGLE, info=np.array([1]))
    manifest = load_dataset("medmnist", tmp_path)
    table = manifest.table
    assert list(table.columns) == ["case_id", "patient_id", "split", "image", "label"]
    assert table["split"].value_counts().to_dict() == {"train": 4, "test": 2, "val": 1}
    assert table["case_id"].iloc[0] == "pathmnist_train_00000"
    assert table["image"].iloc[6] == "medalign_png/pathmnist/test_00001.png"
    assert table["label"].tolist() == ["0", "1", "2", "1", "2", "0", "1"]
    assert manifest.meta.classes == {"label": ["0", "1", "2"]}
    assert manifest.meta.extra["ignored_keys"] == ["info"]
    with np.load(tmp_path / "pathmnist.npz") as archive:
        expected = archive["test_images"][1]
    assert np.array_equal(read_image(tmp_path / table["image"].iloc[6]).array, expected)
    assert not [p for p in validate_manifest(manifest) if p.severity == "error"]

    written = tmp_path / "medalign_png" / "pathmnist" / "train_00000.png"
    before = written.stat().st_mtime_ns
    named = load_dataset("medmnist", tmp_path, classes=["adipose", "background", "debris"])
    assert written.stat().st_mtime_ns == before  # same bytes: not rewritten
    assert named.table["label"].tolist()[:3] == ["adipose", "background", "debris"]
    assert named.meta.classes == {"label": ["adipose", "background", "debris"]}


def test_medmnist_rgb_multilabel_and_extract_dir(tmp_path: Path) -> None:
    labels = {"train": np.array([[1, 0, 1], [0, 0, 0]]), "test": np.array([[0, 1, 0]])}
    _save_npz(tmp_path / "chest.npz", (5, 5, 3), labels)
    manifest = load_dataset(
        "medmnist", tmp_path, extract_dir="png", classes=["atelectasis", "pleural thickening", "mass"]
    )
    table = manifest.table
    assert list(table.columns) == [
        "case_id",
        "patient_id",
        "split",
        "image",
        "label:atelectasis",
        "label:pleural_thickening",
        "label:mass",
    ]
    assert table["label:mass"].tolist() == ["1", "0", "0"]
    assert table["image"].iloc[0] == "png/train_00000.png"
    assert manifest.meta.classes["label:mass"] == ["0", "1"]
    assert read_image(tmp_path / "png" / "train_00000.png").array.shape == (5, 5, 3)
    assert not [p for p in validate_manifest(manifest) if p.severity == "error"]
    unnamed = load_dataset("medmnist", tmp_path, extract_dir="png")
    assert [c for c in unnamed.table.columns if c.startswith("label")] == ["label:0", "label:1", "label:2"]


def test_medmnist_volumes_become_npy(tmp_path: Path) -> None:
    _save_npz(tmp_path / "organmnist3d.npz", (4, 6, 6), {"train": np.array([[3], [1]])})
    manifest = load_dataset("medmnist", tmp_path)
    assert manifest.table["image"].tolist() == [
        "medalign_png/organmnist3d/train_00000.npy",
        "medalign_png/organmnist3d/train_00001.npy",
    ]
    assert np.load(tmp_path / manifest.table["image"].iloc[1]).shape == (4, 6, 6)
    assert manifest.meta.classes == {"label": ["0", "1", "2", "3"]}


def test_medmnist_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetImportError, match=r"holds 0 \.npz files"):
        load_dataset("medmnist", tmp_path)
    _save_npz(tmp_path / "a.npz", (4, 4), SINGLE)
    _save_npz(tmp_path / "b.npz", (4, 4), SINGLE)
    with pytest.raises(DatasetImportError, match=r"a\.npz, b\.npz.*pass npz"):
        load_dataset("medmnist", tmp_path)
    with pytest.raises(DatasetImportError, match="is not a folder"):
        load_dataset("medmnist", tmp_path / "a.npz")
    with pytest.raises(DatasetImportError, match="classes has 2 names"):
        load_dataset("medmnist", tmp_path, npz="a.npz", classes=["x", "y"])
    np.savez(tmp_path / "c.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetImportError, match="train_images but no train_labels"):
        load_dataset("medmnist", tmp_path, npz="c.npz")
    np.savez(tmp_path / "d.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((3, 1)))
    with pytest.raises(DatasetImportError, match="has 2 entries but train_labels has 3"):
        load_dataset("medmnist", tmp_path, npz="d.npz")
    np.savez(tmp_path / "e.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetImportError, match="none of train_images"):
        load_dataset("medmnist", tmp_path, npz="e.npz")


def test_medmnist_damaged_archives_are_named(tmp_path: Path) -> None:
    """Found by benchmarks/fuzz.py: zipfile errors surfaced raw, and non-.npy members came back as bytes."""
    import zipfile

    data = _save_npz(tmp_path / "a.npz", (4, 4), SINGLE).read_bytes()
    (tmp_path / "a.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetImportError, match=r"cannot read '.*a\.npz': BadZipFile"):
        load_dataset("medmnist", tmp_path)
    with zipfile.ZipFile(tmp_path / "a.npz", "w") as archive:
        archive.writestr("train_images", b"raw")
        archive.writestr("train_labels.npy", b"raw")
    with pytest.raises(DatasetImportError, match=r"a\.npz': 'train_images' is not a \.npy array"):
        load_dataset("medmnist", tmp_path)


def test_extract_dir_outside_the_source_is_allowed_explicitly(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    _save_npz(tmp_path / "src" / "pathmnist.npz", (6, 6), SINGLE)
    inside = load_dataset("medmnist", tmp_path / "src")
    assert not inside.meta.allow_outside_root
    outside = load_dataset("medmnist", tmp_path / "src", extract_dir=str(tmp_path / "pngs"))
    assert outside.table["image"].iloc[0] == "../pngs/train_00000.png"
    assert outside.meta.allow_outside_root  # the user's option put the files there
    assert not [p for p in validate_manifest(outside) if p.severity == "error"]
