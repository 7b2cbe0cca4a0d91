"""MoE feed-forward and cross-attention: routing, capacity, padding, gradients, masking.

Routing is checked with hand-set weights: the router is the identity (logits = the token), and
"indicator" experts ignore their input and output their own one-hot vector, so a token's output
reads off which experts served it and with which gates.
"""

from __future__ import annotations

import math

import pytest
import torch

from medalign.losses import moe_balance_loss
from medalign.models.moe import DenseFeedForward, MoECrossAttention, MoEFeedForward


def indicator_moe(num_experts: int, k: int, capacity_factor: float = math.inf) -> MoEFeedForward:
    """dim = num_experts; router logits = x; expert e outputs one_hot(e) whatever its input."""
    moe = MoEFeedForward(num_experts, 3, num_experts=num_experts, k=k, capacity_factor=capacity_factor)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(num_experts))
        for e, expert in enumerate(moe.experts):
            for p in expert.parameters():
                p.zero_()
            expert[3].bias[e] = 1.0  # Linear(hidden, dim): GELU(0) = 0, so only the bias is left
    return moe


def gate_pair(a: float, b: float) -> tuple[float, float]:
    """Renormalised top-2 gates of logits a, b: softmax over the pair."""
    return 1 / (1 + math.exp(b - a)), 1 / (1 + math.exp(a - b))


def test_top_k_routing_picks_largest_logits_with_renormalised_gates() -> None:
    moe = indicator_moe(4, k=2)
    x = torch.tensor([[[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, -1.0, 4.5]]])
    y, aux = moe(x)
    g0, g2 = gate_pair(3.0, 2.0)
    g1, g3 = gate_pair(5.0, 4.5)
    expected = torch.tensor([[[g0, 0.0, g2, 0.0], [0.0, g1, 0.0, g3]]])
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.allclose(aux["load"], torch.full((4,), 0.25))
    assert aux["dropped"].item() == 0.0


