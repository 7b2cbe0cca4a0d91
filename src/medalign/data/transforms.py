"""Paired, geometry-consistent preprocessing and augmentation built from MONAI dict transforms.

Every modality and every mask of a case pass through the same spatial transform (MONAI
dict transforms draw one set of random parameters per call and apply it to all keys), so
image:wli, image:nbi and mask stay co-registered. Intensity normalisation is per modality
because modalities have unrelated intensity scales (CT in HU, MR arbitrary, RGB 0-255).

The pipeline is split in two: ``preprocess`` (deterministic: binarise masks, normalise,
resize) can be cached; ``augment`` (random) runs every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from monai import transforms as mt

Normalisation = Literal["dtype", "minmax", "zscore", "percentile", "none"]
Sample = dict[str, Any]


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation. Flips default off: they swap left/right, which reports name."""

    flip_axes: tuple[
        int, ...
    ] = ()  # spatial axes to flip with probability flip_prob (0=vertical, 1=horizontal)
    flip_prob: float = 0.5
    rotate_degrees: float = 10.0
    scale: float = 0.1  # zoom in [1-scale, 1+scale]
    translate: float = 0.05  # fraction of the image side
    affine_prob: float = 0.8
    intensity_shift: float = 0.1  # per-modality random intensity offset (in normalised units)
    intensity_prob: float = 0.5
    noise_std: float = 0.0


@dataclass(frozen=True)
class PreprocessConfig:
    size: tuple[int, int] | None = (224, 224)
    normalisation: Normalisation = "dtype"
    percentiles: tuple[float, float] = (0.5, 99.5)
    mask_threshold: float = 0.5  # masks are binarised as value > threshold after scaling to [0, 1]
    extra: dict[str, Any] = field(default_factory=dict)


def to_channel_first(array: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, C) -> (C, H, W); a 3D volume (D, H, W) -> (1, D, H, W)."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3 and array.shape[-1] <= 4 and array.shape[0] > 4:
        return np.moveaxis(array, -1, 0)
    return array[None]


def dtype_scale(array: np.ndarray) -> float:
    """Divisor that maps an integer image to [0, 1] by its storage type (uint8 -> 255)."""
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        if info.max <= 255:
            return 255.0
        return float(max(int(array.max()), 1)) if info.max > 65535 else 65535.0
    return 1.0


class NormaliseIntensityd(mt.MapTransform):
    """Per-key intensity normalisation to a common scale, chosen by ``mode``."""

    def __init__(self, keys: Sequence[str], mode: Normalisation, percentiles: tuple[float, float]) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.mode = mode
        self.percentiles = percentiles

    def __call__(self, data: Sample) -> Sample:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = normalise(out[key], self.mode, self.percentiles)
        return out


def normalise(
    array: np.ndarray, mode: Normalisation, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    x = np.asarray(array)
    if mode == "dtype":
        return (x.astype(np.float32) / dtype_scale(x)).astype(np.float32)
    x = x.astype(np.float32)
    if mode == "none":
        return x
    if mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif mode == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, percentiles))
    elif mode == "zscore":
        return ((x - x.mean()) / max(float(x.std()), 1e-6)).astype(np.float32)
    else:
        raise ValueError(f"unknown normalisation {mode!r}")
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


class BinariseMaskd(mt.MapTransform):
    """Mask -> {0, 1} float32; integer masks are first scaled by their storage type (255 -> 1)."""

    def __init__(self, keys: Sequence[str], threshold: float) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.threshold = threshold

    def __call__(self, data: Sample) -> Sample:
        out = dict(data)
        for key in self.key_iterator(out):
            x = np.asarray(out[key])
            scale = (
                255.0 if x.dtype == np.uint8 or (x.max() > 1 and x.max() <= 255) else max(float(x.max()), 1.0)
            )
            out[key] = (x.astype(np.float32) / scale > self.threshold).astype(np.float32)
        return out


def build_preprocess(
    image_keys: Sequence[str], mask_keys: Sequence[str], config: PreprocessConfig = PreprocessConfig()
) -> Callable[[Sample], Sample]:
    """Deterministic part: channel-first arrays in, normalised and resized float arrays out."""
    steps: list[Callable] = [BinariseMaskd(mask_keys, config.mask_threshold)] if mask_keys else []
    steps.append(NormaliseIntensityd(image_keys, config.normalisation, config.percentiles))
    keys = [*image_keys, *mask_keys]
    if config.size is not None:
        modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(mask_keys)
        steps.append(
            mt.Resized(
                keys, spatial_size=config.size, mode=modes, anti_aliasing=False, allow_missing_keys=True
            )
        )
    steps.append(
        mt.EnsureTyped(keys, data_type="numpy", dtype=np.float32, track_meta=False, allow_missing_keys=True)
    )
    return mt.Compose(steps)


def build_augment(
    image_keys: Sequence[str],
    mask_keys: Sequence[str],
    config: AugmentConfig = AugmentConfig(),
    image_size: tuple[int, int] | None = None,
) -> mt.Compose:
    """Random part, applied identically in space to every key of a sample.

    ``image_size`` turns the translation fraction into pixels; without it there is no translation.
    """
    keys = [*image_keys, *mask_keys]
    modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(mask_keys)
    steps: list[Callable] = [
        mt.RandFlipd(keys, prob=config.flip_prob, spatial_axis=axis, allow_missing_keys=True)
        for axis in config.flip_axes
    ]
    if config.affine_prob > 0 and (config.rotate_degrees or config.scale or config.translate):
        steps.append(
            mt.RandAffined(
                keys,
                prob=config.affine_prob,
                rotate_range=(np.deg2rad(config.rotate_degrees),),
                scale_range=(config.scale, config.scale),
                translate_range=[config.translate * s for s in image_size] if image_size else None,
                spatial_size=image_size,
                cache_grid=image_size is not None,
                mode=modes,
                padding_mode="zeros",
                allow_missing_keys=True,
            )
        )
    for key in image_keys:  # independent intensity jitter per modality
        if config.intensity_shift and config.intensity_prob:
            steps.append(
                mt.RandShiftIntensityd(
                    [key], offsets=config.intensity_shift, prob=config.intensity_prob, allow_missing_keys=True
                )
            )
        if config.noise_std:
            steps.append(
                mt.RandGaussianNoised([key], prob=0.5, std=config.noise_std, allow_missing_keys=True)
            )
    steps.append(
        mt.EnsureTyped(
            keys, data_type="tensor", dtype=torch.float32, track_meta=False, allow_missing_keys=True
        )
    )
    return mt.Compose(steps)


def eval_augment(image_keys: Sequence[str], mask_keys: Sequence[str]) -> mt.Compose:
    """No randomness: only conversion to tensors (used for val/test)."""
    keys = [*image_keys, *mask_keys]
    return mt.Compose(
        [
            mt.EnsureTyped(
                keys, data_type="tensor", dtype=torch.float32, track_meta=False, allow_missing_keys=True
            )
        ]
    )
