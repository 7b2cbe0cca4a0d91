"""Linear probe on frozen embeddings: the standard yardstick for how much a representation knows.

Protocol (fixed so numbers are comparable across runs and papers that use the same recipe):

1. Standardise features with mean/std fitted on the training split only (val/test statistics
   must not leak into the model).
2. For each C in the grid fit an L2 multinomial logistic regression (lbfgs, no class weights)
   on train and score balanced accuracy on val. Balanced accuracy, because medical label
   distributions are skewed and plain accuracy would favour predicting the majority class.
3. Pick the best C; ties go to the smaller C (stronger regularisation, the safer choice when
   the validation set cannot tell them apart). The grid is scanned in ascending order, so the
   choice is deterministic whatever order ``Cs`` is given in.
4. Use the model fitted on train at that C for the test split. It is deliberately NOT refitted
   on train+val: the chosen C was tuned for the training-set size, the test number then
   measures exactly the model whose validation score selected it, and val stays untouched
   by training so it can be reused (e.g. for calibration) without optimism.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.preprocessing import StandardScaler

from medalign.evaluation.metrics import ArrayLike, balanced_accuracy, classification_metrics, to_numpy


def _features(x: ArrayLike, name: str) -> np.ndarray:
    arr = to_numpy(x, np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _labels(y: ArrayLike, n: int, name: str) -> np.ndarray:
    arr = to_numpy(y).astype(np.int64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have {n} labels, got shape {arr.shape}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} has negative labels; filter missing labels (-1) first")
    return arr


def _full_proba(model: LogisticRegression, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba over all K classes; classes never seen in training get probability 0."""
    proba = np.zeros((x.shape[0], n_classes))
    proba[:, model.classes_] = model.predict_proba(x)
    return proba


def linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    val_x: ArrayLike,
    val_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    *,
    Cs: Sequence[float] | np.ndarray = np.logspace(-3, 3, 7),  # noqa: B008 - only read, never mutated
    max_iter: int = 2000,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    n_classes: int | None = None,
) -> dict[str, Any]:
    """Select C on val balanced accuracy, report test :func:`classification_metrics`.

    ``n_classes`` defaults to ``len(class_names)`` or else the largest label in any split + 1,
    so the test confusion matrix has a row for every class even if training lacked one.

    Returns ``{"C": chosen C, "val_balanced_accuracy": its val score, "val_scores": [{"C",
    "balanced_accuracy", "accuracy", "converged"} per C, ascending], "test": classification
    metrics dict, "n_train", "n_val", "n_test", "n_features"}``.
    """
    xs = {
        name: _features(x, name) for name, x in (("train_x", train_x), ("val_x", val_x), ("test_x", test_x))
    }
    dims = {x.shape[1] for x in xs.values()}
    if len(dims) != 1:
        raise ValueError(f"feature dimensions differ across splits: { {k: v.shape for k, v in xs.items()} }")
    ytr = _labels(train_y, len(xs["train_x"]), "train_y")
    yva = _labels(val_y, len(xs["val_x"]), "val_y")
    yte = _labels(test_y, len(xs["test_x"]), "test_y")
    if len(np.unique(ytr)) < 2:
        raise ValueError("training split has fewer than two classes; a classifier cannot be fitted")
    if len(yva) == 0 or len(yte) == 0:
        raise ValueError("val and test splits must be non-empty")
    grid = sorted({float(c) for c in Cs})
    if not grid or any(c <= 0 for c in grid):
        raise ValueError(f"Cs must be positive, got {list(Cs)}")
    if n_classes is None:
        n_classes = (
            len(class_names) if class_names is not None else int(max(ytr.max(), yva.max(), yte.max())) + 1
        )
    if max(ytr.max(), yva.max(), yte.max()) >= n_classes:
        raise ValueError(f"labels exceed n_classes={n_classes}")

    scaler = StandardScaler().fit(xs["train_x"])
    tr, va, te = (scaler.transform(xs[k]) for k in ("train_x", "val_x", "test_x"))

    val_scores: list[dict[str, Any]] = []
    best: tuple[float, LogisticRegression] | None = None
    best_score = -np.inf
    for c in grid:
        model = LogisticRegression(
            C=c, solver="lbfgs", max_iter=max_iter, class_weight=None, random_state=seed
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(tr, ytr)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        pred = model.predict(va)
        bacc = balanced_accuracy(yva, pred)
        val_scores.append(
            {
                "C": c,
                "balanced_accuracy": bacc,
                "accuracy": float(accuracy_score(yva, pred)),
                "converged": converged,
            }
        )
        if bacc > best_score:  # strict: on ties the earlier, smaller C stays
            best_score, best = bacc, (c, model)
    assert best is not None
    chosen_c, chosen = best
    test = classification_metrics(
        yte, _full_proba(chosen, te, n_classes), class_names, scores_are="probabilities"
    )
    return {
        "C": chosen_c,
        "val_balanced_accuracy": best_score,
        "val_scores": val_scores,
        "test": test,
        "n_train": len(ytr),
        "n_val": len(yva),
        "n_test": len(yte),
        "n_features": int(dims.pop()),
    }
