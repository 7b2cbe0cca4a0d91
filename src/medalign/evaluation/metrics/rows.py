"""Per-case rows of metric dicts: saved probabilities, and summaries without the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medalign.evaluation.metrics.arrays import ArrayLike, to_numpy

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
