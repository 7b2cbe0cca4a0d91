"""Evaluation math on plain arrays, one module per kind; every metric is importable from here.

Nothing here imports a model: functions take numpy arrays or torch tensors and return
JSON-ready dicts (conventions: :mod:`medalign.evaluation.metrics.arrays`).
"""

from __future__ import annotations

from medalign.evaluation.metrics.arrays import (
    ArrayLike,
    ScoreKind,
    as_probabilities,
    softmax,
    to_numpy,
)
from medalign.evaluation.metrics.calibration import (
    expected_calibration_error,
    reliability_curve,
)
from medalign.evaluation.metrics.classification import (
    balanced_accuracy,
    classification_metrics,
)
from medalign.evaluation.metrics.retrieval import (
    bidirectional_retrieval,
    cosine_similarity,
    retrieval_metrics,
    retrieval_ranks,
    same_group_positives,
    unit_rows,
)
from medalign.evaluation.metrics.rows import (
    PROBABILITY_DIGITS,
    ROW_KEYS,
    probability_rows,
    without_rows,
)
from medalign.evaluation.metrics.segmentation import (
    SegmentationMetrics,
    dice_iou_per_image,
    hd95,
    nsd,
    pooled_dice,
    worst_surface_distance,
)
from medalign.evaluation.metrics.survival import (
    concordance_index,
    kaplan_meier,
    logrank_test,
    time_dependent_auc,
)

__all__ = [
    "PROBABILITY_DIGITS",
    "ROW_KEYS",
    "ArrayLike",
    "ScoreKind",
    "SegmentationMetrics",
    "as_probabilities",
    "balanced_accuracy",
    "bidirectional_retrieval",
    "classification_metrics",
    "concordance_index",
    "cosine_similarity",
    "dice_iou_per_image",
    "expected_calibration_error",
    "hd95",
    "kaplan_meier",
    "logrank_test",
    "nsd",
    "pooled_dice",
    "probability_rows",
    "reliability_curve",
    "retrieval_metrics",
    "retrieval_ranks",
    "same_group_positives",
    "softmax",
    "time_dependent_auc",
    "to_numpy",
    "unit_rows",
    "without_rows",
    "worst_surface_distance",
]
