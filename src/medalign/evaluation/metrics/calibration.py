"""Calibration: the top-label reliability curve and the expected calibration error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.evaluation.metrics.arrays import ArrayLike, to_numpy

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
