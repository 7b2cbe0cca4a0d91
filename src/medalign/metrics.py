"""Evaluation math on plain arrays: classification, retrieval and segmentation.

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
from scipy import ndimage
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


PROBABILITY_DIGITS = 6  # significant digits of saved per-case probabilities
ROW_KEYS = ("per_case", "examples")  # per-case lists in metrics dicts; summaries leave them out


def probability_rows(
    case_ids: Sequence[str], labels: ArrayLike, probs: ArrayLike, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """``[{"case_id", "label", "probs": {class: p}}]``: what ROC curves are drawn from later.

    Probabilities keep :data:`PROBABILITY_DIGITS` significant digits (not decimals, so 3e-9 and
    2e-9 stay ordered): enough for a faithful ROC curve while keeping metrics.json small.
    """
    y, p = to_numpy(labels), to_numpy(probs, np.float64)
    if not len(case_ids) == len(y) == len(p) or p.shape[1] != len(class_names):
        raise ValueError(
            f"{len(case_ids)} case ids, {len(y)} labels and probabilities of shape {p.shape} "
            f"for {len(class_names)} classes do not match"
        )
    return [
        {
            "case_id": str(case_id),
            "label": int(label),
            "probs": {
                str(c): float(f"{v:.{PROBABILITY_DIGITS}g}") for c, v in zip(class_names, row, strict=True)
            },
        }
        for case_id, label, row in zip(case_ids, y, p, strict=True)
    ]


def without_rows(metrics: Any) -> Any:
    """``metrics`` without the :data:`ROW_KEYS` lists at any depth: the summary a bundle or a
    terminal gets, while metrics.json keeps the rows for the report."""
    if not isinstance(metrics, dict):
        return metrics
    return {k: without_rows(v) for k, v in metrics.items() if k not in ROW_KEYS}


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


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), so dot products are cosine similarities."""
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def cosine_similarity(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """[Na, Nb] cosine similarity in float64 on CPU, so identical embeddings tie exactly."""
    x = to_numpy(a, np.float64)
    y = to_numpy(b, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"embeddings must be [N, D] with equal D, got {x.shape} and {y.shape}")
    return unit_rows(x) @ unit_rows(y).T


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
# Dice, IoU, HD95, NSD per DESIGN.md "Metric semantics"; tested in tests/test_metrics_segmentation.py.
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


# ----------------------------------------------------------------------------- calibration
# Top-label calibration (Guo et al., 2017): the confidence of a prediction is its largest class
# probability; bins are equal-width on (0, 1], bin m holding (m-1)/M < confidence <= m/M (a
# confidence of exactly 0 goes to the first bin). ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)|.


def _top_label(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = to_numpy(probs, np.float64)
    if p.ndim == 1:  # binary: probability of class 1
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must be [N, K] with K >= 2 (or [N] binary), got shape {p.shape}")
    if p.size and (p.min() < -1e-6 or p.max() > 1 + 1e-6 or not np.allclose(p.sum(1), 1.0, atol=1e-4)):
        raise ValueError("probs must be probabilities (each row in [0, 1] summing to 1); apply softmax first")
    y = to_numpy(labels).astype(np.int64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"labels has {len(y)} entries but probs has {len(p)} rows")
    if len(y) == 0:
        raise ValueError("no samples to evaluate")
    if ((y < 0) | (y >= p.shape[1])).any():
        raise ValueError(f"labels must lie in [0, {p.shape[1]}); filter missing labels (-1) first")
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def reliability_curve(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, Any]:
    """Per-bin mean confidence, accuracy and count of the top-label prediction, and the ECE.

    Returns ``{"n_bins", "edges" [M+1], "confidence" [M], "accuracy" [M], "count" [M], "ece", "n"}``;
    the confidence and accuracy of an empty bin are None (nothing to plot there).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence, correct = _top_label(probs, labels)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    filled = count > 0
    ece = float(np.abs(acc_sum[filled] - conf_sum[filled]).sum() / len(confidence))
    return {
        "n_bins": int(n_bins),
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count, strict=True)],
        "accuracy": [float(s / c) if c else None for s, c in zip(acc_sum, count, strict=True)],
        "count": count.astype(int).tolist(),
        "ece": ece,
        "n": len(confidence),
    }


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins (see :func:`reliability_curve`)."""
    return reliability_curve(probs, labels, n_bins)["ece"]


# ----------------------------------------------------------------------------- survival
# ``time`` >= 0, ``event`` 1 = the event was observed at ``time``, 0 = censored then; ``risk``
# higher = earlier event expected (a Cox log hazard ratio, a predicted hazard). At a time shared
# by an event and a censoring, the event is taken to come first (the censored case was still
# known to be event-free then), the convention of lifelines, scikit-survival and R's survival.


def _survival_arrays(time: ArrayLike, event: ArrayLike, *others: ArrayLike) -> list[np.ndarray]:
    t = to_numpy(time, np.float64).reshape(-1)
    e = to_numpy(event, np.float64).reshape(-1)
    arrays = [t, e, *(to_numpy(o).reshape(-1) for o in others)]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"time, event and the other inputs differ in length: {[len(a) for a in arrays]}")
    if len(t) == 0:
        raise ValueError("no cases to evaluate")
    if not np.isfinite(t).all() or (t < 0).any():
        raise ValueError("time must be finite and >= 0")
    if not np.isin(e, (0.0, 1.0)).all():
        raise ValueError("event must be 0 (censored) or 1 (event)")
    return arrays


def concordance_index(time: ArrayLike, event: ArrayLike, risk: ArrayLike) -> dict[str, Any]:
    """Harrell's C-index: the fraction of comparable pairs whose risks are ordered like their times.

    A pair (i, j) is comparable when case i has an event and ``time_i < time_j``, or
    ``time_i == time_j`` with j censored (the event comes first); two events at the same time,
    and pairs whose earlier time is censored, are not comparable. A comparable pair is concordant
    when ``risk_i > risk_j`` and counts 0.5 when the risks tie (as in lifelines and
    scikit-survival). Returns ``{"c_index", "concordant", "discordant", "tied_risk",
    "comparable"}``; ``c_index`` is None when no pair is comparable.
    """
    t, e, r = _survival_arrays(time, event, risk)
    r = r.astype(np.float64)
    if not np.isfinite(r).all():
        raise ValueError("risk must be finite")
    ti, tj = t[:, None], t[None, :]
    comparable = (e[:, None] == 1) & ((ti < tj) | ((ti == tj) & (e[None, :] == 0)))
    concordant = int((comparable & (r[:, None] > r[None, :])).sum())
    tied = int((comparable & (r[:, None] == r[None, :])).sum())
    total = int(comparable.sum())
    return {
        "c_index": (concordant + 0.5 * tied) / total if total else None,
        "concordant": concordant,
        "discordant": total - concordant - tied,
        "tied_risk": tied,
        "comparable": total,
    }


def kaplan_meier(time: ArrayLike, event: ArrayLike) -> dict[str, Any]:
    """Kaplan-Meier estimate as a right-continuous step function at each distinct time.

    ``survival[i]`` is S(t) for ``time[i] <= t < time[i+1]`` (S = 1 before the first time);
    ``at_risk[i]`` counts cases with time >= ``time[i]``; ``events``/``censored`` count what
    happened at ``time[i]``. ``median`` is the first time with S <= 0.5 (None if never reached).
    """
    t, e = _survival_arrays(time, event)
    times, inverse = np.unique(t, return_inverse=True)
    events = np.bincount(inverse, weights=e, minlength=len(times))
    total = np.bincount(inverse, minlength=len(times))
    at_risk = len(t) - np.concatenate([[0], np.cumsum(total)[:-1]])
    survival = np.cumprod(1.0 - events / at_risk)
    below = np.flatnonzero(survival <= 0.5)
    return {
        "time": times.tolist(),
        "survival": survival.tolist(),
        "at_risk": at_risk.astype(int).tolist(),
        "events": events.astype(int).tolist(),
        "censored": (total - events).astype(int).tolist(),
        "median": float(times[below[0]]) if below.size else None,
    }


def _censoring_survival(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KM estimate G of the censoring distribution (a censoring is its "event").

    At a time shared with events, the events leave the risk set first (they come before the
    censorings), as in scikit-survival's ``CensoringDistributionEstimator``.
    """
    times, inverse = np.unique(time, return_inverse=True)
    deaths = np.bincount(inverse, weights=event, minlength=len(times))
    total = np.bincount(inverse, minlength=len(times))
    at_risk = len(time) - np.concatenate([[0], np.cumsum(total)[:-1]]) - deaths
    censored = total - deaths
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(at_risk > 0, 1.0 - censored / np.maximum(at_risk, 1), 1.0)
    return times, np.cumprod(factor)


def time_dependent_auc(
    time: ArrayLike,
    event: ArrayLike,
    risk: ArrayLike,
    times: Sequence[float],
    *,
    train_time: ArrayLike | None = None,
    train_event: ArrayLike | None = None,
) -> dict[str, Any]:
    """Cumulative/dynamic AUC(t) with inverse-probability-of-censoring weights (Uno et al. 2007).

    ``AUC(t) = sum_i sum_j w_i 1[t_i <= t, d_i = 1] 1[t_j > t] (1[r_i > r_j] + 0.5 1[r_i = r_j])
    / (sum_i w_i 1[t_i <= t, d_i = 1] * sum_j 1[t_j > t])`` with ``w_i = 1 / G(t_i)``: cases
    are those with an event by t, controls those still event-free after t, and each case is
    up-weighted by the inverse probability of having remained uncensored until its event. G
    is the Kaplan-Meier estimate of the censoring distribution on ``train_time``/``train_event``
    (the evaluated cases themselves when not given), right-continuous, events before censorings
    at shared times: scikit-survival's ``cumulative_dynamic_auc``. Returns
    ``{"times", "auc" (None where t has no case or no control), "mean" (unweighted mean of the
    defined values)}``. A case whose G is 0 is an error (t beyond the censoring follow-up).
    """
    t, e, r = _survival_arrays(time, event, risk)
    r = r.astype(np.float64)
    if train_time is None:
        g_times, g = _censoring_survival(t, e)
    else:
        if train_event is None:
            raise ValueError("train_time needs train_event")
        tt, te = _survival_arrays(train_time, train_event)
        g_times, g = _censoring_survival(tt, te)
    position = np.searchsorted(g_times, t, side="right") - 1
    g_at = np.where(position >= 0, g[np.clip(position, 0, None)], 1.0)
    aucs: list[float | None] = []
    for horizon in [float(x) for x in times]:
        cases = (t <= horizon) & (e == 1)
        controls = t > horizon
        if not cases.any() or not controls.any():
            aucs.append(None)
            continue
        if (g_at[cases] <= 0).any():
            raise ValueError(
                f"time {horizon}: the censoring survival is 0 at a case's time (beyond follow-up)"
            )
        w = 1.0 / g_at[cases]
        rc, rn = r[cases][:, None], r[controls][None, :]
        ordered = (rc > rn) + 0.5 * (rc == rn)
        aucs.append(float((w[:, None] * ordered).sum() / (w.sum() * controls.sum())))
    defined = [a for a in aucs if a is not None]
    return {
        "times": [float(x) for x in times],
        "auc": aucs,
        "mean": float(np.mean(defined)) if defined else None,
    }


def logrank_test(time: ArrayLike, event: ArrayLike, groups: ArrayLike) -> dict[str, Any]:
    """The (Mantel-Haenszel) log-rank test of equal survival across two or more groups.

    At every distinct event time, group g's expected events are ``E_g = d * n_g / n`` (d events
    among n at risk, n_g of them in g) with hypergeometric covariance
    ``V_gh = d (n - d) / (n - 1) * n_g / n * (delta_gh - n_h / n)``; the statistic is
    ``(O - E)' V^- (O - E)`` over the first G-1 groups, chi-square with G-1 degrees of freedom.
    Returns ``{"chi2", "df", "p_value", "groups", "observed", "expected"}``.
    """
    from scipy.stats import chi2 as chi2_dist

    t, e, g = _survival_arrays(time, event, groups)
    names, index = np.unique(g, return_inverse=True)
    if len(names) < 2:
        raise ValueError(f"the log-rank test needs at least two groups, got {names.tolist()}")
    k = len(names)
    observed, expected, variance = np.zeros(k), np.zeros(k), np.zeros((k, k))
    for moment in np.unique(t[e == 1]):
        risk_set = t >= moment
        n_g = np.bincount(index[risk_set], minlength=k).astype(np.float64)
        d_g = np.bincount(index[(t == moment) & (e == 1)], minlength=k).astype(np.float64)
        n, d = n_g.sum(), d_g.sum()
        observed += d_g
        expected += d * n_g / n
        if n > 1:
            share = n_g / n
            variance += d * (n - d) / (n - 1) * (np.diag(share) - np.outer(share, share))
    diff = (observed - expected)[:-1]
    chi2 = float(diff @ np.linalg.pinv(variance[:-1, :-1]) @ diff)
    return {
        "chi2": chi2,
        "df": k - 1,
        "p_value": float(chi2_dist.sf(chi2, k - 1)),
        "groups": [str(x) for x in names],
        "observed": observed.astype(int).tolist(),
        "expected": expected.tolist(),
    }
