"""Segmentation metrics: per-image and pooled Dice/IoU, HD95, NSD, and their aggregator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medalign.evaluation.metrics.arrays import ArrayLike, to_numpy

# ----------------------------------------------------------------------------- segmentation
# Dice, IoU, HD95, NSD per DESIGN.md "Metric semantics"; tested in tests/evaluation/metrics/test_segmentation.py.
#
# Binary masks only: ``pred`` holds probabilities or a binary mask, ``target`` a binary mask, both
# [N, H, W] or [N, 1, H, W] (hd95/nsd take one image of any dimensionality). The prediction is
# ``pred > threshold`` (strictly greater, so it agrees with ``logit > 0`` at the default 0.5;
# boolean inputs are used as they are). Probabilities outside [0, 1] raise: logits thresholded at
# 0.5 would silently mean "logit > 0.5", not "p > 0.5".
#
# Dice = 2|P∩G| / (|P| + |G|) and IoU = |P∩G| / |P∪G| per image, exact (no smoothing term, which
# would shift small lesions); both are 1 when P and G are empty, 0 when only one of them is. The
# headline Dice/IoU is the mean over images (LViT/C2FVL); ``pooled_dice`` sums the counts over all
# images first, so it weighs large lesions more and is unaffected by the empty-image convention.
#
# Surface metrics use the inner boundary (mask pixels with a 4-connected background neighbour;
# outside the image counts as background) and Euclidean distance transforms from scipy with the
# pixel ``spacing``. HD95 is MONAI's and the DeepMind surface-distance definition: the larger of
# the two directed 95th percentiles (linear interpolation) of boundary-to-boundary distances,
# max(P95 d(∂P→∂G), P95 d(∂G→∂P)), not the percentile of the pooled distances (medpy), which is
# smaller when one boundary is much longer. Every image gets a value, so the mean over images
# covers every image: both masks empty -> 0 (nothing to miss); exactly one empty (a missed lesion,
# or a prediction on an image without one) -> the documented worst value, the diagonal of the
# image's extent in spacing units (sqrt(sum((n_i * s_i)^2)): pixels by default, millimetres when
# the caller passes the pixel spacing), which exceeds any distance between two pixels of the image,
# so no defined HD95 can be worse. Averaging only the defined images would reward a model for
# predicting nothing on its hard cases; the accumulator counts the worst-value images in their own
# column (``hd95_worst``) so the mean can be read with them in view. NSD is the fraction of both
# boundaries' points lying within ``tolerance_px`` (inclusive, in spacing units) of the other
# boundary, the pixel-count form of MONAI's ``compute_surface_dice``; both empty -> 1, exactly one
# empty -> 0 (its worst value, on the same images), the same convention as Dice.


def _as_binary(x: ArrayLike, threshold: float, name: str) -> np.ndarray:
    arr = to_numpy(x)
    if arr.dtype == np.bool_:
        return arr
    arr = arr.astype(np.float64, copy=False)
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(
            f"{name} must hold probabilities or a binary mask in [0, 1], got range "
            f"[{arr.min():.3g}, {arr.max():.3g}]; apply sigmoid to logits first"
        )
    return arr > threshold


def _as_batch(x: ArrayLike, threshold: float, name: str) -> np.ndarray:
    """[N, H, W] boolean; a singleton channel axis is dropped, more channels are refused."""
    arr = _as_binary(x, threshold, name)
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            raise ValueError(f"{name} must be binary [N, 1, H, W], got {arr.shape[1]} channels")
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [N, H, W] or [N, 1, H, W], got shape {arr.shape}")
    return arr


def _paired_batches(pred: ArrayLike, target: ArrayLike, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    p = _as_batch(pred, threshold, "pred")
    # The target is a mask; a soft target (resized label) is binarised at the same threshold.
    g = _as_batch(target, threshold, "target")
    if p.shape != g.shape:
        raise ValueError(f"pred has shape {p.shape} but target has {g.shape}")
    return p, g


def _overlap_counts(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image |P∩G|, |P|, |G| as int64 (so pooling over many large images cannot overflow)."""
    axes = tuple(range(1, p.ndim))
    inter = np.logical_and(p, g).sum(axis=axes, dtype=np.int64)
    return inter, p.sum(axis=axes, dtype=np.int64), g.sum(axis=axes, dtype=np.int64)


