"""Survival metrics: C-index, Kaplan-Meier, time-dependent AUC (IPCW), the log-rank test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medalign.evaluation.metrics.arrays import ArrayLike, to_numpy

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
