"""MedMNIST importer on synthetic .npz files: 2D gray/RGB, multi-label, 3D, extraction caching, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medalign.data.importers import DatasetImportError, import_dataset, load_dataset
from medalign.data.manifest import read_manifest
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
    out = tmp_path / "manifests" / "path.csv"
    manifest = load_dataset("medmnist", tmp_path, out=out)
    table = manifest.table
    assert list(table.columns) == ["case_id", "patient_id", "split", "image", "label"]
    assert table["split"].value_counts().to_dict() == {"train": 4, "test": 2, "val": 1}
    assert table["case_id"].iloc[0] == "pathmnist_train_00000"
    # extracted next to the output manifest, which becomes the root; the dataset folder is untouched
    assert manifest.root == (tmp_path / "manifests" / "pathmnist").resolve()
    assert table["image"].iloc[6] == "test_00001.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifests", "pathmnist.npz"]
    assert table["label"].tolist() == ["0", "1", "2", "1", "2", "0", "1"]
    assert manifest.meta.classes == {"label": ["0", "1", "2"]}
    assert manifest.meta.extra["ignored_keys"] == ["info"]
    with np.load(tmp_path / "pathmnist.npz") as archive:
        expected = archive["test_images"][1]
    assert np.array_equal(read_image(manifest.resolve(table["image"].iloc[6])).array, expected)
    assert not [p for p in validate_manifest(manifest) if p.severity == "error"]

    written = manifest.root / "train_00000.png"
    before = written.stat().st_mtime_ns
    named = load_dataset("medmnist", tmp_path, out=out, classes=["adipose", "background", "debris"])
    assert written.stat().st_mtime_ns == before  # same bytes: not rewritten
    assert named.table["label"].tolist()[:3] == ["adipose", "background", "debris"]
    assert named.meta.classes == {"label": ["adipose", "background", "debris"]}


def test_medmnist_takes_the_npz_path_and_says_what_was_imported(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    npz = _save_npz(tmp_path / "data" / "pathmnist.npz", (6, 6), SINGLE)
    out = tmp_path / "work" / "pathmnist.csv"
    import_dataset("medmnist", npz, out)
    written = read_manifest(out)
    assert len(written) == 7 and not written.meta.allow_outside_root
    assert (tmp_path / "work" / "pathmnist" / "train_00000.png").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["pathmnist.npz"]
    assert written.meta.source == str(npz.resolve())
    assert "pathmnist.npz" in written.meta.description and "medmnist" in written.meta.description
    assert not [p for p in validate_manifest(written) if p.severity == "error"]
    with pytest.raises(DatasetImportError, match="give extract_dir, or an output manifest"):
        load_dataset("medmnist", npz)


def test_medmnist_rgb_multilabel_and_extract_dir(tmp_path: Path) -> None:
    labels = {"train": np.array([[1, 0, 1], [0, 0, 0]]), "test": np.array([[0, 1, 0]])}
    _save_npz(tmp_path / "chest.npz", (5, 5, 3), labels)
    manifest = load_dataset(
        "medmnist", tmp_path, extract_dir="png", classes=["atelectasis", "pleural thickening", "mass"]
    )
    assert manifest.root == (tmp_path / "png").resolve()
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
    assert table["image"].iloc[0] == "train_00000.png"
    assert manifest.meta.classes["label:mass"] == ["0", "1"]
    assert read_image(tmp_path / "png" / "train_00000.png").array.shape == (5, 5, 3)
    assert not [p for p in validate_manifest(manifest) if p.severity == "error"]
    unnamed = load_dataset("medmnist", tmp_path, extract_dir="png")
    assert [c for c in unnamed.table.columns if c.startswith("label")] == ["label:0", "label:1", "label:2"]


def test_medmnist_volumes_become_npy(tmp_path: Path) -> None:
    _save_npz(tmp_path / "organmnist3d.npz", (4, 6, 6), {"train": np.array([[3], [1]])})
    manifest = load_dataset("medmnist", tmp_path, out=tmp_path / "organ.csv")
    assert manifest.table["image"].tolist() == ["train_00000.npy", "train_00001.npy"]
    assert np.load(manifest.resolve(manifest.table["image"].iloc[1])).shape == (4, 6, 6)
    assert manifest.meta.classes == {"label": ["0", "1", "2", "3"]}


def test_medmnist_errors(tmp_path: Path) -> None:
    out = tmp_path / "out" / "m.csv"
    with pytest.raises(DatasetImportError, match=r"holds 0 \.npz files"):
        load_dataset("medmnist", tmp_path, out=out)
    _save_npz(tmp_path / "a.npz", (4, 4), SINGLE)
    _save_npz(tmp_path / "b.npz", (4, 4), SINGLE)
    with pytest.raises(DatasetImportError, match=r"a\.npz, b\.npz.*pass npz"):
        load_dataset("medmnist", tmp_path, out=out)
    with pytest.raises(DatasetImportError, match="is already a file"):
        load_dataset("medmnist", tmp_path / "a.npz", out=out, npz="b.npz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetImportError, match=r"is not a \.npz file"):
        load_dataset("medmnist", tmp_path / "notes.txt", out=out)
    with pytest.raises(DatasetImportError, match="classes has 2 names"):
        load_dataset("medmnist", tmp_path, out=out, npz="a.npz", classes=["x", "y"])
    np.savez(tmp_path / "c.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetImportError, match="train_images but no train_labels"):
        load_dataset("medmnist", tmp_path, out=out, npz="c.npz")
    np.savez(tmp_path / "d.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((3, 1)))
    with pytest.raises(DatasetImportError, match="has 2 entries but train_labels has 3"):
        load_dataset("medmnist", tmp_path, out=out, npz="d.npz")
    np.savez(tmp_path / "e.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetImportError, match="none of train_images"):
        load_dataset("medmnist", tmp_path, out=out, npz="e.npz")


def test_medmnist_damaged_archives_are_named(tmp_path: Path) -> None:
    """Found by benchmarks/fuzz.py: zipfile errors surfaced raw, and non-.npy members came back as bytes."""
    import zipfile

    data = _save_npz(tmp_path / "a.npz", (4, 4), SINGLE).read_bytes()
    (tmp_path / "a.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetImportError, match=r"cannot read '.*a\.npz': BadZipFile"):
        load_dataset("medmnist", tmp_path, extract_dir="png")
    with zipfile.ZipFile(tmp_path / "a.npz", "w") as archive:
        archive.writestr("train_images", b"raw")
        archive.writestr("train_labels.npy", b"raw")
    with pytest.raises(DatasetImportError, match=r"a\.npz': 'train_images' is not a \.npy array"):
        load_dataset("medmnist", tmp_path, extract_dir="png")


def test_extract_dir_outside_the_source_is_the_root(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    _save_npz(tmp_path / "src" / "pathmnist.npz", (6, 6), SINGLE)
    outside = load_dataset("medmnist", tmp_path / "src", extract_dir=str(tmp_path / "pngs"))
    assert outside.table["image"].iloc[0] == "train_00000.png"
    assert outside.root == (tmp_path / "pngs").resolve() and not outside.meta.allow_outside_root
    assert not [p for p in validate_manifest(outside) if p.severity == "error"]
