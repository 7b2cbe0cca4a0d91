"""Paired, geometry-consistent preprocessing and augmentation.

Every modality and every mask of a case pass through the same spatial transform (one set of
random parameters per call, applied to all keys with one shared sampling grid), so
image:wli, image:nbi and mask stay co-registered. Intensity normalisation is per modality
because modalities have unrelated intensity scales (CT in HU, MR arbitrary, RGB 0-255).

The pipeline is split in two: ``preprocess`` (deterministic: binarise masks, normalise,
resize) can be cached; ``augment`` (random) runs every epoch.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

Normalisation = Literal["dtype", "minmax", "zscore", "percentile", "none"]
Sample = dict[str, Any]


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation. Flips default off; when on, a flipped sample's text and attribute
    values name the mirrored sides (:func:`mirror_words`), so a prompt stays true."""

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


def binarise_mask(array: np.ndarray, threshold: float) -> np.ndarray:
    """Mask -> {0, 1} float32; integer masks are first scaled by their storage type (255 -> 1)."""
    x = np.asarray(array)
    scale = 255.0 if x.dtype == np.uint8 or (x.max() > 1 and x.max() <= 255) else max(float(x.max()), 1.0)
    return (x.astype(np.float32) / scale > threshold).astype(np.float32)


def resize(array: np.ndarray, size: Sequence[int], mode: Literal["bilinear", "nearest"]) -> np.ndarray:
    """(C, H, W) -> (C, *size) by ``torch.nn.functional.interpolate`` (no anti-aliasing, as MONAI's Resize).

    uint8 stays uint8 (torch's 8-bit kernel, several times faster than float32 on the CPU).
    """
    x = np.asarray(array)
    if tuple(x.shape[1:]) == tuple(size):
        return x
    if x.ndim != 3 or len(size) != 2:
        raise ValueError(f"resize to {tuple(size)} takes a 2D image (C, H, W); got shape {x.shape}")
    with warnings.catch_warnings():  # a decoded PIL image is read-only; interpolate only reads it
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(x)
    return F.interpolate(tensor[None], size=tuple(size), mode=mode)[0].contiguous().numpy()


class Preprocess:
    """Deterministic part: channel-first arrays in, binarised/normalised and resized float32 arrays out.

    8-bit data is resized before conversion to float, where that changes nothing or little:
    a uint8 mask is resized (nearest) and then binarised, which is exactly the same as the
    other order; a uint8 image under ``dtype`` normalisation is resized in 8 bits and then
    divided by 255, within 1/255 of resizing in float (torch's uint8 kernel rounds to integer
    levels) and ~3x faster. Everything else is normalised in float32 and then resized.
    """

    def __init__(self, image_keys: Sequence[str], mask_keys: Sequence[str], config: PreprocessConfig) -> None:
        self.image_keys, self.mask_keys, self.config = list(image_keys), list(mask_keys), config

    def __call__(self, data: Sample) -> Sample:
        out = dict(data)
        for key in self.mask_keys:
            if key in out:
                out[key] = self._mask(np.asarray(out[key]))
        for key in self.image_keys:
            if key in out:
                out[key] = self._image(np.asarray(out[key]))
        return out

    def _mask(self, x: np.ndarray) -> np.ndarray:
        size = self.config.size
        if size is not None and x.dtype == np.uint8:  # binarising a uint8 mask is pointwise: order-free
            x = resize(x, size, "nearest")
        x = binarise_mask(x, self.config.mask_threshold)
        return x if size is None else resize(x, size, "nearest")

    def _image(self, x: np.ndarray) -> np.ndarray:
        size, mode = self.config.size, self.config.normalisation
        if size is not None and mode == "dtype" and x.dtype == np.uint8:
            return resize(x, size, "bilinear").astype(np.float32) / np.float32(255.0)
        x = normalise(x, mode, self.config.percentiles)
        return x if size is None else resize(x, size, "bilinear")


def build_preprocess(
    image_keys: Sequence[str], mask_keys: Sequence[str], config: PreprocessConfig = PreprocessConfig()
) -> Preprocess:
    """The deterministic part for these keys (see :class:`Preprocess`)."""
    return Preprocess(image_keys, mask_keys, config)


@dataclass(frozen=True)
class _Draw:
    """One sample's random parameters: shared geometry, per-modality intensity."""

    flips: tuple[int, ...]  # spatial axes to flip
    affine: tuple[float, list[float], list[float]] | None  # angle (rad), shift (fraction of side), zoom
    shifts: dict[str, float]
    noise_std: dict[str, float]


