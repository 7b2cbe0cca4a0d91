"""Segmentation metrics on hand-made masks whose values are worked out by hand in the comments."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from medalign.metrics import (
    SegmentationMetrics,
    dice_iou_per_image,
    hd95,
    nsd,
    pooled_dice,
    worst_surface_distance,
)


def square(top: int, left: int, size: int = 10, shape: tuple[int, int] = (20, 20)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top : top + size, left : left + size] = True
    return m


# ----------------------------------------------------------------------------- Dice / IoU


def test_full_overlap() -> None:
    m = square(2, 2)[None]
    dice, iou = dice_iou_per_image(m, m)
    assert dice.tolist() == [1.0]
    assert iou.tolist() == [1.0]


def test_half_overlap_by_hand() -> None:
    # GT: rows 0-1, cols 0-3 (8 px); prediction: rows 0-1, cols 2-5 (8 px); overlap cols 2-3 (4 px).
    # Dice = 2*4 / (8 + 8) = 0.5; IoU = 4 / (8 + 8 - 4) = 1/3.
    gt = np.zeros((1, 4, 8))
    gt[0, :2, 0:4] = 1
    pred = np.zeros((1, 4, 8))
    pred[0, :2, 2:6] = 1
    dice, iou = dice_iou_per_image(pred, gt)
    assert dice[0] == pytest.approx(0.5)
    assert iou[0] == pytest.approx(1 / 3)


def test_empty_conventions() -> None:
    empty = np.zeros((8, 8))
    lesion = np.zeros((8, 8))
    lesion[2:4, 2:4] = 1
    pred = np.stack([empty, lesion, empty])  # empty/empty, prediction on empty GT, missed lesion
    gt = np.stack([empty, empty, lesion])
    dice, iou = dice_iou_per_image(pred, gt)
    assert dice.tolist() == [1.0, 0.0, 0.0]
    assert iou.tolist() == [1.0, 0.0, 0.0]


def test_threshold_is_strict_and_configurable() -> None:
    gt = np.array([[[1.0, 1.0, 0.0, 0.0]]])
    probs = np.array([[[0.9, 0.5, 0.3, 0.1]]])
    # > 0.5: only pixel 0 predicted -> Dice 2*1/(1+2) = 2/3 (0.5 itself is not foreground, like logit 0).
    assert dice_iou_per_image(probs, gt)[0][0] == pytest.approx(2 / 3)
    # > 0.25: pixels 0, 1, 2 -> Dice 2*2/(3+2) = 0.8.
    assert dice_iou_per_image(probs, gt, threshold=0.25)[0][0] == pytest.approx(0.8)
    # > 0.95: nothing predicted on a non-empty GT -> 0.
    assert dice_iou_per_image(probs, gt, threshold=0.95)[0][0] == 0.0


def test_rejects_logits_and_bad_shapes() -> None:
    gt = np.zeros((1, 4, 4))
    with pytest.raises(ValueError, match="sigmoid"):
        dice_iou_per_image(np.full((1, 4, 4), 2.0), gt)
    with pytest.raises(ValueError, match="channels"):
        dice_iou_per_image(np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        dice_iou_per_image(np.zeros((2, 4, 4)), gt)


def test_channel_axis_and_tensors_accepted() -> None:
    pred = torch.zeros(2, 1, 6, 6, dtype=torch.bfloat16)
    pred[0, 0, :3] = 0.8
    gt = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    gt[0, 0, :3] = True
    dice, iou = dice_iou_per_image(pred, gt)
    assert dice.tolist() == [1.0, 1.0]
    assert iou.tolist() == [1.0, 1.0]


def test_per_image_mean_differs_from_pooled() -> None:
    # Image 1: GT 4 px, predicted exactly -> Dice 1. Image 2: GT 12 px, nothing predicted -> Dice 0.
    # Per-image mean = (1 + 0) / 2 = 0.5. Pooled = 2*4 / ((4 + 0) + (4 + 12)) = 8/20 = 0.4.
    pred = np.zeros((2, 4, 4))
    gt = np.zeros((2, 4, 4))
    pred[0, 0, :] = 1
    gt[0, 0, :] = 1
    gt[1, 1:, :] = 1
    dice, _ = dice_iou_per_image(pred, gt)
    assert dice.mean() == pytest.approx(0.5)
    assert pooled_dice(pred, gt) == pytest.approx(0.4)


def test_pooled_dice_all_empty_is_one() -> None:
    z = np.zeros((3, 4, 4))
    assert pooled_dice(z, z) == 1.0


# ----------------------------------------------------------------------------- HD95


def test_hd95_offset_squares_by_hand() -> None:
    # 10x10 squares, B shifted 3 px right. Of A's 36 boundary pixels, 14 lie 3 px from B's boundary
    # (left column rows 1-8, the two left corners, rows 3-6 of the right column), the rest closer;
    # the 95th percentile (index 0.95*35 = 33.25 of the sorted 36) falls among the 3s. Symmetric -> 3.
    a, b = square(2, 2), square(2, 5)
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(b, a) == pytest.approx(3.0)
    assert hd95(a, a) == 0.0


def test_hd95_uses_spacing() -> None:
    # Column spacing 2: the 3-px shift is 6 units; the left column (8 px) and two left corners are
    # 6 away, everything else nearer -> the top 10 of 36 sorted distances are 6, P95 = 6.
    a, b = square(2, 2), square(2, 5)
    assert hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, b, spacing=(1.0, 1.0, 1.0))


def test_hd95_ignores_a_single_outlier_pixel() -> None:
    # Prediction = GT square + one stray pixel 8 px away: 36 boundary distances 0, one 8; P95 of
    # 37 values (index 34.2) is 0, while the plain Hausdorff distance would be 8.
    gt = square(2, 2, size=10, shape=(20, 30))
    pred = gt.copy()
    pred[6, 19] = True  # nearest GT boundary pixel: (6, 11) -> distance 8
    assert hd95(pred, gt) == 0.0


def test_hd95_scores_empty_masks_with_the_worst_value() -> None:
    # 20 x 20 image: the diagonal of its extent is sqrt(20^2 + 20^2); with spacing (0.5, 2) mm
    # the extent is 10 x 40 mm. Both empty: nothing to miss, 0.
    a, z = square(2, 2), np.zeros((20, 20), dtype=bool)
    assert hd95(a, z) == pytest.approx(np.hypot(20, 20))  # a prediction where there is no lesion
    assert hd95(z, a) == pytest.approx(np.hypot(20, 20))  # a missed lesion
    assert hd95(z, a, spacing=(0.5, 2.0)) == pytest.approx(np.hypot(10, 40))
    assert hd95(z, z) == 0.0
    assert worst_surface_distance((20, 30), (1.0, 1.0)) == pytest.approx(np.hypot(20, 30))
    # worse than any defined HD95: opposite corner pixels of the image are closer than the diagonal
    corner_a, corner_b = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    corner_a[0, 0], corner_b[19, 19] = True, True
    assert hd95(corner_a, corner_b) < hd95(z, a)
    with pytest.raises(ValueError, match="spacing"):
        worst_surface_distance((20, 20), (1.0,))


def test_hd95_and_nsd_match_monai() -> None:
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(0)
    spacing = (0.7, 1.3)
    for _ in range(4):
        a = ndimage.binary_opening(rng.random((32, 40)) > 0.5)
        b = ndimage.binary_opening(rng.random((32, 40)) > 0.6)
        ta, tb = (torch.from_numpy(m)[None, None].float() for m in (a, b))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ref_hd = monai_metrics.compute_hausdorff_distance(
                ta, tb, include_background=True, percentile=95, spacing=spacing
            )
            ref_nsd = monai_metrics.compute_surface_dice(
                ta, tb, [1.5], include_background=True, spacing=spacing
            )
        assert hd95(a, b, spacing) == pytest.approx(float(ref_hd), rel=1e-5)
        assert nsd(a, b, 1.5, spacing) == pytest.approx(float(ref_nsd), rel=1e-5)


# ----------------------------------------------------------------------------- NSD


def test_nsd_offset_squares_by_hand() -> None:
    # Distances of A's 36 boundary pixels to B's boundary (B = A shifted 3 right):
    # top and bottom rows 3,2,1,0,0,0,0,0,0,0; left column (rows 1-8) 3 x8; right column 1,2,3,3,3,3,2,1.
    # <= 2: 9 + 9 + 0 + 4 = 22 of 36; the geometry is symmetric, so NSD = 44/72 = 11/18.
    a, b = square(2, 2), square(2, 5)
    assert nsd(a, b, tolerance_px=2.0) == pytest.approx(11 / 18)
    assert nsd(a, b, tolerance_px=0.0) == pytest.approx(14 / 36)  # only the 7 + 7 shared row pixels
    assert nsd(a, b, tolerance_px=3.0) == 1.0
    assert nsd(a, a, tolerance_px=0.0) == 1.0


def test_nsd_empty_conventions() -> None:
    a, z = square(2, 2), np.zeros((20, 20), dtype=bool)
    assert nsd(z, z) == 1.0
    assert nsd(a, z) == 0.0
    assert nsd(z, a) == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        nsd(a, a, tolerance_px=-1.0)


# ----------------------------------------------------------------------------- accumulator


def test_accumulator_averages_hd95_over_every_image_and_counts_the_worst() -> None:
    a, b = square(2, 2), square(2, 5)
    z = np.zeros((20, 20), dtype=bool)
    m = SegmentationMetrics(nsd_tolerance_px=2.0)
    # batch 1: exact match, offset squares
    m.update(np.stack([a, b]).astype(np.float32), np.stack([a, a]), case_ids=["p1", "p2"])
    # batch 2 (channel axis, tensors): empty/empty, false positive on empty GT, missed lesion
    pred2 = torch.from_numpy(np.stack([z, a, z]))[:, None].float()
    gt2 = torch.from_numpy(np.stack([z, z, a]))[:, None]
    m.update(pred2, gt2, case_ids=["e1", "fp", "fn"])
    out = m.aggregate()

    # offset squares: overlap 10x7 = 70 px, Dice 140/200 = 0.7, IoU 70/130 = 7/13.
    dices = [1.0, 0.7, 1.0, 0.0, 0.0]
    assert out["n_images"] == 5 == len(m)
    assert out["n_empty_gt"] == 2
    assert out["dice"] == pytest.approx(np.mean(dices))
    assert out["dice_std"] == pytest.approx(np.std(dices))
    assert out["iou"] == pytest.approx(np.mean([1.0, 7 / 13, 1.0, 0.0, 0.0]))
    # pooled: intersections 100 + 70; sizes (100+100) + (100+100) + 0 + 100 + 100
    assert out["pooled_dice"] == pytest.approx(2 * 170 / 600)
    # HD95 over all five: p1 0, p2 3, e1 (both empty) 0, fp and fn the 20 x 20 diagonal; those
    # two are counted and listed (e1 is not: an empty prediction on an empty image is right).
    diagonal = np.hypot(20, 20)
    assert out["hd95"] == pytest.approx((0 + 3 + 0 + 2 * diagonal) / 5)
    assert out["hd95_worst"] == 2
    assert out["hd95_worst_case_ids"] == ["fp", "fn"]
    assert out["nsd"] == pytest.approx(np.mean([1.0, 11 / 18, 1.0, 0.0, 0.0]))
    per_case = {c["case_id"]: c for c in out["per_case"]}
    assert list(per_case) == ["p1", "p2", "e1", "fp", "fn"]
    assert per_case["p2"]["dice"] == pytest.approx(0.7)
    assert per_case["p2"]["hd95"] == pytest.approx(3.0)
    assert per_case["fp"]["hd95"] == pytest.approx(diagonal)
    assert per_case["fp"]["empty_gt"] and not per_case["fp"]["empty_pred"]
    assert per_case["fn"]["empty_pred"] and not per_case["fn"]["empty_gt"]


def test_accumulator_default_ids_reset_and_errors() -> None:
    m = SegmentationMetrics()
    with pytest.raises(ValueError, match="no images"):
        m.aggregate()
    z = np.zeros((2, 4, 4))
    m.update(z, z)
    m.update(z[:1], z[:1])
    out = m.aggregate()
    assert [c["case_id"] for c in out["per_case"]] == ["0", "1", "2"]
    assert out["hd95"] == 0.0 and out["hd95_worst"] == 0 and out["hd95_worst_case_ids"] == []
    assert out["dice"] == 1.0 and out["pooled_dice"] == 1.0 and out["nsd"] == 1.0
    assert not any(math.isnan(v) for v in (out["dice"], out["iou"], out["dice_std"]))
    with pytest.raises(ValueError, match="case_ids"):
        m.update(z, z, case_ids=["only-one"])
    m.reset()
    assert len(m) == 0


def test_accumulator_worst_value_in_millimetres_when_the_spacing_is_known() -> None:
    a, z = square(2, 2), np.zeros((20, 20), dtype=bool)
    m = SegmentationMetrics(spacing=(0.5, 2.0))
    m.update(np.stack([z, a]), np.stack([a, a]), case_ids=["missed", "exact"])
    out = m.aggregate()
    assert out["hd95"] == pytest.approx(np.hypot(10, 40) / 2)  # 10 x 40 mm extent; exact match 0
    assert out["hd95_worst_case_ids"] == ["missed"] and out["nsd"] == pytest.approx(0.5)