def _dice_iou_from_counts(
    inter: np.ndarray, psum: np.ndarray, gsum: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    denom = psum + gsum
    union = denom - inter
    both_empty = denom == 0
    dice = np.where(both_empty, 1.0, 2.0 * inter / np.maximum(denom, 1))
    iou = np.where(both_empty, 1.0, inter / np.maximum(union, 1))
    return dice.astype(np.float64), iou.astype(np.float64)


def dice_iou_per_image(
    pred: ArrayLike, target: ArrayLike, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU, float64 [N] each; average them for the LViT/C2FVL numbers.

    Kept per image (not pre-averaged) so callers can report spread, best/worst cases, or
    subgroup means without recomputing the overlaps.
    """
    p, g = _paired_batches(pred, target, threshold)
    return _dice_iou_from_counts(*_overlap_counts(p, g))


def pooled_dice(pred: ArrayLike, target: ArrayLike, threshold: float = 0.5) -> float:
    """Global Dice over every pixel of every image; 1.0 when all predictions and targets are empty."""
    p, g = _paired_batches(pred, target, threshold)
    inter, psum, gsum = _overlap_counts(p, g)
    denom = int(psum.sum() + gsum.sum())
    return 1.0 if denom == 0 else float(2.0 * inter.sum() / denom)


def _single_mask(x: ArrayLike, name: str) -> np.ndarray:
    arr = _as_binary(x, 0.5, name)
    while arr.ndim > 2 and arr.shape[0] == 1:  # [1, H, W] / [1, 1, H, W] from a batch slice
        arr = arr[0]
    return arr


def _boundary(mask: np.ndarray) -> np.ndarray:
    # border_value=0: a lesion cut by the image edge has a boundary there, as in MONAI.
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _boundary_distances(
    pred_mask: ArrayLike, gt_mask: ArrayLike, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Distances ∂P→∂G and ∂G→∂P, or None when either mask is empty."""
    p = _single_mask(pred_mask, "pred_mask")
    g = _single_mask(gt_mask, "gt_mask")
    if p.shape != g.shape:
        raise ValueError(f"pred_mask has shape {p.shape} but gt_mask has {g.shape}")
    sampling = tuple(float(s) for s in spacing)
    if len(sampling) != p.ndim:
        raise ValueError(f"spacing has {len(sampling)} entries for a {p.ndim}-D mask")
    if not p.any() or not g.any():
        return None
    bp, bg = _boundary(p), _boundary(g)
    to_g = ndimage.distance_transform_edt(~bg, sampling=sampling)
    to_p = ndimage.distance_transform_edt(~bp, sampling=sampling)
    return to_g[bp], to_p[bg]


def worst_surface_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The HD95 an image gets when exactly one of its masks is empty: the diagonal of its extent.

    ``sqrt(sum((n_i * s_i)^2))`` in ``spacing`` units; larger than the distance between any two
    pixel centres of the image, so it is worse than every HD95 a prediction can actually reach.
    """
    if len(shape) != len(spacing):
        raise ValueError(f"spacing has {len(spacing)} entries for a {len(shape)}-D mask")
    return float(np.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True))))


def hd95(pred_mask: ArrayLike, gt_mask: ArrayLike, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the boundaries of one image.

    In ``spacing`` units (pixels by default). Both masks empty -> 0; exactly one empty -> the
    worst value :func:`worst_surface_distance` (the image diagonal), so every image has a score
    (see the section notes). Probability maps are thresholded at 0.5.
    """
    dists = _boundary_distances(pred_mask, gt_mask, spacing)
    if dists is None:
        p = _single_mask(pred_mask, "pred_mask")
        if not p.any() and not _single_mask(gt_mask, "gt_mask").any():
            return 0.0
        return worst_surface_distance(p.shape, spacing)
    d_pg, d_gp = dists
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def nsd(
    pred_mask: ArrayLike,
    gt_mask: ArrayLike,
    tolerance_px: float = 2.0,
    spacing: Sequence[float] = (1.0, 1.0),
) -> float:
    """Normalised surface Dice: boundary points of both masks within ``tolerance_px`` of the other.

    Rewards boundaries that are "close enough" for clinical use, which Dice (area) and HD95
    (worst-ish case) both miss. Both masks empty -> 1.0, exactly one empty -> 0.0 (its worst
    value), mirroring Dice. ``tolerance_px`` is in ``spacing`` units.
    """
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    dists = _boundary_distances(pred_mask, gt_mask, spacing)
    if dists is None:
        p_any = bool(_single_mask(pred_mask, "pred_mask").any())
        g_any = bool(_single_mask(gt_mask, "gt_mask").any())
        return 1.0 if not p_any and not g_any else 0.0
    d_pg, d_gp = dists
    close = int((d_pg <= tolerance_px).sum() + (d_gp <= tolerance_px).sum())
    return close / (d_pg.size + d_gp.size)


class SegmentationMetrics:
    """Accumulates per-image binary segmentation results over batches, MONAI style.

    ``update`` may be called with batches of any size; ``aggregate`` summarises everything seen
    since construction or the last ``reset``. Per-image values are kept (not running sums) so the
    report can list the best and worst cases and every image scored with a worst value.

    ``aggregate()`` returns ``{"dice", "iou", "dice_std", "pooled_dice", "hd95", "hd95_worst",
    "hd95_worst_case_ids", "nsd", "n_images", "n_empty_gt", "per_case"}``: ``dice``/``iou``/
    ``hd95``/``nsd`` are means over all images, ``dice_std`` the population std (ddof 0) of
    per-image Dice, ``hd95_worst`` the number of images where exactly one of prediction and
    target is empty (HD95 there is the image diagonal in ``spacing`` units and NSD 0, see the
    section notes) and ``hd95_worst_case_ids`` their ids, and ``per_case`` one dict
    ``{"case_id", "dice", "iou", "hd95", "nsd", "empty_gt", "empty_pred"}`` per image in update
    order.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        spacing: Sequence[float] = (1.0, 1.0),
        nsd_tolerance_px: float = 2.0,
    ) -> None:
        if nsd_tolerance_px < 0:
            raise ValueError(f"nsd_tolerance_px must be >= 0, got {nsd_tolerance_px}")
        self.threshold = float(threshold)
        self.spacing = tuple(float(s) for s in spacing)
        self.nsd_tolerance_px = float(nsd_tolerance_px)
        self.reset()

    def reset(self) -> None:
        self._cases: list[dict[str, Any]] = []
        self._inter = 0
        self._denom = 0

    def __len__(self) -> int:
        return len(self._cases)

    def update(
        self, pred_batch: ArrayLike, target_batch: ArrayLike, case_ids: Sequence[Any] | None = None
    ) -> None:
        """Add a batch; without ``case_ids`` images are named by their running index ("0", "1", ...)."""
        p, g = _paired_batches(pred_batch, target_batch, self.threshold)
        n = p.shape[0]
        if case_ids is None:
            ids = [str(len(self._cases) + i) for i in range(n)]
        else:
            ids = [str(c) for c in case_ids]
            if len(ids) != n:
                raise ValueError(f"{len(ids)} case_ids for a batch of {n} images")
        inter, psum, gsum = _overlap_counts(p, g)
        dice, iou = _dice_iou_from_counts(inter, psum, gsum)
        self._inter += int(inter.sum())
        self._denom += int(psum.sum() + gsum.sum())
        for i in range(n):
            self._cases.append(
                {
                    "case_id": ids[i],
                    "dice": float(dice[i]),
                    "iou": float(iou[i]),
                    "hd95": hd95(p[i], g[i], self.spacing),
                    "nsd": nsd(p[i], g[i], self.nsd_tolerance_px, self.spacing),
                    "empty_gt": bool(gsum[i] == 0),
                    "empty_pred": bool(psum[i] == 0),
                }
            )

    def aggregate(self) -> dict[str, Any]:
        if not self._cases:
            raise ValueError("no images to aggregate; call update() first")
        dice = np.array([c["dice"] for c in self._cases])
        worst = [c["case_id"] for c in self._cases if c["empty_gt"] != c["empty_pred"]]
        return {
            "dice": float(dice.mean()),
            "iou": float(np.mean([c["iou"] for c in self._cases])),
            "dice_std": float(dice.std()),
            "pooled_dice": 1.0 if self._denom == 0 else 2.0 * self._inter / self._denom,
            "hd95": float(np.mean([c["hd95"] for c in self._cases])),
            "hd95_worst": len(worst),
            "hd95_worst_case_ids": worst,
            "nsd": float(np.mean([c["nsd"] for c in self._cases])),
            "n_images": len(self._cases),
            "n_empty_gt": sum(c["empty_gt"] for c in self._cases),
            "per_case": [dict(c) for c in self._cases],
        }
