"""Linear probe: separable blobs, deterministic C selection, train-only refit, unseen classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from medalign.evaluation.probe import linear_probe


def blobs(
    rng: np.random.Generator, n: int, centers: np.ndarray, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(len(centers)), n)
    return centers[y] + sigma * rng.standard_normal((len(y), centers.shape[1])), y


def splits(sigma: float, seed: int = 0, n: int = 30) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = 4.0 * np.eye(3, 6)
    out: list[np.ndarray] = []
    for _ in range(3):
        out.extend(blobs(rng, n, centers, sigma))
    return out


def test_separable_blobs_perfect_and_ties_pick_smallest_c() -> None:
    res = linear_probe(*splits(sigma=0.3), Cs=[10.0, 0.01, 1.0], class_names=["a", "b", "c"])
    assert [s["C"] for s in res["val_scores"]] == [0.01, 1.0, 10.0]  # scanned ascending
    assert all(s["balanced_accuracy"] == 1.0 for s in res["val_scores"])
    assert res["C"] == 0.01  # all tie -> smallest
    test = res["test"]
    assert test["accuracy"] == 1.0
    assert test["auc"] == 1.0
    assert test["class_names"] == ["a", "b", "c"]
    assert (res["n_train"], res["n_val"], res["n_test"], res["n_features"]) == (90, 90, 90, 6)


def test_selection_is_argmax_then_smallest_on_overlapping_blobs() -> None:
    res = linear_probe(*splits(sigma=2.5, seed=1))
    scores = [s["balanced_accuracy"] for s in res["val_scores"]]
    best = max(scores)
    assert res["val_balanced_accuracy"] == best
    assert res["C"] == min(s["C"] for s in res["val_scores"] if s["balanced_accuracy"] == best)
    assert [s["C"] for s in res["val_scores"]] == pytest.approx(np.logspace(-3, 3, 7).tolist())
    assert res == linear_probe(*splits(sigma=2.5, seed=1))  # deterministic


def test_test_model_is_fitted_on_train_only() -> None:
    trx, try_, vax, vay, tex, tey = splits(sigma=2.5, seed=2)
    res = linear_probe(trx, try_, vax, vay, tex, tey)
    scaler = StandardScaler().fit(trx)
    model = LogisticRegression(C=res["C"], max_iter=2000).fit(scaler.transform(trx), try_)
    pred = model.predict(scaler.transform(tex))
    assert res["test"]["accuracy"] == pytest.approx(float((pred == tey).mean()))


def test_class_unseen_in_training_still_gets_a_row() -> None:
    trx, try_, vax, vay, tex, tey = splits(sigma=0.3)
    keep = try_ < 2
    res = linear_probe(torch.tensor(trx[keep]), torch.tensor(try_[keep]), vax, vay, tex, tey, Cs=[1.0])
    cm = np.array(res["test"]["confusion_matrix"])
    assert cm.shape == (3, 3)
    assert cm[:, 2].sum() == 0  # never predicted: no training examples
    assert cm[2].sum() == 30


def test_rejects_single_class_training() -> None:
    trx, try_, vax, vay, tex, tey = splits(sigma=0.3)
    with pytest.raises(ValueError, match="fewer than two classes"):
        linear_probe(trx, np.zeros_like(try_), vax, vay, tex, tey)
