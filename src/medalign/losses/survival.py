"""Survival losses of the clinical task: Cox partial likelihood and the discrete-time hazard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------- survival
# Prognosis heads (Stage III). Both losses are computed in float32 (bf16 risks from autocast are
# safe) and average over cases, so the loss scale does not depend on the batch size.


def _survival_inputs(time: Tensor, event: Tensor, rows: int, what: str) -> tuple[Tensor, Tensor]:
    time, event = time.reshape(-1).float(), event.reshape(-1).float()
    if time.shape[0] != rows or event.shape[0] != rows:
        raise ValueError(
            f"{what}: time {tuple(time.shape)} and event {tuple(event.shape)} need {rows} entries"
        )
    if bool(((event != 0) & (event != 1)).any()):
        raise ValueError(f"{what}: event must be 0 (censored) or 1 (event)")
    if bool((time < 0).any()) or not bool(torch.isfinite(time).all()):
        raise ValueError(f"{what}: time must be finite and >= 0")
    return time, event


def cox_partial_likelihood_loss(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative log Cox partial likelihood with Breslow ties, averaged over the events.

    ``-(1/n_events) * sum_{i: event_i} [risk_i - log sum_{j: time_j >= time_i} exp(risk_j)]``:
    the risk set of an event holds every case still under observation at its time, tied
    events and tied censorings included (Breslow). ``risk`` [B] (or [B, 1]) is the log hazard
    ratio (higher = earlier event). The risk sets are computed within the batch, which is what
    a mini-batch Cox loss can do (DeepSurv-style). A batch without any event has no partial
    likelihood: the loss is 0, returned as ``risk.sum() * 0`` so the graph (and every parameter's
    zero gradient) is kept and distributed/accumulated training sees the same graph each step.
    """
    risk = risk.reshape(-1).float()
    time, event = _survival_inputs(time.to(risk.device), event.to(risk.device), risk.shape[0], "cox loss")
    events = event.bool()
    if not bool(events.any()):
        return risk.sum() * 0.0
    at_risk = time[None, :] >= time[:, None]  # row i: the risk set of case i
    log_denominator = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    return -(risk - log_denominator)[events].mean()


def survival_intervals(time: Tensor, bin_edges: Sequence[float] | Tensor) -> Tensor:
    """Interval index of each time: ``j`` for ``edges[j] <= t < edges[j+1]``; ``K`` past the last edge.

    ``K = len(edges) - 1`` intervals. A time before the first edge is an error (edges should
    start at 0).
    """
    edges = torch.as_tensor(bin_edges, dtype=torch.float32, device=time.device).reshape(-1)
    if edges.numel() < 2 or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(f"bin_edges must be at least two strictly increasing values, got {edges.tolist()}")
    time = time.reshape(-1).float()
    if bool((time < edges[0]).any()):
        raise ValueError(
            f"times before the first bin edge {float(edges[0])}: {time[time < edges[0]].tolist()}"
        )
    return torch.searchsorted(edges[1:].contiguous(), time.contiguous(), right=True)


def discrete_time_survival_loss(
    hazard_logits: Tensor, time: Tensor, event: Tensor, bin_edges: Sequence[float] | Tensor
) -> Tensor:
    """Logistic-hazard negative log-likelihood (Nnet-survival, Gensheimer & Narasimhan 2019), per case.

    ``hazard_logits`` [B, K] are logits of the conditional probability ``h_k`` of the event in
    interval ``k`` given survival to its start, for the ``K = len(bin_edges) - 1`` intervals
    ``[edges[k], edges[k+1])``. A case in interval ``j`` contributes

    * event: ``-sum_{k<j} log(1 - h_k) - log h_j`` (survived the earlier intervals, died in ``j``);
    * censored: ``-sum_{k<j} log(1 - h_k)`` (survived every interval it was seen through to the end;
      the interval of censoring carries no information either way);
    * a time at or past the last edge: ``-sum_{k<K} log(1 - h_k)`` (survived every interval; an
      event out there lies beyond the model's horizon and counts as censored at it).

    Averaged over the cases. Every case contributes, so there is no empty-batch special case.
    """
    logits = hazard_logits.float()
    if logits.ndim != 2:
        raise ValueError(f"hazard_logits must be [B, K], got {tuple(logits.shape)}")
    b, k = logits.shape
    if len(bin_edges) - 1 != k:
        raise ValueError(
            f"{len(bin_edges)} bin edges give {len(bin_edges) - 1} intervals, hazard_logits has {k}"
        )
    time, event = _survival_inputs(time.to(logits.device), event.to(logits.device), b, "discrete-time loss")
    index = survival_intervals(time, bin_edges)  # [B], K = beyond the horizon
    columns = torch.arange(k, device=logits.device)[None, :]
    survived = columns < index[:, None]  # intervals lived through
    died = (columns == index[:, None]) & event.bool()[:, None]  # index < K only
    nll = -(F.logsigmoid(-logits) * survived).sum(1) - (F.logsigmoid(logits) * died).sum(1)
    return nll.mean()
