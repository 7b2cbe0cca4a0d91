"""Fusion losses (MMD, similarity, orthogonality, disentangled contrastive, MoE balance) by hand.

Expected values are closed-form expressions over small tensors with known distances and
cosines, never the vectorised formula run again.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medalign.losses import (
    disentangled_contrastive_loss,
    dissimilarity_loss,
    mmd_loss,
    moe_balance_loss,
    multiscale_mmd_loss,
    orthogonality_loss,
    similarity_loss,
)

E = math.exp
# Zero-mean, mutually orthogonal batch vectors (columns of a 4x4 Hadamard matrix).
H1 = torch.tensor([1.0, 1.0, -1.0, -1.0])
H2 = torch.tensor([1.0, -1.0, 1.0, -1.0])
H3 = torch.tensor([1.0, -1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- mmd
def test_mmd_two_points_by_hand() -> None:
    # One pooled pair at squared distance 1, so the median is 1: K_xx = K_yy = sum_s 1, K_xy = sum_s e^(-1/s).
    x, y = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    scales = (0.25, 0.5, 1.0, 2.0, 4.0)
    assert mmd_loss(x, y).item() == pytest.approx(10 - 2 * sum(E(-1 / s) for s in scales), rel=1e-6)
    assert mmd_loss(x, y, bandwidths=(1.0,)).item() == pytest.approx(2 - 2 / math.e, rel=1e-6)


def test_mmd_lower_median_by_hand() -> None:
    # Squared distances of {0, 1, 3, 4}: 1, 9, 16, 4, 9, 1 -> sorted 1 1 4 9 9 16, lower middle m = 4.
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0], [4.0]])
    k_xx = (2 + 2 * E(-1 / 4)) / 4  # = k_yy
    k_xy = (E(-9 / 4) + E(-16 / 4) + E(-4 / 4) + E(-9 / 4)) / 4
    assert mmd_loss(x, y, bandwidths=(1.0,)).item() == pytest.approx(2 * k_xx - 2 * k_xy, rel=1e-6)


def test_mmd_properties() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    same = x[torch.randperm(16)]
    assert mmd_loss(x, same).item() == pytest.approx(0.0, abs=1e-6)
    shifted = torch.randn(12, 8) + 1.5
    near = torch.randn(12, 8)
    # the biased estimator is positive even for two samples of one distribution, but far smaller
    assert mmd_loss(x, shifted).item() > 3 * mmd_loss(x, near).item() > 0
    # scale-free: the bandwidths follow the median distance
    assert mmd_loss(7 * x, 7 * shifted).item() == pytest.approx(mmd_loss(x, shifted).item(), rel=1e-4)
    # bf16 in, float32 out, and a gradient even where two points coincide
    xb = x.bfloat16().requires_grad_()
    loss = mmd_loss(xb, torch.cat([xb[:4].detach(), shifted.bfloat16()]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert xb.grad is not None and torch.isfinite(xb.grad).all()
    with pytest.raises(ValueError):
        mmd_loss(x, torch.randn(3, 4))


def test_multiscale_mmd_pools_maps_and_tokens() -> None:
    # Layer 1: constant maps whose GAP is x = [0], y = [1] (the two-point case); layer 2: token
    # sets that mean-pool to the same vectors on both sides (zero).
    maps_a, maps_b = torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3)
    tokens_a = torch.tensor([[[1.0, 0.0], [3.0, 2.0]], [[0.0, 0.0], [0.0, 2.0]]])  # means (2,1), (0,1)
    tokens_b = torch.tensor([[[0.0, 1.0]], [[2.0, 1.0]]])
    got = multiscale_mmd_loss([maps_a, tokens_a], [maps_b, tokens_b], bandwidths=(1.0,))
    assert got.item() == pytest.approx((2 - 2 / math.e) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="layers"):
        multiscale_mmd_loss([maps_a], [])


# --------------------------------------------------------------------------- similarity / dissimilarity
def test_similarity_loss_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0]])  # cosines 0 and 1
    assert similarity_loss(a, b).item() == pytest.approx(0.5)
    # tokens are mean-pooled first
    assert similarity_loss(a[:, None].expand(2, 3, 2), b).item() == pytest.approx(0.5)


def test_dissimilarity_loss_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # cosines 1, 0, -1
    assert dissimilarity_loss(a, b).item() == pytest.approx(1 / 3)
    assert dissimilarity_loss(a, b, margin=0.5).item() == pytest.approx(0.5 / 3)
    assert dissimilarity_loss(a, b, margin=-0.5).item() == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- orthogonality
def test_orthogonality_loss_by_hand() -> None:
    # Rows already zero-mean over the batch and of equal norm, so centring/normalising only rescale.
    shared = torch.stack([H1, H2], dim=1)  # rows (+-1, +-1) / sqrt 2
    specific = torch.stack([H1, H3], dim=1)
    # S^T P = 1/2 [[H1.H1, H1.H3], [H2.H1, H2.H3]] = [[2, 0], [0, 0]] -> 4 / B^2 = 0.25
    assert orthogonality_loss(shared, specific).item() == pytest.approx(0.25)
    # rank one and aligned: the maximum, 1
    rank_one = torch.stack([H1, torch.zeros(4)], dim=1)
    assert orthogonality_loss(rank_one, rank_one).item() == pytest.approx(1.0)


def test_orthogonality_loss_zero_when_uncorrelated() -> None:
    shared = torch.stack([H1, 2 * H1], dim=1)
    specific = torch.stack([H2, H3, H2 - H3], dim=1)  # other width, columns orthogonal to shared's
    assert orthogonality_loss(shared, specific).item() == pytest.approx(0.0, abs=1e-7)
    # centring over the batch: a constant offset per feature changes nothing
    offset = shared + torch.tensor([5.0, -3.0])
    assert orthogonality_loss(offset, specific).item() == pytest.approx(0.0, abs=1e-6)
    assert orthogonality_loss(shared, shared).item() > 0.9
    with pytest.raises(ValueError, match="two cases"):
        orthogonality_loss(shared[:1], specific[:1])


# --------------------------------------------------------------------------- disentangled contrastive
E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
SHARED = [torch.stack([E1, E2]), torch.stack([E1, E2])]
SPECIFIC = [torch.stack([E2, -E1]), torch.stack([-E2, E1])]


def test_disentangled_contrastive_by_hand() -> None:
    # Every anchor (e.g. shared[0][0] = e1) has cosine 1 with its positive; its negatives are the
    # other case in both modalities (cosines 0, 0) and the four specific vectors (0, -1, 0, 1).
    # Each of the 4 anchor terms: -log(e^(1/t) / (e^(1/t) + 4 + e^(1/t) + e^(-1/t))).
    for t in (1.0, 0.5):
        p = E(1 / t)
        expected = math.log(1 + (4 + p + 1 / p) / p)
        got = disentangled_contrastive_loss(SHARED, SPECIFIC, temperature=t)
        assert got.item() == pytest.approx(expected, rel=1e-6)
    # embeddings are normalised inside
    scaled = disentangled_contrastive_loss([3 * s for s in SHARED], [0.5 * s for s in SPECIFIC], 1.0)
    assert scaled.item() == pytest.approx(math.log(1 + (4 + math.e + 1 / math.e) / math.e), rel=1e-6)


def test_disentangled_contrastive_three_modalities_matches_loop() -> None:
    torch.manual_seed(1)
    b, t = 3, 0.2
    shared = [torch.randn(b, 4) for _ in range(3)]
    specific = [torch.randn(b, 4) for _ in range(3)]
    sh = [F.normalize(s, dim=1) for s in shared]
    sp = [F.normalize(s, dim=1) for s in specific]
    terms = []
    for m in range(3):
        for i in range(b):
            a = sh[m][i]
            negs = [sh[n][j] for n in range(3) for j in range(b) if j != i]
            negs += [sp[n][j] for n in range(3) for j in range(b)]
            neg_sum = sum(math.exp(float(a @ v) / t) for v in negs)
            for n in range(3):
                if n != m:
                    pos = math.exp(float(a @ sh[n][i]) / t)
                    terms.append(-math.log(pos / (pos + neg_sum)))
    assert len(terms) == 3 * b * 2
    got = disentangled_contrastive_loss(shared, specific, temperature=t)
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_disentangled_contrastive_lower_when_shared_agree() -> None:
    torch.manual_seed(2)
    base = torch.randn(8, 16)
    specific = [torch.randn(8, 16), torch.randn(8, 16)]
    agree = disentangled_contrastive_loss([base, base + 0.05 * torch.randn(8, 16)], specific)
    disagree = disentangled_contrastive_loss([base, torch.randn(8, 16)], specific)
    assert agree.item() < disagree.item()
    with pytest.raises(ValueError, match=">= 2 modalities"):
        disentangled_contrastive_loss([base], [specific[0]])


# --------------------------------------------------------------------------- moe balance
def test_moe_balance_loss_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    index = torch.tensor([[0], [0], [0], [1]])
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert moe_balance_loss(probs, index, 2).item() == pytest.approx(1.15)
    # the last token is padding: f = (1, 0), P = (2.3 / 3, .) -> 2 * 2.3 / 3
    valid = torch.tensor([True, True, True, False])
    assert moe_balance_loss(probs, index, 2, valid).item() == pytest.approx(2 * 2.3 / 3)
    # top-2 of 3 experts, leading dims flattened: slots 0,1 | 1,2 -> f = (1/4, 2/4, 1/4)
    probs3 = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])
    index3 = torch.tensor([[[0, 1], [1, 2]]])
    expected = 3 * (0.25 * 0.3 + 0.5 * 0.45 + 0.25 * 0.25)
    assert moe_balance_loss(probs3, index3, 3).item() == pytest.approx(expected)


def test_moe_balance_loss_uniform_is_one_and_gradient_through_probs() -> None:
    uniform = torch.full((4, 4), 0.25)
    index = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert moe_balance_loss(uniform, index, 4).item() == pytest.approx(1.0)
    # collapsed routing scores E
    assert (
        moe_balance_loss(torch.tensor([[1.0, 0.0]] * 3), torch.zeros(3, 1, dtype=torch.long), 2).item() == 2
    )
    logits = torch.tensor([[2.0, 0.0, -1.0], [1.0, 0.5, 0.0]], requires_grad=True)
    probs = torch.softmax(logits, dim=1)
    probs.retain_grad()
    loss = moe_balance_loss(probs, probs.topk(1, dim=1).indices, 3)
    loss.backward()
    # f = (1, 0, 0): dL/dP[t, e] = E f_e / T; the counts carry no gradient
    assert torch.allclose(probs.grad, torch.tensor([[1.5, 0.0, 0.0]] * 2))
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    empty = moe_balance_loss(probs, probs.topk(1, dim=1).indices, 3, torch.zeros(2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
