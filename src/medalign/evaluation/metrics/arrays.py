"""Array conversions every metric module shares, and the conventions of them all.

Every function takes numpy arrays or torch tensors (any device, any float dtype) and returns a
JSON-ready dict of Python scalars and lists, so results can be logged, compared across runs and
written into a bundle without knowing which model produced them. Nothing here imports a model.

Conventions fixed here (see "Metric semantics" in DESIGN.md) and tested in
``tests/evaluation/metrics/test_classification.py``:

Classification
    ``scores`` are [N, K] probabilities or logits; the prediction is the row argmax (identical
    for both). AUC is computed on softmax probabilities, one-vs-rest per class, macro-averaged
    over the classes that occur in ``y_true`` (a class with no positives has no ROC curve;
    those classes are listed in ``auc_excluded_classes`` instead of silently shrinking the
    average). Binary problems (K = 2) report the AUC of class 1, which equals the OvR macro.
    Balanced accuracy averages recall over the classes present in ``y_true``; macro-F1 averages
    over classes present in ``y_true`` or predicted (a class predicted but absent from the truth
    scores F1 = 0, so spurious predictions cost something; a class neither present nor predicted
    is not scored).

Retrieval
    Ranks are 1-based. Tied scores are resolved by their expectation under uniformly random
    tie-breaking: a positive with ``h`` strictly better candidates and ``t`` tied negatives has
    rank ``1 + h + t/2``, and R@K is the probability that it lands in the top K. This is the
    only choice that is neither optimistic (a collapsed model whose similarities are all equal
    would otherwise score R@1 = 1) nor pessimistic: constant scores give exactly chance level,
    R@K = K / Nc. With several positives per query the best-ranked positive counts; with ``p``
    positives tied at the top score among ``t`` tied negatives its expected rank is
    ``1 + h + t/(p+1)`` and R@K follows the hypergeometric draw of the tied block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]
ScoreKind = Literal["auto", "probabilities", "logits"]

_PROB_ATOL = 1e-4  # rows of float32 softmax outputs sum to 1 within ~1e-6; logits almost never do


def to_numpy(x: ArrayLike, dtype: type | None = None) -> np.ndarray:
    """Tensors arrive from any device and dtype (bf16 has no numpy twin), so go through float CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax, shifted by the row max so large logit scales (CLIP uses 100) do not overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _looks_like_probabilities(scores: np.ndarray) -> bool:
    return bool(
        np.all(scores >= 0) and np.all(scores <= 1) and np.allclose(scores.sum(axis=1), 1.0, atol=_PROB_ATOL)
    )


def as_probabilities(scores: ArrayLike, scores_are: ScoreKind = "auto") -> np.ndarray:
    """[N, K] probabilities; "auto" keeps rows that already are a distribution and softmaxes the rest.

    Auto-detection looks at the whole matrix, not per row, so one batch is never a mixture. Pass
    ``scores_are`` explicitly when logits could by chance be non-negative and sum to one.
    """
    s = to_numpy(scores, np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [N, K], got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    if scores_are == "probabilities" or (scores_are == "auto" and _looks_like_probabilities(s)):
        return s
    if scores_are not in ("auto", "logits"):
        raise ValueError(f"scores_are must be 'auto', 'probabilities' or 'logits', got {scores_are!r}")
    return softmax(s)
