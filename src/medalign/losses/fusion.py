"""Losses of the fuse task: MMD, (dis)similarity, orthogonality, disentangled contrastive, MoE balance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# =========================================================================== Fusion
# Losses of the fuse task (MM-EndoCL's align-disentangle-fuse, HiCur-NPC's MoE fusion). A feature
# argument may be [B, D] vectors, [B, L, D] tokens (mean-pooled over L) or channels-first maps
# [B, C, *spatial] with two or more spatial dims (global-average-pooled): every loss here compares
# one vector per case. All are computed in float32, so bf16 features from autocast are safe.


MMD_BANDWIDTHS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _case_vectors(x: Tensor) -> Tensor:
    """One float32 vector per case: [B, D] as is, tokens [B, L, D] averaged, maps [B, C, ...] GAP."""
    if x.ndim == 2:
        out = x
    elif x.ndim == 3:
        out = x.mean(dim=1)
    elif x.ndim >= 4:
        out = x.mean(dim=tuple(range(2, x.ndim)))
    else:
        raise ValueError(f"features must be [B, D], [B, L, D] or [B, C, *spatial], got {tuple(x.shape)}")
    return out.float()


def _pair(a: Tensor, b: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Pooled case vectors of two modalities of the same cases; shapes must agree after pooling."""
    va, vb = _case_vectors(a), _case_vectors(b)
    if va.shape != vb.shape:
        raise ValueError(f"{what}: features pool to {tuple(va.shape)} and {tuple(vb.shape)}, expected equal")
    return va, vb