def test_capacity_drops_later_tokens_k1() -> None:
    # 4 tokens all prefer expert 0; capacity = ceil(1.0 * 4 * 1 / 2) = 2: tokens 2, 3 are dropped.
    moe = indicator_moe(2, k=1, capacity_factor=1.0)
    x = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.5, 0.0]]])
    y, aux = moe(x)
    assert torch.allclose(y[0], torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert aux["dropped"].item() == pytest.approx(0.5)
    assert torch.allclose(aux["load"], torch.tensor([1.0, 0.0]))  # assignments, before capacity


def test_capacity_serves_first_choices_before_second() -> None:
    # capacity = ceil(0.5 * 2 * 2 / 2) = 1. Token 0 wants 0 then 1, token 1 wants 1 then 0. First
    # choices are queued first, so each token keeps its first expert and loses its second.
    moe = indicator_moe(2, k=2, capacity_factor=0.5)
    y, aux = moe(torch.tensor([[[2.0, 0.0], [0.0, 2.0]]]))
    first, _ = gate_pair(2.0, 0.0)
    assert torch.allclose(y[0], torch.tensor([[first, 0.0], [0.0, first]]), atol=1e-6)
    assert aux["dropped"].item() == pytest.approx(0.5)


def test_padded_tokens_are_not_routed_or_counted() -> None:
    moe = indicator_moe(4, k=1)
    x = torch.tensor(
        [[[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]], [[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]]]
    )
    valid = torch.tensor([[True, False], [True, False]])
    y, aux = moe(x, valid)
    assert torch.all(y[:, 1] == 0)
    assert torch.allclose(y[:, 0], torch.eye(4)[:2])
    assert torch.allclose(aux["load"], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # expert 3 never counted
    probs = torch.softmax(x[:, 0], dim=-1)
    expected = moe_balance_loss(probs, torch.tensor([[0], [1]]), 4)
    assert aux["balance_loss"].item() == pytest.approx(expected.item())


def test_output_matches_per_token_computation() -> None:
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, num_experts=4, k=2, capacity_factor=2.0)  # E / k: nothing dropped
    x = torch.randn(2, 5, 8)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    y, aux = moe(x, valid)
    assert aux["dropped"].item() == 0.0
    for b in range(2):
        for t in range(5):
            if not valid[b, t]:
                assert torch.all(y[b, t] == 0)
                continue
            token = x[b, t]
            probs = torch.softmax(moe.router(token), dim=-1)
            top, experts = probs.topk(2)
            gates = top / top.sum()
            ref = sum(g * moe.experts[int(e)](token) for g, e in zip(gates, experts, strict=True))
            assert torch.allclose(y[b, t], ref, atol=1e-5)


def test_gradient_reaches_router_and_experts() -> None:
    torch.manual_seed(1)
    moe = MoEFeedForward(8, 16, num_experts=4, k=2)
    x = torch.randn(3, 6, 8, requires_grad=True)
    y, aux = moe(x)
    (y.pow(2).mean() + 0.01 * aux["balance_loss"]).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    used = aux["load"] > 0
    for e, expert in enumerate(moe.experts):
        if used[e]:
            assert expert[0].weight.grad is not None and expert[0].weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dense_feed_forward_matches_call_and_masks_padding() -> None:
    dense = DenseFeedForward(8, 32)
    x = torch.randn(2, 3, 8)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    y, aux = dense(x, valid)
    assert y.shape == x.shape and torch.all(y[~valid] == 0)
    assert torch.allclose(y[valid], dense.net(x[valid]))
    assert set(aux) == {"balance_loss", "load", "dropped"} and aux["balance_loss"].item() == 0.0


# --------------------------------------------------------------------------- cross-attention block
def test_cross_attention_ignores_padded_context() -> None:
    torch.manual_seed(2)
    block = MoECrossAttention(16, num_heads=4, num_experts=4, k=2).eval()
    queries, context = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    context_valid = torch.tensor([[True, True, True, False, False], [True, False, True, False, True]])
    out, aux = block(queries, context, context_valid)
    changed = context.clone()
    changed[~context_valid] = 100 * torch.randn(int((~context_valid).sum()), 16)
    out2, _ = block(queries, changed, context_valid)
    assert torch.allclose(out, out2, atol=1e-6)
    assert set(aux) == {"balance_loss", "load", "dropped"}
    # a valid context token does change it (a constant shift would vanish in the LayerNorm)
    changed[0, 0] = torch.randn(16)
    assert not torch.allclose(out, block(queries, changed, context_valid)[0])


def test_cross_attention_all_padded_context_and_padded_queries() -> None:
    torch.manual_seed(3)
    block = MoECrossAttention(16, num_heads=2, capacity_factor=math.inf)  # routing independent of batch
    queries = torch.randn(2, 4, 16, requires_grad=True)
    context = torch.randn(2, 3, 16)
    context_valid = torch.tensor([[False, False, False], [True, True, False]])
    query_valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out, aux = block(queries, context, context_valid, query_valid)
    assert torch.isfinite(out).all()
    # case 0 has no context: no attention update, only the feed-forward on its residual
    ff, _ = block.ffn(block.norm_ff(queries[:1]))
    assert torch.allclose(out[0], (queries[:1] + ff)[0], atol=1e-6)
    # padded queries pass through unchanged
    assert torch.equal(out[1, 2:], queries[1, 2:])
    (out.sum() + aux["balance_loss"]).backward()
    assert torch.isfinite(queries.grad).all()
    assert block.ffn.router.weight.grad is not None


def test_cross_attention_bf16_autocast() -> None:
    block = MoECrossAttention(16, num_heads=4, num_experts=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = block(torch.randn(2, 3, 16), torch.randn(2, 4, 16))
    assert out.shape == (2, 3, 16) and torch.isfinite(out).all()
    assert aux["balance_loss"].dtype == torch.float32


def test_unlimited_capacity_with_no_valid_tokens_routes_nothing() -> None:
    layer = MoEFeedForward(8, 16, num_experts=4, k=2, capacity_factor=math.inf)
    assert layer.capacity(0) == 0 and layer.capacity(10) == 10
    x = torch.randn(2, 3, 8)
    y, aux = layer(x, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(y)) and float(aux["dropped"]) == 0.0


def test_the_capacity_factor_follows_the_mode_and_nothing_is_rewritten_on_train_or_eval() -> None:
    moe = MoEFeedForward(8, 16, num_experts=4, k=2, capacity_factor=1.0, eval_capacity_factor=2.0)
    assert moe.capacity_factor == 1.0
    moe.eval()
    assert moe.capacity_factor == 2.0 and moe.train_capacity_factor == 1.0
    assert MoEFeedForward(8, 16, capacity_factor=1.5).eval().capacity_factor == 1.5  # None: the same
