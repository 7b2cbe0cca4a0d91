"""Segmentation losses against hand-computed values and torch's reference losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medalign.losses import (
    SegmentationLoss,
    dice_bce_loss,
    dice_ce_loss,
    dice_loss,
    focal_loss,
    side_output_consistency_loss,
)

LN3 = math.log(3.0)


# ----------------------------------------------------------------------------- dice


def test_dice_loss_2x2_by_hand() -> None:
    # sigmoid(ln 3) = 0.75, sigmoid(0) = 0.5, sigmoid(-ln 3) = 0.25.
    logits = torch.tensor([[[[LN3, 0.0], [-LN3, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # sum p t = 0.75 + 0.5 = 1.25; sum p = 2; sum t = 2.
    # smooth 1: 1 - (2.5 + 1) / (4 + 1) = 0.3; smooth 0: 1 - 2.5 / 4 = 0.375.
    assert dice_loss(logits, target).item() == pytest.approx(0.3)
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.375)
    # target without the channel axis is accepted
    assert dice_loss(logits, target[:, 0]).item() == pytest.approx(0.3)


def test_dice_loss_per_image_vs_pooled() -> None:
    # Image 1: p = 0.5 everywhere (4 px), target 1 px -> per-image Dice (2*0.5) / (2 + 1) = 1/3.
    # Image 2: p = 0.5 everywhere, target 3 px -> Dice (2*1.5) / (2 + 3) = 0.6.
    # smooth 0: per image 1 - (1/3 + 0.6)/2; pooled 1 - 2*2 / (4 + 4) = 0.5.
    logits = torch.zeros(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    target[0, 0, 0, 0] = 1
    target[1, 0].view(-1)[:3] = 1
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1 - (1 / 3 + 0.6) / 2)
    assert dice_loss(logits, target, smooth=0.0, per_image=False).item() == pytest.approx(0.5)


def test_dice_loss_multiclass_index_map() -> None:
    index = torch.tensor([[[0, 1], [2, 2]]])  # [N, H, W]
    onehot = F.one_hot(index, 3).permute(0, 3, 1, 2).float()
    confident = onehot * 40.0 - 20.0  # softmax ~ one-hot
    assert dice_loss(confident, index).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(1, 3, 2, 2)
    # index map, index map with channel axis and one-hot target all mean the same thing
    ref = dice_loss(logits, onehot)
    assert dice_loss(logits, index).item() == pytest.approx(ref.item())
    assert dice_loss(logits, index[:, None]).item() == pytest.approx(ref.item())


# ----------------------------------------------------------------------------- dice + bce / ce


def test_dice_bce_parts() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 5, 5)
    target = (torch.rand(2, 1, 5, 5) > 0.6).float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert dice_bce_loss(logits, target, dice_weight=0.0).item() == pytest.approx(bce.item())
    assert dice_bce_loss(logits, target, bce_weight=0.0).item() == pytest.approx(
        dice_loss(logits, target).item()
    )
    weighted = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(3.0))
    got = dice_bce_loss(logits, target, dice_weight=0.5, bce_weight=2.0, pos_weight=3.0)
    assert got.item() == pytest.approx(0.5 * dice_loss(logits, target).item() + 2.0 * weighted.item())
    with pytest.raises(ValueError, match="binary"):
        dice_bce_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4))


def test_dice_ce_ce_part_equals_torch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    index = torch.randint(0, 3, (2, 4, 4))
    assert dice_ce_loss(logits, index, dice_weight=0.0).item() == pytest.approx(
        F.cross_entropy(logits, index).item()
    )


# ----------------------------------------------------------------------------- focal


def test_focal_by_hand() -> None:
    # logit 0 -> p = 0.5, p_t = 0.5, -log p_t = ln 2, (1 - p_t)^2 = 0.25.
    # positive: alpha 0.25 -> 0.0625 ln 2; negative: 0.75 -> 0.1875 ln 2; mean 0.125 ln 2.
    logits = torch.zeros(1, 1, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]]]])
    assert focal_loss(logits, target).item() == pytest.approx(0.125 * math.log(2))
    # confident and right -> almost nothing; gamma 0 without alpha is plain BCE
    assert focal_loss(torch.tensor([[[[8.0, -8.0]]]]), target).item() < 1e-6
    x = torch.randn(1, 1, 3, 3)
    t = (torch.rand(1, 1, 3, 3) > 0.5).float()
    assert focal_loss(x, t, gamma=0.0, alpha=None).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(x, t).item(), rel=1e-6
    )


# ----------------------------------------------------------------------------- side-output consistency


def test_consistency_zero_when_side_matches_final() -> None:
    torch.manual_seed(0)
    side = torch.randn(2, 1, 8, 8)
    final = F.interpolate(side, size=(16, 16), mode="bilinear", align_corners=False)
    assert side_output_consistency_loss([side], final).item() == pytest.approx(0.0, abs=1e-6)
    assert side_output_consistency_loss([side, final], final).item() == pytest.approx(0.0, abs=1e-6)
    multi = torch.randn(2, 3, 8, 8)
    final_multi = F.interpolate(multi, size=(16, 16), mode="bilinear", align_corners=False)
    assert side_output_consistency_loss([multi], final_multi).item() == pytest.approx(0.0, abs=1e-6)


def test_consistency_positive_and_only_side_gets_gradients() -> None:
    torch.manual_seed(0)
    side = torch.randn(2, 1, 8, 8, requires_grad=True)
    final = torch.randn(2, 1, 16, 16, requires_grad=True)
    loss = side_output_consistency_loss([side], final)
    assert loss.item() > 0
    loss.backward()
    assert side.grad is not None and side.grad.abs().sum() > 0
    assert final.grad is None  # the final map is the teacher: detached
    assert side_output_consistency_loss([], final).item() == 0.0


# ----------------------------------------------------------------------------- module


@pytest.mark.parametrize("kind", ["dice_bce", "dice_ce", "focal_dice"])
def test_segmentation_loss_components_sum_and_gradients(kind: str) -> None:
    torch.manual_seed(0)
    c = 3 if kind == "dice_ce" else 1
    logits = torch.randn(2, c, 16, 16, requires_grad=True)
    side = torch.randn(2, c, 8, 8, requires_grad=True)
    if kind == "dice_ce":
        target = torch.randint(0, 3, (2, 16, 16))
    else:
        target = (torch.rand(2, 1, 16, 16) > 0.7).float()
    crit = SegmentationLoss(kind, dice_weight=0.7, bce_weight=1.3, side_weight=0.4)
    out = crit(logits, target, side_logits=[side])
    pixel = {"dice_bce": "loss_bce", "dice_ce": "loss_ce", "focal_dice": "loss_focal"}[kind]
    assert set(out) == {"loss", "loss_dice", pixel, "loss_side"}
    expected = 0.7 * out["loss_dice"] + 1.3 * out[pixel] + 0.4 * out["loss_side"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    for t in (logits, side):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_segmentation_loss_without_side_and_config() -> None:
    logits = torch.randn(1, 1, 4, 4)
    target = torch.zeros(1, 4, 4)
    crit = SegmentationLoss.from_config({"kind": "dice_bce", "side_weight": 0.5, "pos_weight": 2.0})
    out = crit(logits, target)
    assert "loss_side" not in out
    assert out["loss"].item() == pytest.approx(dice_bce_loss(logits, target, pos_weight=2.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        SegmentationLoss("dice")
    with pytest.raises(TypeError):
        SegmentationLoss.from_config({"kind": "dice_bce", "dice_wieght": 1.0})
    with pytest.raises(ValueError, match="binary"):
        SegmentationLoss("focal_dice")(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4))
