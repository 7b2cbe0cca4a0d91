"""Evaluation math on plain arrays: classification and retrieval (segmentation is added below later).

Every function takes numpy arrays or torch tensors (any device, any float dtype) and returns a
JSON-ready dict of Python scalars and lists, so results can be logged, compared across runs and
written into a bundle without knowing which model produced them. Nothing here imports a model.

Conventions fixed here (see "Metric semantics" in DESIGN.md) and tested in
``tests/test_metrics_classification.py``:

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

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]
ScoreKind = Literal["auto", "probabilities", "logits"]

_PROB_ATOL = 1e-4  # rows of float32 softmax outputs sum to 1 within ~1e-6; logits almost never do
_RANK_BLOCK = 1024  # query rows per block, so an [Nq, Nc] retrieval never needs several full copies


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


# ----------------------------------------------------------------------------- retrieval


def _positive_matrix(positives: ArrayLike | None, nq: int, nc: int) -> np.ndarray:
    if positives is None:
        if nq > nc:
            raise ValueError(
                f"diagonal positives need at least as many candidates as queries, got {nq} x {nc}"
            )
        return np.eye(nq, nc, dtype=bool)
    pos = to_numpy(positives)
    if pos.shape != (nq, nc):
        raise ValueError(f"positives has shape {pos.shape}, similarity is {(nq, nc)}")
    if pos.dtype != np.bool_:
        if not np.isin(pos, (0, 1)).all():
            raise ValueError("positives must be boolean (or 0/1)")
        pos = pos.astype(bool)
    empty = np.flatnonzero(~pos.any(axis=1))
    if empty.size:
        raise ValueError(
            f"{empty.size} queries have no positive candidate (first: query {int(empty[0])}); "
            "their rank is undefined"
        )
    return pos


def _tie_counts(sim: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: candidates strictly above the best positive, positives and negatives tied with it."""
    best = np.where(pos, sim, -np.inf).max(axis=1, keepdims=True)
    above = (sim > best).sum(axis=1)
    tied = sim == best
    tied_pos = (tied & pos).sum(axis=1)
    tied_neg = (tied & ~pos).sum(axis=1)
    return above, tied_pos, tied_neg


def _hit_probability(k: int, above: np.ndarray, tied_pos: np.ndarray, tied_neg: np.ndarray) -> np.ndarray:
    """P(some positive within the top k) when the tied block is ordered uniformly at random.

    The first ``m = k - above`` slots of the tied block miss every positive with probability
    prod_{i<m} (t_neg - i) / (t_neg + t_pos - i); with one positive this is just m / (t_neg + 1).
    """
    m = k - above
    miss = np.ones(above.shape, dtype=np.float64)
    for i in range(int(min(k, max(int(m.max(initial=0)), 0)))):
        active = i < m
        factor = np.where(i < tied_neg, (tied_neg - i) / np.maximum(tied_neg + tied_pos - i, 1), 0.0)
        miss = np.where(active, miss * factor, miss)
    return np.where(m <= 0, 0.0, 1.0 - miss)


def retrieval_ranks(similarity: ArrayLike, positives: ArrayLike | None = None) -> np.ndarray:
    """Expected 1-based rank of the best-ranked positive per query (ties: see the module docstring)."""
    sim = to_numpy(similarity, np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be [Nq, Nc], got shape {sim.shape}")
    if not np.all(np.isfinite(sim)):
        raise ValueError("similarity contains NaN or inf")
    pos = _positive_matrix(positives, *sim.shape)
    ranks = np.empty(sim.shape[0], dtype=np.float64)
    for start in range(0, sim.shape[0], _RANK_BLOCK):
        block = slice(start, start + _RANK_BLOCK)
        above, tied_pos, tied_neg = _tie_counts(sim[block], pos[block])
        ranks[block] = 1.0 + above + tied_neg / (tied_pos + 1.0)
    return ranks


def retrieval_metrics(
    similarity: ArrayLike, positives: ArrayLike | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, Any]:
    """R@K (fractions in [0, 1]), median and mean rank of one retrieval direction.

    ``similarity[q, c]`` scores candidate ``c`` for query ``q`` (higher is better);
    ``positives`` is None (query ``i`` matches candidate ``i`` only) or a boolean [Nq, Nc]
    matrix when several candidates are correct (e.g. identical reports). A query without any
    positive raises instead of being dropped.

    Returns ``{"R@1": .., "R@5": .., "R@10": .., "median_rank", "mean_rank", "n_queries",
    "n_candidates"}``, one ``R@k`` per entry of ``ks``.
    """
    sim = to_numpy(similarity, np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be [Nq, Nc], got shape {sim.shape}")
    if sim.shape[0] == 0:
        raise ValueError("no queries to evaluate")
    if not np.all(np.isfinite(sim)):
        raise ValueError("similarity contains NaN or inf")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {list(ks)}")
    pos = _positive_matrix(positives, *sim.shape)
    nq, nc = sim.shape
    hits = {int(k): np.empty(nq) for k in ks}
    ranks = np.empty(nq)
    for start in range(0, nq, _RANK_BLOCK):
        block = slice(start, start + _RANK_BLOCK)
        above, tied_pos, tied_neg = _tie_counts(sim[block], pos[block])
        ranks[block] = 1.0 + above + tied_neg / (tied_pos + 1.0)
        for k, hit in hits.items():
            hit[block] = _hit_probability(k, above, tied_pos, tied_neg)
    out: dict[str, Any] = {f"R@{k}": float(hit.mean()) for k, hit in hits.items()}
    out.update(
        median_rank=float(np.median(ranks)),
        mean_rank=float(ranks.mean()),
        n_queries=int(nq),
        n_candidates=int(nc),
    )
    return out


def same_group_positives(query_groups: ArrayLike, candidate_groups: ArrayLike) -> np.ndarray:
    """Boolean [Nq, Nc] "same key" matrix, e.g. texts equal to a query's own report all count as hits."""
    q = to_numpy(query_groups)
    c = to_numpy(candidate_groups)
    return q[:, None] == c[None, :]


def cosine_similarity(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """[Na, Nb] cosine similarity in float64 on CPU, so identical embeddings tie exactly."""
    x = to_numpy(a, np.float64)
    y = to_numpy(b, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"embeddings must be [N, D] with equal D, got {x.shape} and {y.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return x @ y.T


def bidirectional_retrieval(
    image_embeds: ArrayLike,
    text_embeds: ArrayLike,
    positives: ArrayLike | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, Any]]:
    """Image->text and text->image retrieval on cosine similarity (embeddings normalised here).

    ``positives`` is [N_image, N_text] (None: image ``i`` pairs with text ``i``); the
    text->image direction uses its transpose, so one matrix describes both.
    """
    sim = cosine_similarity(image_embeds, text_embeds)
    pos_t = None if positives is None else to_numpy(positives).T
    return {
        "image_to_text": retrieval_metrics(sim, positives, ks),
        "text_to_image": retrieval_metrics(sim.T, pos_t, ks),
    }


# ----------------------------------------------------------------------------- segmentation
# (Dice, IoU, HD95, NSD per DESIGN.md "Metric semantics" — to be added here.)
