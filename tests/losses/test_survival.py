"""Survival losses (Cox partial likelihood, logistic-hazard discrete time) against hand-computed values.

Every expected value is written out from the definition over a handful of cases, not produced by
running a vectorised formula again.
"""

from __future__ import annotations

import math

import pytest
import torch

from medalign.losses import cox_partial_likelihood_loss, discrete_time_survival_loss, survival_intervals

E, L = math.exp, math.log


def test_cox_breslow_risk_sets_include_ties_and_later_cases():
    risk = torch.tensor([0.1, 0.4, -0.3, 0.2])
    time = torch.tensor([1.0, 2.0, 2.0, 4.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0])
    # events at t=1 (risk set: all), t=2 (cases 1, 2 (censored at the same time), 3), t=4 (case 3 only)
    first = 0.1 - L(E(0.1) + E(0.4) + E(-0.3) + E(0.2))
    second = 0.4 - L(E(0.4) + E(-0.3) + E(0.2))
    third = 0.2 - L(E(0.2))  # = 0: alone in its risk set
    expected = -(first + second + third) / 3
    assert cox_partial_likelihood_loss(risk, time, event).item() == pytest.approx(expected, rel=1e-6)


def test_cox_tied_events_share_one_risk_set():
    risk = torch.tensor([0.5, -0.5, 1.0])
    time = torch.tensor([3.0, 3.0, 7.0])
    event = torch.tensor([1.0, 1.0, 1.0])
    denominator = L(E(0.5) + E(-0.5) + E(1.0))  # Breslow: both tied events see all three cases
    expected = -((0.5 - denominator) + (-0.5 - denominator) + 0.0) / 3
    assert cox_partial_likelihood_loss(risk, time, event).item() == pytest.approx(expected, rel=1e-6)


def test_cox_gradient_two_cases():
    # loss = -(a - log(e^a + e^b)) = log(1 + e^(b - a)); d/da = -sigmoid(b - a), d/db = sigmoid(b - a)
    risk = torch.tensor([0.3, 1.1], requires_grad=True)
    loss = cox_partial_likelihood_loss(risk, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))
    loss.backward()
    s = 1 / (1 + E(-(1.1 - 0.3)))
    assert loss.item() == pytest.approx(L(1 + E(0.8)), rel=1e-6)
    assert risk.grad.tolist() == pytest.approx([-s, s], rel=1e-5)


def test_cox_without_events_is_zero_with_a_zero_gradient_path():
    risk = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    loss = cox_partial_likelihood_loss(risk, torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert risk.grad.tolist() == [0.0, 0.0, 0.0]


def test_cox_rejects_bad_inputs():
    with pytest.raises(ValueError, match="event must be 0"):
        cox_partial_likelihood_loss(torch.zeros(2), torch.ones(2), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="need 2 entries"):
        cox_partial_likelihood_loss(torch.zeros(2), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="time must be finite"):
        cox_partial_likelihood_loss(torch.zeros(2), torch.tensor([-1.0, 1.0]), torch.ones(2))


def test_intervals_are_half_open_and_past_the_horizon_is_k():
    edges = [0.0, 10.0, 20.0, 30.0]
    times = torch.tensor([0.0, 9.99, 10.0, 25.0, 30.0, 99.0])
    assert survival_intervals(times, edges).tolist() == [0, 0, 1, 2, 3, 3]
    with pytest.raises(ValueError, match="before the first bin edge"):
        survival_intervals(torch.tensor([1.0]), [5.0, 10.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        survival_intervals(torch.tensor([1.0]), [0.0, 10.0, 10.0])


def test_discrete_time_likelihood_by_hand():
    edges = [0.0, 10.0, 20.0, 30.0]
    # hazards h = sigmoid(logit) = 0.5, 0.75, 0.25 for every case
    logits = torch.tensor([[0.0, L(3.0), -L(3.0)]]).repeat(5, 1)
    time = torch.tensor([15.0, 25.0, 35.0, 5.0, 10.0])
    event = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    expected = [
        -L(0.5) - L(0.75),  # event in interval 1: survived 0, died in 1
        -L(0.5) - L(0.25),  # censored in interval 2: survived 0 and 1
        -L(0.5) - L(0.25) - L(0.75),  # event past the last edge: survived all three
        0.0,  # censored in interval 0: no information
        -L(0.5) - L(0.75),  # event exactly at edge 10 belongs to interval 1
    ]
    loss = discrete_time_survival_loss(logits, time, event, edges)
    assert loss.item() == pytest.approx(sum(expected) / 5, rel=1e-6)


def test_discrete_time_gradient_sign_and_shape_checks():
    logits = torch.zeros(1, 2, requires_grad=True)
    loss = discrete_time_survival_loss(logits, torch.tensor([15.0]), torch.tensor([1.0]), [0.0, 10.0, 20.0])
    loss.backward()
    # -log(1 - s(l0)) - log s(l1): d/dl0 = s(l0) = 0.5, d/dl1 = s(l1) - 1 = -0.5
    assert logits.grad[0].tolist() == pytest.approx([0.5, -0.5])
    with pytest.raises(ValueError, match="3 bin edges give 2 intervals"):
        discrete_time_survival_loss(torch.zeros(1, 3), torch.ones(1), torch.ones(1), [0.0, 1.0, 2.0])