class PairedAugment:
    """Random part: one flip + affine draw per sample, applied to every image and mask key.

    Flips, rotation, zoom and translation are composed into one matrix and applied with one
    ``grid_sample`` per key on one shared sampling grid (bilinear for images, nearest for masks,
    zeros outside), instead of a resampling per transform. The parameters follow MONAI's
    ``RandFlipd`` + ``RandAffined`` (each flip with ``flip_prob``; with ``affine_prob`` a rotation
    in the (H, W) plane, a zoom per axis in [1-scale, 1+scale], a shift per axis of up to
    ``translate`` x the side, composed as rotate @ translate @ scale, the map from output to input
    pixels), so the result equals theirs to float rounding for the same draw. The draws come from
    one ``numpy.random.RandomState``: an augmentation is a function of the seed given to
    :meth:`set_random_state`. ``config=None`` only converts to tensors (validation/test).
    """

    def __init__(
        self, image_keys: Sequence[str], mask_keys: Sequence[str], config: AugmentConfig | None = None
    ) -> None:
        self.image_keys, self.mask_keys, self.config = list(image_keys), list(mask_keys), config
        self.R = np.random.RandomState()

    def set_random_state(self, seed: int) -> None:
        self.R = np.random.RandomState(seed)

    def __call__(self, data: Sample) -> Sample:
        return self.apply(data)[0]

    def apply(self, data: Sample) -> tuple[Sample, tuple[int, ...], int]:
        """The augmented sample, the spatial axes it was flipped along and its number of spatial
        dims (what :func:`mirror_words` needs to keep the sample's text true)."""
        out = dict(data)
        keys = [k for k in [*self.image_keys, *self.mask_keys] if k in out]
        tensors = {k: torch.as_tensor(np.asarray(out[k], dtype=np.float32)) for k in keys}
        if self.config is None or not keys:
            out.update({k: t.clone() for k, t in tensors.items()})  # never hand out the cache's memory
            return out, (), 0
        dims = tensors[keys[0]].ndim - 1
        draw = self.randomize(dims)
        grids: dict[tuple[int, ...], torch.Tensor] = {}
        for key, tensor in tensors.items():
            shape = tuple(tensor.shape[1:])
            if draw.affine is not None:
                if shape not in grids:
                    grids[shape] = sampling_grid(pixel_affine(*draw.affine, draw.flips, shape), shape)
                mode = "nearest" if key in self.mask_keys else "bilinear"
                tensor = F.grid_sample(
                    tensor[None], grids[shape], mode=mode, padding_mode="zeros", align_corners=False
                )[0]
            else:
                tensor = torch.flip(tensor, [a + 1 for a in draw.flips]) if draw.flips else tensor.clone()
            if key in draw.shifts:
                tensor += draw.shifts[key]
            if key in draw.noise_std:
                noise = self.R.normal(0.0, draw.noise_std[key], tuple(tensor.shape))
                tensor += torch.from_numpy(noise.astype(np.float32))
            out[key] = tensor
        return out, draw.flips, dims

    def randomize(self, dims: int) -> _Draw:
        """Draw in MONAI's order: flips, then the affine, then each modality's intensity."""
        config = self.config
        assert config is not None
        flips = tuple(a for a in config.flip_axes if self.R.rand() < config.flip_prob)
        affine = None
        geometric = config.affine_prob > 0 and (config.rotate_degrees or config.scale or config.translate)
        if geometric and self.R.rand() < config.affine_prob:
            radians = float(np.deg2rad(config.rotate_degrees))
            angle = float(self.R.uniform(-radians, radians))
            shift = [float(self.R.uniform(-config.translate, config.translate)) for _ in range(dims)]
            zoom = [float(self.R.uniform(-config.scale, config.scale)) + 1.0 for _ in range(dims)]
            affine = (angle, shift, zoom)
        shifts, noise = {}, {}
        for key in self.image_keys:
            if config.intensity_shift and config.intensity_prob and self.R.rand() < config.intensity_prob:
                shifts[key] = float(self.R.uniform(-config.intensity_shift, config.intensity_shift))
            if config.noise_std and self.R.rand() < 0.5:
                noise[key] = float(self.R.uniform(0.0, config.noise_std))
        return _Draw(flips, affine, shifts, noise)


