"""Top-label ECE and the reliability curve against hand-computed bins."""

from __future__ import annotations

import numpy as np
import pytest

from medalign.evaluation.metrics import expected_calibration_error, reliability_curve

PROBS = np.array([[0.9, 0.1], [0.78, 0.22], [0.3, 0.7], [0.45, 0.55]])
LABELS = np.array([0, 1, 1, 0])  # correct, wrong, correct, wrong; confidences 0.9, 0.78, 0.7, 0.55


def test_ece_two_bins_puts_everything_in_the_upper_bin():
    # bin (0.5, 1]: accuracy 2/4, mean confidence (0.9 + 0.78 + 0.7 + 0.55) / 4 = 0.7325
    assert expected_calibration_error(PROBS, LABELS, n_bins=2) == pytest.approx(0.7325 - 0.5)


def test_reliability_curve_five_bins_by_hand():
    curve = reliability_curve(PROBS, LABELS, n_bins=5)
    assert curve["count"] == [0, 0, 1, 2, 1]
    assert curve["accuracy"][:2] == [None, None]
    assert curve["accuracy"][2:] == pytest.approx([0.0, 0.5, 1.0])
    assert curve["confidence"][2:] == pytest.approx([0.55, 0.74, 0.9])
    # (1 * |0 - 0.55| + 2 * |0.5 - 0.74| + 1 * |1 - 0.9|) / 4
    assert curve["ece"] == pytest.approx((0.55 + 0.48 + 0.1) / 4)
    assert curve["edges"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_binary_probability_vector_and_perfect_calibration():
    # [N] = probability of class 1; confidence 1.0 everywhere and all correct: ECE 0
    assert expected_calibration_error(np.array([1.0, 0.0, 1.0]), np.array([1, 0, 1])) == 0.0
    # a confidence exactly on a bin edge belongs to the lower bin ((m-1)/M, m/M]
    curve = reliability_curve(np.array([[0.5, 0.5]]), np.array([0]), n_bins=2)
    assert curve["count"] == [1, 0]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="apply softmax"):
        expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="filter missing labels"):
        expected_calibration_error(PROBS, np.array([0, 1, -1, 0]))
    with pytest.raises(ValueError, match="labels has 2 entries"):
        expected_calibration_error(PROBS, np.array([0, 1]))
