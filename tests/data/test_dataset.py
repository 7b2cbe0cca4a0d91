from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medalign.data.dataset import Collator, DatasetConfig, ManifestDataset, SampleError, make_loader
from medalign.data.manifest import Manifest, ManifestMeta, new_table
from medalign.data.transforms import AugmentConfig, PreprocessConfig


def _case(root: Path, name: str, rng: np.random.Generator, size: int = 64) -> dict[str, str]:
    """Modality b is the negative of a and the mask is a's bright region, so any misalignment shows."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
    blob = ((yy - cy) ** 2 / 120 + (xx - cx) ** 2 / 40) < 1.0
    square = (yy > 5) & (yy < 20) & (xx > 40) & (xx < 58)  # asymmetric, so flips and rotations show
    a = np.where(blob | square, 220, 30).astype(np.uint8)
    Image.fromarray(a).save(root / f"{name}_a.png")
    Image.fromarray(255 - a).save(root / f"{name}_b.png")
    Image.fromarray(((blob | square) * 255).astype(np.uint8)).save(root / f"{name}_m.png")
    return {"case_id": name, "image:a": f"{name}_a.png", "image:b": f"{name}_b.png", "mask": f"{name}_m.png"}


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    rng = np.random.default_rng(0)
    rows = [_case(tmp_path, f"c{i}", rng) | {"label": "xy"[i % 2], "text": f"case {i}"} for i in range(6)]
    rows[1]["image:b"] = ""  # a missing modality
    return Manifest(new_table(rows), tmp_path, ManifestMeta(classes={"label": ["x", "y"]}))


def test_augmentation_moves_every_modality_and_mask_together(manifest: Manifest) -> None:
    config = DatasetConfig(
        preprocess=PreprocessConfig(size=(64, 64)),
        augment=AugmentConfig(
            flip_axes=(0, 1),
            rotate_degrees=30,
            scale=0.2,
            translate=0.1,
            affine_prob=1.0,
            intensity_shift=0.0,
        ),
    )
    dataset = ManifestDataset(manifest, config)
    dataset.set_random_state(1)
    moved = 0
    for index in (0, 2, 3, 4):
        reference = ManifestDataset(manifest, DatasetConfig(preprocess=PreprocessConfig(size=(64, 64))))[
            index
        ]
        for _ in range(3):
            sample = dataset[index]
            a, b, mask = sample["image:a"][0], sample["image:b"][0], sample["mask"][0]
            padding = ((a + b) < 0.9).float()[None, None]  # zeros the affine brought in, and their border
            inside = torch.nn.functional.max_pool2d(padding, 5, stride=1, padding=2)[0, 0] == 0
            bright = a > 0.5
            iou = (bright & (mask > 0)).sum() / max((bright | (mask > 0)).sum(), 1)
            assert iou > 0.9, iou
            assert inside.float().mean() > 0.5
            assert torch.allclose(
                (a + b)[inside], torch.ones(1), atol=0.05
            )  # b is still 1 - a (misalignment gives ~0.7)
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            moved += int(not torch.equal(mask, reference["mask"][0]))
    assert moved >= 10  # the transform really changed geometry


def test_sample_fields_missing_modality_and_labels(manifest: Manifest) -> None:
    dataset = ManifestDataset(manifest, DatasetConfig(preprocess=PreprocessConfig(size=(32, 48))))
    sample = dataset[1]
    assert sample["image:a"].shape == (1, 32, 48)
    assert torch.count_nonzero(sample["image:b"]) == 0
    assert sample["modalities_present"].tolist() == [True, False]
    assert sample["label"] == 1 and sample["text"] == "case 1" and sample["case_id"] == "c1"
    assert float(sample["image:a"].max()) <= 1.0


def test_per_modality_normalisation_is_independent(manifest: Manifest) -> None:
    dataset = ManifestDataset(
        manifest, DatasetConfig(preprocess=PreprocessConfig(size=None, normalisation="zscore"))
    )
    sample = dataset[0]
    for key in ("image:a", "image:b"):
        assert abs(float(sample[key].mean())) < 1e-4 and abs(float(sample[key].std()) - 1) < 0.02


def test_loader_collates_tokenises_and_is_seeded(manifest: Manifest) -> None:
    class Tokenizer:
        def __call__(self, texts, **kwargs):
            ids = torch.tensor([[len(t), 1] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    config = DatasetConfig(preprocess=PreprocessConfig(size=(32, 32)), augment=AugmentConfig())
    batches = []
    for _ in range(2):
        loader = make_loader(
            ManifestDataset(manifest, config),
            batch_size=3,
            shuffle=True,
            seed=5,
            collate=Collator(Tokenizer()),
        )
        batches.append(next(iter(loader)))
    first, second = batches
    assert first["image:a"].shape == (3, 1, 32, 32) and first["label"].dtype == torch.int64
    assert first["input_ids"].shape == (3, 2)
    assert first["case_id"] == second["case_id"]
    assert torch.equal(first["image:a"], second["image:a"])


def test_worker_loader_matches_itself(manifest: Manifest) -> None:
    config = DatasetConfig(preprocess=PreprocessConfig(size=(32, 32)), augment=AugmentConfig())
    runs = [
        torch.cat(
            [
                b["mask"]
                for b in make_loader(ManifestDataset(manifest, config), batch_size=2, num_workers=2, seed=7)
            ]
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cache_returns_identical_preprocessed_arrays(manifest: Manifest, tmp_path: Path, cache: str) -> None:
    target = str(tmp_path / "cache") if cache == "disk" else "memory"
    plain = ManifestDataset(manifest, DatasetConfig(preprocess=PreprocessConfig(size=(32, 32))))
    cached = ManifestDataset(
        manifest, DatasetConfig(preprocess=PreprocessConfig(size=(32, 32)), cache=target)
    )
    for _ in range(2):
        for index in range(len(plain)):
            assert torch.equal(plain[index]["image:a"], cached[index]["image:a"])
    if cache == "disk":
        assert len(list((tmp_path / "cache").glob("*.npz"))) == len(plain)


def test_unreadable_image_names_case_and_column(manifest: Manifest, tmp_path: Path) -> None:
    (tmp_path / "c3_a.png").write_bytes(b"not a png")
    dataset = ManifestDataset(manifest, DatasetConfig(preprocess=PreprocessConfig(size=(32, 32))))
    with pytest.raises(SampleError, match=r"case 'c3' \(row 4\), column 'image:a'"):
        dataset[3]


def test_channels_option_and_batch_shape_error(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "gray.png")
    manifest = Manifest(
        new_table([{"case_id": "r", "image": "rgb.png"}, {"case_id": "g", "image": "gray.png"}]), tmp_path
    )
    mixed = ManifestDataset(manifest, DatasetConfig(preprocess=PreprocessConfig(size=(8, 8))))
    with pytest.raises(SampleError, match="cannot batch 'image'"):
        Collator()([mixed[0], mixed[1]])
    forced = ManifestDataset(manifest, DatasetConfig(preprocess=PreprocessConfig(size=(8, 8)), channels=3))
    assert Collator()([forced[0], forced[1]])["image"].shape == (2, 3, 8, 8)


def test_blank_scans_load_finite_and_paths_outside_the_root_are_refused_up_front(
    manifest: Manifest, tmp_path: Path
) -> None:
    from medalign.data.manifest import ManifestError

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "blank.png")
    table = manifest.table.copy()
    table.loc[0, "image:a"] = "blank.png"
    for mode in ("dtype", "minmax", "zscore", "percentile"):  # no division by a zero range
        config = DatasetConfig(preprocess=PreprocessConfig(size=(64, 64), normalisation=mode))
        sample = ManifestDataset(Manifest(table, tmp_path, manifest.meta), config)[0]
        assert torch.isfinite(sample["image:a"]).all() and float(sample["image:a"].abs().max()) == 0.0, mode
    table.loc[2, "mask"] = "../../etc/passwd"
    with pytest.raises(ManifestError, match=r"row 3 \(case_id=c2\), column 'mask': '\.\./\.\./etc/passwd'"):
        ManifestDataset(Manifest(table, tmp_path, manifest.meta))
