"""C-index, Kaplan-Meier, IPCW time-dependent AUC and the log-rank test against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from medalign.evaluation.metrics import concordance_index, kaplan_meier, logrank_test, time_dependent_auc


def test_c_index_counts_pairs_by_hand():
    # comparable: (0,1) (0,2) (0,3) from the event at t=1, (2,3) from t=3; case 1 is censored
    result = concordance_index([1, 2, 3, 4], [1, 0, 1, 1], [4, 1, 2, 3])
    assert result == {"c_index": 0.75, "concordant": 3, "discordant": 1, "tied_risk": 0, "comparable": 4}
    # a tied risk in the discordant pair counts one half
    assert concordance_index([1, 2, 3, 4], [1, 0, 1, 1], [4, 1, 3, 3])["c_index"] == pytest.approx(3.5 / 4)


def test_c_index_tied_times():
    # event and censoring at t=2: comparable (event first) and discordant; (0, 2) concordant
    result = concordance_index([2, 2, 3], [1, 0, 1], [1, 2, 0])
    assert (result["comparable"], result["concordant"], result["c_index"]) == (2, 1, 0.5)
    # two events at the same time are not comparable, a censored earlier time neither
    assert concordance_index([2, 2], [1, 1], [0, 1])["c_index"] is None
    assert concordance_index([1, 2], [0, 1], [5, 0])["comparable"] == 0


def test_kaplan_meier_by_hand():
    km = kaplan_meier([1, 2, 2, 3, 4], [1, 1, 0, 1, 0])
    assert km["time"] == [1, 2, 3, 4]
    assert km["at_risk"] == [5, 4, 2, 1]
    assert km["events"] == [1, 1, 1, 0]
    assert km["censored"] == [0, 1, 0, 1]
    assert km["survival"] == pytest.approx([4 / 5, 4 / 5 * 3 / 4, 4 / 5 * 3 / 4 * 1 / 2, 0.3])
    assert km["median"] == 3


def test_time_dependent_auc_without_censoring_is_the_case_control_auc():
    result = time_dependent_auc([1, 2, 3, 4], [1, 1, 1, 1], [1, 3, 2, 4], [2.5, 1.5, 4.0])
    # t=2.5: cases risks {1, 3} vs controls {2, 4}: only 3 > 2 of four pairs; t=1.5: 1 below 3, 2, 4
    assert result["auc"][:2] == pytest.approx([0.25, 0.0])
    assert result["auc"][2] is None  # no control after the last time
    assert result["mean"] == pytest.approx(0.125)


def test_time_dependent_auc_ipcw_by_hand():
    # censoring KM: G = 1 until the censoring at t=2 (4 at risk) -> 3/4, unchanged by the events
    # at t=3, t=4. At t=3.5 cases 0 (w = 1/G(1) = 1) and 2 (w = 1/G(3) = 4/3); controls risks 2, 4.
    # case 0 (risk 5) beats both, case 2 (risk 3) beats one: (1*2 + 4/3*1) / ((1 + 4/3) * 2) = 5/7
    time, event, risk = [1, 2, 3, 4, 5], [1, 0, 1, 1, 0], [5, 1, 3, 2, 4]
    result = time_dependent_auc(time, event, risk, [3.5])
    assert result["auc"][0] == pytest.approx(5 / 7)
    # the censoring distribution can come from other (training) data: no censoring there, G = 1
    plain = time_dependent_auc(time, event, risk, [3.5], train_time=[1, 2, 3], train_event=[1, 1, 1])
    assert plain["auc"][0] == pytest.approx(3 / 4)


# Freireich et al. (1963) 6-MP remission data (Gehan 1965), the textbook log-rank example
# (Kleinbaum & Klein, "Survival Analysis", ch. 2; R: survdiff(Surv(time, cens) ~ treat, gehan)):
# observed 9 vs expected 19.25 for 6-MP, 21 vs 10.75 for placebo; chi-square 16.79 on 1 df.
MP_TIME = [6, 6, 6, 6, 7, 9, 10, 10, 11, 13, 16, 17, 19, 20, 22, 23, 25, 32, 32, 34, 35]
MP_EVENT = [1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
PLACEBO_TIME = [1, 1, 2, 2, 3, 4, 4, 5, 5, 8, 8, 8, 8, 11, 11, 12, 12, 15, 17, 22, 23]


def test_logrank_textbook_remission_data():
    time = MP_TIME + PLACEBO_TIME
    event = MP_EVENT + [1] * len(PLACEBO_TIME)
    groups = ["6-MP"] * len(MP_TIME) + ["placebo"] * len(PLACEBO_TIME)
    result = logrank_test(time, event, groups)
    assert result["groups"] == ["6-MP", "placebo"]
    assert result["observed"] == [9, 21]
    assert result["expected"] == pytest.approx([19.25, 10.75], abs=0.01)
    assert result["chi2"] == pytest.approx(16.79, abs=0.01)
    assert result["df"] == 1
    assert result["p_value"] == pytest.approx(4.17e-5, rel=0.02)


def test_logrank_two_cases_by_hand_and_three_groups():
    # one event at t=1 among 2 at risk: O - E = 1 - 1/2 for group a, V = 1 * 1/1 * 1/2 * 1/2
    result = logrank_test([1, 2], [1, 1], ["a", "b"])
    assert result["chi2"] == pytest.approx(0.25 / 0.25)
    # identical groups: no evidence against equal survival
    same = logrank_test([1, 2, 3, 1, 2, 3, 1, 2, 3], [1] * 9, ["x"] * 3 + ["y"] * 3 + ["z"] * 3)
    assert same["df"] == 2 and same["chi2"] == pytest.approx(0.0, abs=1e-12) and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="at least two groups"):
        logrank_test([1, 2], [1, 1], ["a", "a"])


def test_survival_inputs_are_checked():
    with pytest.raises(ValueError, match="event must be 0"):
        concordance_index([1, 2], [1, 2], [0, 1])
    with pytest.raises(ValueError, match="differ in length"):
        kaplan_meier([1, 2], [1])
    with pytest.raises(ValueError, match="time must be finite"):
        concordance_index(np.array([np.nan, 1.0]), [1, 1], [0, 1])
