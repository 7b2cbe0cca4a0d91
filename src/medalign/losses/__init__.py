"""Losses, one module per family; every loss is importable from here (``medalign.losses.clip_loss``).

Everything is plain torch so a loss can be checked by hand, reused by any task and imported
without training dependencies.
"""

from __future__ import annotations

from medalign.losses.contrastive import (
    GLORIA_TEMPERATURE_AGGREGATION,
    GLORIA_TEMPERATURE_ATTENTION,
    GLORIA_TEMPERATURE_SCORES,
    LOSS_KINDS,
    SOFT_TARGET_MODES,
    ContrastiveLoss,
    clip_loss,
    dcl_loss,
    local_alignment_loss,
    siglip_loss,
    soft_targets_from_labels,
    soft_targets_from_similarity,
)
from medalign.losses.distributed import (
    gather_with_grad,
)
from medalign.losses.fusion import (
    MMD_BANDWIDTHS,
    disentangled_contrastive_loss,
    dissimilarity_loss,
    mmd_loss,
    moe_balance_loss,
    multiscale_mmd_loss,
    orthogonality_loss,
    similarity_loss,
)
from medalign.losses.segmentation import (
    SEGMENTATION_LOSS_KINDS,
    SegmentationLoss,
    dice_bce_loss,
    dice_ce_loss,
    dice_loss,
    focal_loss,
    side_output_consistency_loss,
)
from medalign.losses.survival import (
    cox_partial_likelihood_loss,
    discrete_time_survival_loss,
    survival_intervals,
)

__all__ = [
    "GLORIA_TEMPERATURE_AGGREGATION",
    "GLORIA_TEMPERATURE_ATTENTION",
    "GLORIA_TEMPERATURE_SCORES",
    "LOSS_KINDS",
    "MMD_BANDWIDTHS",
    "SEGMENTATION_LOSS_KINDS",
    "SOFT_TARGET_MODES",
    "ContrastiveLoss",
    "SegmentationLoss",
    "clip_loss",
    "cox_partial_likelihood_loss",
    "dcl_loss",
    "dice_bce_loss",
    "dice_ce_loss",
    "dice_loss",
    "discrete_time_survival_loss",
    "disentangled_contrastive_loss",
    "dissimilarity_loss",
    "focal_loss",
    "gather_with_grad",
    "local_alignment_loss",
    "mmd_loss",
    "moe_balance_loss",
    "multiscale_mmd_loss",
    "orthogonality_loss",
    "side_output_consistency_loss",
    "siglip_loss",
    "similarity_loss",
    "soft_targets_from_labels",
    "soft_targets_from_similarity",
    "survival_intervals",
]