def mmd_loss(x: Tensor, y: Tensor, bandwidths: Sequence[float] = MMD_BANDWIDTHS) -> Tensor:
    """Squared maximum mean discrepancy between samples ``x`` [N, D] and ``y`` [M, D] (MK-MMD).

    Pulls the feature *distributions* of two modalities together without pairing cases, which
    is what lets MM-EndoCL align e.g. white-light and narrow-band features of different images.
    The kernel is a sum of Gaussians, ``k(a, b) = sum_s exp(-|a - b|^2 / (s * m))`` over
    ``s`` in ``bandwidths``, where ``m`` is the median squared distance between distinct points of
    the pooled sample (detached, ``torch.median``'s lower middle): the loss is then unchanged
    when all features are rescaled, and no bandwidth has to be tuned per layer (DAN's
    multi-kernel choice). Biased V-statistic ``mean K_xx + mean K_yy - 2 mean K_xy``: never
    negative, exactly zero when ``x`` and ``y`` are the same set, at most ``2 * len(bandwidths)``.
    Float32 whatever the input dtype (squared distances lose everything in bf16).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [N, D] and [M, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError("mmd_loss needs at least one sample on each side")
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"bandwidths must be positive multiples of the median, got {tuple(bandwidths)}")
    n = x.shape[0]
    z = torch.cat([x, y]).float()
    sq = (z * z).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)
    with torch.no_grad():
        upper = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
        median = d2[upper[0], upper[1]].median().clamp_min(torch.finfo(torch.float32).tiny)
    kernel = torch.stack([torch.exp(-d2 / (s * median)) for s in bandwidths]).sum(dim=0)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2.0 * kernel[:n, n:].mean()


def multiscale_mmd_loss(
    features_a: Sequence[Tensor], features_b: Sequence[Tensor], bandwidths: Sequence[float] = MMD_BANDWIDTHS
) -> Tensor:
    """Mean of :func:`mmd_loss` over layers: MM-EndoCL's multi-scale distribution alignment.

    ``features_a[l]`` and ``features_b[l]`` are layer ``l`` of the two modalities' encoders;
    maps [B, C, H, W] are global-average-pooled and tokens [B, L, D] mean-pooled to one vector
    per image first (see the section note), so early layers align their channel statistics
    and late layers their semantics. The batch sizes of the two sides may differ. Averaged,
    not summed, so the weight of the term does not depend on how many layers are tapped.
    """
    if len(features_a) != len(features_b) or not features_a:
        raise ValueError(
            f"need the same, non-zero number of layers per modality, got {len(features_a)} and {len(features_b)}"
        )
    terms = [
        mmd_loss(_case_vectors(a), _case_vectors(b), bandwidths)
        for a, b in zip(features_a, features_b, strict=True)
    ]
    return torch.stack(terms).mean()


def similarity_loss(shared_a: Tensor, shared_b: Tensor) -> Tensor:
    """Mean ``1 - cos(a_i, b_i)``: the shared features of two modalities of case ``i`` should agree.

    Paired (row ``i`` of both is the same case), unlike :func:`mmd_loss`. Cosine rather than a
    distance so that the specific features, not the norm, carry what differs between modalities.
    """
    a, b = _pair(shared_a, shared_b, "similarity_loss")
    return (1.0 - F.cosine_similarity(a, b, dim=1)).mean()


def dissimilarity_loss(specific_a: Tensor, specific_b: Tensor, margin: float = 0.0) -> Tensor:
    """Mean ``relu(cos(a_i, b_i) - margin)``: two modalities' specific features must differ.

    If the specific branches of both modalities encoded the same thing, that thing would be
    shared information hiding outside the shared space. With ``margin = 0`` the pair is free
    anywhere at or beyond orthogonal; only agreement is penalised, so the branches are not
    pushed to be each other's negation.
    """
    a, b = _pair(specific_a, specific_b, "dissimilarity_loss")
    return F.relu(F.cosine_similarity(a, b, dim=1) - margin).mean()


def orthogonality_loss(shared: Tensor, specific: Tensor) -> Tensor:
    """Soft subspace orthogonality (DSN, Bousmalis et al. 2016): ``||S^T P||_F^2 / B^2``.

    ``S`` [B, D] and ``P`` [B, D'] are the shared and specific features of one modality, each
    centred over the batch and then L2-normalised per row. ``S^T P / B`` is then the batch
    cross-correlation between every shared and every specific feature dimension, so the loss is
    zero exactly when the two representations are linearly uncorrelated: the specific branch
    holds nothing the shared branch already explains. Normalisation: dividing by ``B^2``
    (the mean over the batch, squared) bounds the loss to [0, 1] — 1 when both are rank one
    and aligned — independent of batch size and feature width, so its weight transfers between
    recipes (DSN's mean over the D x D' entries grows with B^2). Uncorrelated random features
    still score about ``1 / B``: the sampling noise of a correlation estimated from B cases.
    Needs B >= 2 (a single centred case is zero).
    """
    s, p = _case_vectors(shared), _case_vectors(specific)
    if s.shape[0] != p.shape[0]:
        raise ValueError(
            f"shared and specific must hold the same cases, got {s.shape[0]} and {p.shape[0]} rows"
        )
    if s.shape[0] < 2:
        raise ValueError("orthogonality_loss needs at least two cases to centre over the batch")
    s = F.normalize(s - s.mean(dim=0, keepdim=True), dim=1)
    p = F.normalize(p - p.mean(dim=0, keepdim=True), dim=1)
    return (s.T @ p).pow(2).sum() / s.shape[0] ** 2


def disentangled_contrastive_loss(
    shared: Sequence[Tensor], specific: Sequence[Tensor], temperature: float = 0.1
) -> Tensor:
    """InfoNCE over modalities whose negatives include every modality-specific feature.

    ``shared[m]`` and ``specific[m]`` are the [B, D] shared and specific features of modality
    ``m`` (at least two modalities; all L2-normalised here). For the anchor ``shared[m][i]``:

    * positives: ``shared[n][i]`` for every other modality ``n != m`` (the same case);
    * negatives: ``shared[n][j]`` for every modality ``n`` (``m`` included) and case ``j != i``,
      and every ``specific[n][j]`` (all modalities, all cases, the anchor's own included).

    Each (anchor, positive) pair is one InfoNCE term
    ``-log(exp(a.p / t) / (exp(a.p / t) + sum_neg exp(a.n / t)))``; the other positives of the
    same anchor are left out of its denominator (neither positive nor negative there), and the
    loss is the mean over all anchors and their positives. Cases align across modalities in
    the shared space, while the specific features are pushed out of it: a shared embedding
    close to any specific one pays like a wrong case.
    """
    if len(shared) < 2 or len(shared) != len(specific):
        raise ValueError(
            f"need shared and specific features of the same >= 2 modalities, got {len(shared)} and {len(specific)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shapes = {tuple(t.shape) for t in (*shared, *specific)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"every shared and specific feature must be [B, D] of one shape, got {sorted(shapes)}"
        )
    num_modalities, b = len(shared), shared[0].shape[0]
    anchors = F.normalize(torch.cat([t.float() for t in shared]), dim=1)  # row m * B + i
    others = F.normalize(torch.cat([t.float() for t in specific]), dim=1)
    logits = anchors @ torch.cat([anchors, others]).T / temperature  # [M B, 2 M B]

    index = torch.arange(num_modalities * b, device=logits.device)
    case, modality = index % b, index // b
    same_case = case[:, None] == case[None, :]
    positive = same_case & (modality[:, None] != modality[None, :])  # [M B, M B], shared columns
    negative = torch.cat([~same_case, torch.ones_like(same_case)], dim=1)  # + every specific column
    negatives = torch.logsumexp(logits.masked_fill(~negative, float("-inf")), dim=1)  # [M B]
    rows, cols = positive.nonzero(as_tuple=True)
    # -log(e^p / (e^p + e^N)) = log(1 + e^(N - p)) = softplus(N - p)
    return F.softplus(negatives[rows] - logits[rows, cols]).mean()


def moe_balance_loss(
    router_probs: Tensor, expert_index: Tensor, num_experts: int, valid: Tensor | None = None
) -> Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e * P_e`` (Fedus et al., 2021).

    ``router_probs`` [T, E] is the router softmax per token, ``expert_index`` [T, k] the experts
    each token was assigned to (top-k, before any capacity limit: the loss judges the router,
    not the capacity), ``valid`` [T] bool marks real tokens (padding is left out of both
    terms). Leading dimensions beyond T are flattened. ``f_e`` is the fraction of the valid
    token-slot assignments that went to expert ``e`` and ``P_e`` the mean router probability of
    ``e`` over valid tokens. Both are 1/E under perfect balance, giving a loss of exactly 1;
    if everything goes to one expert with certainty it is E. ``f`` is a count, so the gradient
    flows through ``P`` only and lowers the probability of the over-used experts. Zero (with
    the graph kept) when no token is valid.
    """
    probs = router_probs.reshape(-1, router_probs.shape[-1]).float()
    index = expert_index.reshape(-1, expert_index.shape[-1])
    if index.shape[0] != probs.shape[0]:
        raise ValueError(f"expert_index has {index.shape[0]} tokens, router_probs {probs.shape[0]}")
    if probs.shape[1] != num_experts:
        raise ValueError(f"router_probs has {probs.shape[1]} experts, num_experts is {num_experts}")
    if valid is not None:
        keep = valid.reshape(-1).bool()
        if keep.shape[0] != probs.shape[0]:
            raise ValueError(f"valid has {keep.shape[0]} entries for {probs.shape[0]} tokens")
        probs, index = probs[keep], index[keep]
    if probs.shape[0] == 0:
        return router_probs.sum() * 0.0
    counts = torch.bincount(index.reshape(-1), minlength=num_experts).to(probs.dtype)
    fraction = counts / index.numel()
    return num_experts * (fraction * probs.mean(dim=0)).sum()
