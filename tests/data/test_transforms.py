"""The fused pipeline against MONAI's dict transforms it replaced, given the same parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai import transforms as mt

from medalign.data.transforms import (
    AugmentConfig,
    PairedAugment,
    PreprocessConfig,
    build_augment,
    build_preprocess,
    eval_augment,
    normalise,
    pixel_affine,
    resize,
    sampling_grid,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _rgb_and_mask(h: int = 75, w: int = 91, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth RGB image with an off-centre square (flips and rotations show) and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    square = (yy > h // 5) & (yy < h // 2) & (xx > w // 2) & (xx < w - 8)
    base = 60 + 40 * np.sin(yy / 7.0) + 30 * np.cos(xx / 5.0) + 100 * square
    image = np.stack([base, base * 0.8, 255 - base], axis=0) + rng.normal(0, 3, (3, h, w))
    return np.clip(image, 0, 255).astype(np.uint8), (square * 255).astype(np.uint8)[None]


def _monai_preprocess(image: np.ndarray, mask: np.ndarray, size: tuple[int, int], mode: str) -> dict:
    """The previous pipeline: binarise and normalise in float, then MONAI's Resized."""
    data = {
        "image": normalise(image, mode),  # type: ignore[arg-type]
        "mask": (mask.astype(np.float32) / 255 > 0.5).astype(np.float32),
    }
    resized = mt.Resized(["image", "mask"], size, mode=["bilinear", "nearest"], anti_aliasing=False)(data)
    return {k: np.asarray(v, dtype=np.float32) for k, v in resized.items()}


@pytest.mark.parametrize("mode", ["dtype", "zscore"])
def test_preprocess_matches_monai_resize(mode: str) -> None:
    image, mask = _rgb_and_mask()
    out = build_preprocess(["image"], ["mask"], PreprocessConfig(size=(32, 40), normalisation=mode))(
        {"image": image, "mask": mask}
    )
    reference = _monai_preprocess(image, mask, (32, 40), mode)
    assert out["image"].dtype == np.float32 and out["image"].shape == (3, 32, 40)
    assert np.array_equal(out["mask"], reference["mask"])  # nearest then binarise: exactly the same
    # uint8 under "dtype" is resized in 8 bits (documented: within one level); float paths are exact
    tolerance = 1.0001 / 255 if mode == "dtype" else 0.0
    assert np.abs(out["image"] - reference["image"]).max() <= tolerance
    assert tolerance == 0 or np.abs(out["image"] - reference["image"]).max() > 0  # really took the 8-bit path


def test_resize_rejects_a_volume_with_a_2d_size() -> None:
    with pytest.raises(ValueError, match=r"takes a 2D image.*\(1, 4, 8, 8\)"):
        resize(np.zeros((1, 4, 8, 8), np.float32), (4, 4), "bilinear")


@pytest.mark.parametrize("flips", [(), (0,), (0, 1)])
def test_fused_warp_equals_monai_flip_then_affine(flips: tuple[int, ...]) -> None:
    """One grid_sample with flips folded in == RandFlip then MONAI's Affine, on a non-square image."""
    image, mask = _rgb_and_mask(48, 64)
    x = torch.from_numpy(image.astype(np.float32) / 255)
    m = torch.from_numpy(mask.astype(np.float32) / 255)
    angle, shift, zoom = 0.15, [0.04, -0.03], [1.08, 0.93]
    shape = (48, 64)
    grid = sampling_grid(pixel_affine(angle, shift, zoom, flips, shape), shape)
    ours = {
        "image": torch.nn.functional.grid_sample(x[None], grid, align_corners=False)[0],
        "mask": torch.nn.functional.grid_sample(m[None], grid, mode="nearest", align_corners=False)[0],
    }
    for key, data, mode in (("image", x, "bilinear"), ("mask", m, "nearest")):
        flipped = torch.flip(data, [a + 1 for a in flips]) if flips else data
        affine = mt.Affine(
            rotate_params=angle,
            translate_params=[s * n for s, n in zip(shift, shape, strict=True)],
            scale_params=zoom,
            mode=mode,
            padding_mode="zeros",
            image_only=True,
        )
        reference = torch.as_tensor(np.asarray(affine(flipped)))
        different = (ours[key] - reference).abs() > 1e-4
        assert different.float().mean() < 0.002, (key, different.float().mean())  # ties at nearest's 0.5


def _config(**changes: object) -> AugmentConfig:
    base = {"flip_axes": (0, 1), "rotate_degrees": 20, "scale": 0.1, "translate": 0.1, "affine_prob": 1.0}
    return AugmentConfig(**{**base, **changes})  # type: ignore[arg-type]


def test_augment_is_a_function_of_the_seed_and_keeps_masks_binary() -> None:
    image, mask = _rgb_and_mask()
    data = build_preprocess(["image"], ["mask"], PreprocessConfig(size=(40, 40)))(
        {"image": image, "mask": mask}
    )
    augment = build_augment(["image"], ["mask"], _config(intensity_shift=0.1, noise_std=0.05))
    outputs = []
    for seed in (3, 3, 4):
        augment.set_random_state(seed)
        outputs.append([augment(data) for _ in range(4)])
    for first, again in zip(outputs[0], outputs[1], strict=True):
        assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(outputs[0][0]["image"], outputs[2][0]["image"])
    for sample in outputs[0]:
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 40, 40)


def test_flip_only_draws_flip_every_key_and_leave_inputs_alone() -> None:
    image, mask = _rgb_and_mask(32, 32)
    data = {"image": image.astype(np.float32) / 255, "mask": mask.astype(np.float32) / 255}
    before = {k: v.copy() for k, v in data.items()}
    augment = PairedAugment(["image"], ["mask"], _config(affine_prob=0.0, flip_prob=1.0, intensity_shift=0.0))
    out = augment(data)
    for key in data:
        assert torch.equal(out[key], torch.from_numpy(np.flip(data[key], (1, 2)).copy()))
        out[key] += 1  # a caller writing into its sample must not reach a cached array
        assert np.array_equal(data[key], before[key])
    plain = eval_augment(["image"], ["mask"])(data)
    plain["image"] += 1
    assert np.array_equal(data["image"], before["image"])


def test_volume_gets_one_geometry_for_image_and_mask() -> None:
    """(C, D, H, W): the same 3-D grid for both keys (rotation in the H-W plane, zoom/shift per axis)."""
    volume = np.zeros((1, 6, 16, 16), np.float32)
    volume[:, 1:4, 3:9, 9:14] = 1.0
    augment = build_augment(["image"], ["mask"], _config(flip_axes=(2,), intensity_shift=0.0))
    augment.set_random_state(0)
    moved = 0
    for _ in range(3):
        out = augment({"image": volume, "mask": volume})
        assert out["image"].shape == out["mask"].shape == (1, 6, 16, 16)
        assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
        assert ((out["image"] > 0.5).float() != out["mask"]).float().mean() < 0.05  # same geometry
        moved += int(not torch.equal(out["mask"], torch.from_numpy(volume)))
    assert moved == 3
