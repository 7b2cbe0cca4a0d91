"""Retrieval metrics with expected ranks under random tie-breaking (R@K, median rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medalign.evaluation.metrics.arrays import ArrayLike, to_numpy

_RANK_BLOCK = 1024  # query rows per block, so an [Nq, Nc] retrieval never needs several full copies


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
