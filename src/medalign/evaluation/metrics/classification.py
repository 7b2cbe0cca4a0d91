"""Classification metrics: accuracy, balanced accuracy, macro-F1, one-vs-rest AUC.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from medalign.evaluation.metrics.arrays import ArrayLike, ScoreKind, as_probabilities, to_numpy

# ----------------------------------------------------------------------------- classification


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """sklearn's bACC (mean recall over classes in ``y``) without its warning about predicted-only
    classes: that case is the documented semantics here, not a surprise worth a warning per call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y, pred))


def classification_metrics(
    y_true: ArrayLike,
    scores: ArrayLike,
    class_names: Sequence[str] | None = None,
    *,
    scores_are: ScoreKind = "auto",
) -> dict[str, Any]:
    """ACC, balanced ACC, macro-F1, OvR AUC, per-class recall/AUC and the confusion matrix.

    ``y_true`` holds class indices in ``[0, K)``; missing labels (the dataset's -1) must be
    filtered by the caller, because dropping them here would hide how many were missing.

    Returns ``{"n", "class_names", "accuracy", "balanced_accuracy", "macro_f1", "auc",
    "auc_excluded_classes", "per_class_auc", "per_class_recall", "confusion_matrix"}``;
    ``auc`` is None when fewer than two classes occur in ``y_true``, per-class entries are None
    for classes absent from ``y_true``; ``confusion_matrix[i][j]`` counts true ``i`` predicted
    ``j`` over all K classes.
    """
    y = to_numpy(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    probs = as_probabilities(scores, scores_are)
    n, k = probs.shape
    if len(y) != n:
        raise ValueError(f"y_true has {len(y)} entries but scores has {n} rows")
    if n == 0:
        raise ValueError("no samples to evaluate")
    if k < 2:
        raise ValueError(f"need at least 2 classes, scores has {k} columns")
    names = [str(i) for i in range(k)] if class_names is None else [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} score columns")
    bad = np.flatnonzero((y < 0) | (y >= k))
    if bad.size:
        raise ValueError(
            f"{bad.size} labels outside [0, {k}) (first at index {int(bad[0])}: {int(y[bad[0]])}); "
            "filter missing labels (-1) before evaluating"
        )

    pred = probs.argmax(axis=1)
    present = np.unique(y)
    scored = np.union1d(present, pred)
    cm = confusion_matrix(y, pred, labels=np.arange(k))

    per_class_recall: dict[str, float | None] = {}
    for c in range(k):
        support = cm[c].sum()
        per_class_recall[names[c]] = float(cm[c, c] / support) if support else None

    per_class_auc: dict[str, float | None] = dict.fromkeys(names)
    auc: float | None = None
    if present.size >= 2:
        for c in present:
            per_class_auc[names[c]] = float(roc_auc_score(y == c, probs[:, c]))
        if k == 2:
            auc = per_class_auc[names[1]]
        else:
            auc = float(np.mean([per_class_auc[names[c]] for c in present]))

    return {
        "n": int(n),
        "class_names": names,
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "macro_f1": float(f1_score(y, pred, labels=scored, average="macro", zero_division=0)),
        "auc": auc,
        "auc_excluded_classes": [names[c] for c in range(k) if c not in present],
        "per_class_auc": per_class_auc,
        "per_class_recall": per_class_recall,
        "confusion_matrix": cm.astype(int).tolist(),
    }
