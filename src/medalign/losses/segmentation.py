"""Dense losses of the segment task: Dice, Dice+BCE/CE, focal, side-output consistency.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# =========================================================================== Segmentation
# Dense losses for the segment task. Shapes: ``logits`` [N, C, H, W] (any number of spatial
# dims). C = 1 is binary: probabilities are ``sigmoid(logits)`` and ``target`` is a {0, 1} (or
# soft) mask of the same shape or without the channel axis. C > 1 is multi-class: probabilities
# are ``softmax(logits, dim=1)`` and ``target`` is an integer index map [N, H, W] / [N, 1, H, W]
# or an already one-hot/soft [N, C, H, W]; every class, background included, enters the Dice
# mean (background Dice keeps empty images from scoring 0 whatever is predicted).
# Nothing here thresholds: metrics in ``medalign.evaluation.metrics`` do that, losses stay differentiable.


SEGMENTATION_LOSS_KINDS = ("dice_bce", "dice_ce", "focal_dice")


def _binary_target(logits: Tensor, target: Tensor) -> Tensor:
    """Target as float with the logits' shape; a missing singleton channel axis is added."""
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    return target.to(logits.dtype)


def _probs_and_target(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(probabilities, target) as [N, C, ...] tensors of one dtype, sigmoid for C = 1, softmax else."""
    if logits.ndim < 3:
        raise ValueError(f"logits must be [N, C, *spatial], got shape {tuple(logits.shape)}")
    c = logits.shape[1]
    if c == 1:
        return torch.sigmoid(logits), _binary_target(logits, target)
    probs = torch.softmax(logits, dim=1)
    if target.shape == logits.shape and target.is_floating_point():
        return probs, target.to(probs.dtype)
    index = target[:, 0] if target.ndim == logits.ndim else target
    if index.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"index target must be [N, *spatial] = {tuple(logits.shape[:1] + logits.shape[2:])}, "
            f"got {tuple(target.shape)}"
        )
    onehot = F.one_hot(index.long(), c).movedim(-1, 1)
    return probs, onehot.to(probs.dtype)


def _soft_dice(probs: Tensor, target: Tensor, smooth: float, per_image: bool, squared: bool) -> Tensor:
    """1 - mean soft Dice over (image,) class; ``squared`` uses the V-Net denominator sum p^2 + sum t^2."""
    dims = tuple(range(2, probs.ndim)) if per_image else (0, *range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    if squared:
        denom = (probs * probs).sum(dims) + (target * target).sum(dims)
    else:
        denom = probs.sum(dims) + target.sum(dims)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return 1.0 - dice.mean()


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0, per_image: bool = True) -> Tensor:
    """Soft Dice loss ``1 - (2 sum p t + smooth) / (sum p + sum t + smooth)``, averaged.

    Dice is insensitive to the foreground/background imbalance that makes plain BCE predict
    "no lesion". ``per_image=True`` computes Dice per image and class and then averages, which
    matches the per-image evaluation protocol; ``False`` pools the pixels of the batch first
    (steadier on small lesions, but large lesions dominate). ``smooth`` keeps an image with an
    empty target and an empty prediction at loss ~0 instead of 0/0.
    """
    probs, tgt = _probs_and_target(logits, target)
    return _soft_dice(probs, tgt, smooth, per_image, squared=False)


def dice_bce_loss(
    logits: Tensor,
    target: Tensor,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    pos_weight: Tensor | float | None = None,
) -> Tensor:
    """``dice_weight * dice_loss + bce_weight * BCE-with-logits`` for binary (C = 1) logits.

    BCE gives well-behaved per-pixel gradients early in training, when soft Dice is flat;
    Dice then handles the imbalance. ``pos_weight`` up-weights foreground pixels in the BCE
    term only (a scalar or a tensor broadcastable to the logits).
    """
    if logits.ndim < 3 or logits.shape[1] != 1:
        raise ValueError(f"dice_bce_loss is binary: logits must be [N, 1, ...], got {tuple(logits.shape)}")
    tgt = _binary_target(logits, target)
    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, tgt, pos_weight=pw)
    return dice_weight * dice_loss(logits, tgt) + bce_weight * bce


def dice_ce_loss(
    logits: Tensor,
    target: Tensor,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    class_weight: Tensor | None = None,
) -> Tensor:
    """Multi-class twin of :func:`dice_bce_loss`: softmax Dice plus cross-entropy on an index map."""
    if logits.ndim < 3 or logits.shape[1] < 2:
        raise ValueError(f"dice_ce_loss needs C >= 2 logit channels, got {tuple(logits.shape)}")
    return dice_weight * dice_loss(logits, target) + ce_weight * _cross_entropy(logits, target, class_weight)


def _cross_entropy(logits: Tensor, target: Tensor, class_weight: Tensor | None) -> Tensor:
    if target.shape == logits.shape and target.is_floating_point():
        return F.cross_entropy(logits, target, weight=class_weight)  # soft / one-hot targets
    index = target[:, 0] if target.ndim == logits.ndim else target
    return F.cross_entropy(logits, index.long(), weight=class_weight)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: float | None = 0.25) -> Tensor:
    """Binary focal loss (Lin et al., 2017), mean over pixels: ``-alpha_t (1 - p_t)^gamma log p_t``.

    Down-weights the many easy background pixels so the few hard ones drive training.
    ``alpha_t = alpha`` on positives and ``1 - alpha`` on negatives (None disables it);
    ``log p_t`` comes from BCE-with-logits for numerical stability at large logits. Equal to
    torchvision's ``sigmoid_focal_loss(..., reduction="mean")``.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    tgt = _binary_target(logits, target)
    ce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * tgt + (1 - p) * (1 - tgt)
    loss = (1 - p_t).pow(gamma) * ce
    if alpha is not None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        loss = (alpha * tgt + (1 - alpha) * (1 - tgt)) * loss
    return loss.mean()


def side_output_consistency_loss(
    side_logits: list[Tensor] | tuple[Tensor, ...], final_logits: Tensor
) -> Tensor:
    """Coarse-to-fine consistency (C2FVL's idea): every side output should agree with the final map.

    Each side output [N, C, h, w] is bilinearly upsampled (``align_corners=False``) to the
    final size and scored against the *detached* final probabilities, so the fine prediction
    teaches the coarse decoder stages and never gets pulled towards them. The score is a
    Dice term plus a BCE term made exactly zero at agreement:

    * Dice with the V-Net denominator ``sum q^2 + sum p^2`` (the plain ``sum q + sum p``
      form is below 1 for soft targets even when q == p);
    * BCE against the soft target minus the target's own entropy, i.e. the KL divergence
      ``KL(p || q)`` per pixel (softmax cross-entropy minus entropy for C > 1). Same
      gradient as BCE, but zero, not ``H(p)``, when the side output matches.

    Returns the mean over side outputs (so the weight does not grow with decoder depth);
    zero, with the graph kept, for an empty list.
    """
    if not side_logits:
        return final_logits.sum() * 0.0
    size = final_logits.shape[2:]
    c = final_logits.shape[1]
    with torch.no_grad():
        final = final_logits.detach().float()
        target = torch.sigmoid(final) if c == 1 else torch.softmax(final, dim=1)
    terms = []
    for side in side_logits:
        if side.shape[:2] != final_logits.shape[:2]:
            raise ValueError(
                f"side output {tuple(side.shape)} must share [N, C] with final {tuple(final_logits.shape)}"
            )
        mode = "bilinear" if side.ndim == 4 else "trilinear" if side.ndim == 5 else "linear"
        up = (
            side if side.shape[2:] == size else F.interpolate(side, size=size, mode=mode, align_corners=False)
        )
        up = up.float()
        if c == 1:
            probs = torch.sigmoid(up)
            entropy = F.binary_cross_entropy(target, target, reduction="mean")
            kl = F.binary_cross_entropy_with_logits(up, target) - entropy
        else:
            probs = torch.softmax(up, dim=1)
            kl = F.kl_div(F.log_softmax(up, dim=1), target, reduction="sum") / target[:, 0].numel()
        dice = _soft_dice(probs, target, smooth=1.0, per_image=True, squared=True)
        terms.append(dice + kl)
    return torch.stack(terms).mean().to(final_logits.dtype)


class SegmentationLoss(nn.Module):
    """One configurable criterion for the segment task: a main loss plus side-output consistency.

    ``kind``: ``"dice_bce"`` (binary, C = 1), ``"dice_ce"`` (multi-class, index-map target) or
    ``"focal_dice"`` (binary; focal instead of BCE for very small lesions). ``dice_weight`` and
    ``bce_weight`` weigh the Dice and the pixel term (BCE, CE or focal) of the main loss;
    ``side_weight`` the :func:`side_output_consistency_loss` when side logits are given.

    ``forward(logits, target, side_logits=None)`` returns ``{"loss": total, "loss_dice": ..,
    "loss_bce" | "loss_ce" | "loss_focal": .., "loss_side": ..}`` where ``loss`` is exactly the
    weighted sum of the components (``loss_side`` only when side logits are given and
    ``side_weight > 0``). Only ``loss`` carries the graph; components are detached for logging.
    """

    def __init__(
        self,
        kind: str = "dice_bce",
        *,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        side_weight: float = 0.0,
        pos_weight: float | None = None,
        focal_gamma: float = 2.0,
        focal_alpha: float | None = 0.25,
        smooth: float = 1.0,
        per_image: bool = True,
    ) -> None:
        super().__init__()
        if kind not in SEGMENTATION_LOSS_KINDS:
            raise ValueError(
                f"unknown segmentation loss kind {kind!r}; choose one of {SEGMENTATION_LOSS_KINDS}"
            )
        for name, value in (
            ("dice_weight", dice_weight),
            ("bce_weight", bce_weight),
            ("side_weight", side_weight),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.kind = kind
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.side_weight = float(side_weight)
        self.pos_weight = pos_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.smooth = smooth
        self.per_image = per_image

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SegmentationLoss:
        """Build from a plain mapping (YAML section); unknown keys raise so typos are not ignored."""
        cfg = dict(config)
        kind = cfg.pop("kind", "dice_bce")
        return cls(kind, **cfg)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, dice_weight={self.dice_weight}, bce_weight={self.bce_weight}, "
            f"side_weight={self.side_weight}"
        )

    def forward(
        self, logits: Tensor, target: Tensor, side_logits: list[Tensor] | tuple[Tensor, ...] | None = None
    ) -> dict[str, Tensor]:
        binary = self.kind != "dice_ce"
        if binary and (logits.ndim < 3 or logits.shape[1] != 1):
            raise ValueError(
                f"kind {self.kind!r} is binary: logits must be [N, 1, ...], got {tuple(logits.shape)}"
            )
        if not binary and (logits.ndim < 3 or logits.shape[1] < 2):
            raise ValueError(f"kind 'dice_ce' needs C >= 2 logit channels, got {tuple(logits.shape)}")
        if binary:
            target = _binary_target(logits, target)
        dice = dice_loss(logits, target, smooth=self.smooth, per_image=self.per_image)
        if self.kind == "dice_bce":
            pixel_name = "loss_bce"
            pw = self.pos_weight
            pwt = None if pw is None else torch.as_tensor(pw, dtype=logits.dtype, device=logits.device)
            pixel = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pwt)
        elif self.kind == "dice_ce":
            pixel_name = "loss_ce"
            pixel = _cross_entropy(logits, target, None)
        else:
            pixel_name = "loss_focal"
            pixel = focal_loss(logits, target, gamma=self.focal_gamma, alpha=self.focal_alpha)

        total = self.dice_weight * dice + self.bce_weight * pixel
        result: dict[str, Tensor] = {"loss_dice": dice.detach(), pixel_name: pixel.detach()}
        if side_logits is not None and self.side_weight > 0:
            side = side_output_consistency_loss(side_logits, logits)
            result["loss_side"] = side.detach()
            total = total + self.side_weight * side
        result["loss"] = total
        return result