def pixel_affine(
    angle: float, shift: Sequence[float], zoom: Sequence[float], flips: Sequence[int], shape: Sequence[int]
) -> np.ndarray:
    """flip @ rotate @ translate @ scale: output -> input pixel coordinates, measured from the centre.

    The rotation is in the plane of the last two spatial axes (MONAI's ``create_rotate`` in 2D);
    ``shift`` is in fractions of each side. Flipping first and then warping samples the image at
    flip(A p), hence the flip on the left.
    """
    dims = len(shape)
    rotate, translate = np.eye(dims + 1), np.eye(dims + 1)
    cos, sin = np.cos(angle), np.sin(angle)
    rotate[dims - 2 : dims, dims - 2 : dims] = [[cos, -sin], [sin, cos]]
    translate[:-1, -1] = np.asarray(shift) * np.asarray(shape)
    flip = np.diag([-1.0 if a in flips else 1.0 for a in range(dims)] + [1.0])
    return flip @ rotate @ translate @ np.diag([*zoom, 1.0])


def sampling_grid(affine: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """``grid_sample``'s (1, *shape, d) grid for a pixel map from the centre (see :func:`pixel_affine`).

    With align_corners=False pixel i of n sits at (2i + 1)/n - 1, i.e. D (i - (n-1)/2) with
    D = diag(2/n); the pixel map A becomes D A D^-1. Each grid coordinate is a sum of 1-D ramps
    broadcast against each other, written straight into the grid: one full-size add per
    coordinate instead of a matrix product per pixel (3-5x faster than ``affine_grid`` here).
    """
    dims = len(shape)
    sides = np.asarray(shape, dtype=np.float64)
    linear = affine[:-1, :-1] * sides[None, :] / sides[:, None]
    offset = 2.0 * affine[:-1, -1] / sides
    ramps = [_ramp(n, j, dims) for j, n in enumerate(shape)]
    grid = torch.empty(1, *shape, dims)
    for i in range(dims):
        terms = [ramps[j] * float(linear[i, j]) for j in range(dims)]
        terms[0] = terms[0] + float(offset[i])
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        grid[0, ..., dims - 1 - i] = total  # grid_sample takes (x, y[, z]): the axes reversed
    return grid


@functools.lru_cache(maxsize=16)
def _ramp(n: int, axis: int, dims: int) -> torch.Tensor:
    """Normalised pixel centres (2i + 1)/n - 1 along ``axis``, shaped to broadcast over ``dims`` axes."""
    view = [1] * dims
    view[axis] = n
    return ((torch.arange(n, dtype=torch.float32) * 2 + 1) / n - 1).view(view)


# Words a flip along a spatial axis turns into each other: the last axis (image columns) swaps
# left and right, the one before it (rows) swaps upper and lower.
_MIRRORED_WORDS: dict[int, dict[str, str]] = {
    -1: {"left": "right", "right": "left"},
    -2: {"upper": "lower", "lower": "upper", "top": "bottom", "bottom": "top"},
}


def mirror_words(text: str, flips: Sequence[int], dims: int = 2) -> str:
    """``text`` as it reads on the flipped image: "left" <-> "right" for a flip of the last
    spatial axis, "upper" <-> "lower" and "top" <-> "bottom" for the axis before it.

    Whole words only, in any case ("Left" -> "Right", "left-sided" -> "right-sided"); other
    axes (the depth of a volume) name no side and change nothing.
    """
    import re

    swaps: dict[str, str] = {}
    for axis in flips:
        swaps |= _MIRRORED_WORDS.get(axis - dims, {})
    if not swaps or not text:
        return text

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        new = swaps[word.lower()]
        if word.isupper():
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return re.sub(r"\b(" + "|".join(swaps) + r")\b", swap, text, flags=re.IGNORECASE)


def build_augment(
    image_keys: Sequence[str], mask_keys: Sequence[str], config: AugmentConfig = AugmentConfig()
) -> PairedAugment:
    """Random part, applied identically in space to every key of a sample (see :class:`PairedAugment`)."""
    return PairedAugment(image_keys, mask_keys, config)


def eval_augment(image_keys: Sequence[str], mask_keys: Sequence[str]) -> PairedAugment:
    """No randomness: only conversion to tensors (used for val/test)."""
    return PairedAugment(image_keys, mask_keys, None)
