"""Mixture-of-Experts feed-forward and the MoE cross-attention block (HiCur-NPC Stage III fusion).

Different cases need different fusion: a scan whose report is missing leans on the other
images, one with a rich report on the text. A mixture of experts gives the fusion block several
feed-forward networks and a router that sends every token to ``k`` of them, so capacity grows
with the number of experts while the compute per token stays that of ``k`` of them.

Routing, in the order it happens (Switch Transformer / GShard conventions):

1. padded tokens (``valid`` False) are removed first: never routed, never counted, output zero;
2. the router (a bias-free linear layer, evaluated in float32 for stable softmax under bf16
   autocast) gives probabilities over the ``E`` experts; each token keeps its ``k`` most
   likely experts, and their ``k`` probabilities are renormalised to sum to 1 (the gates);
3. each expert takes at most ``capacity = ceil(capacity_factor * T * k / E)`` slots, ``T`` the
   number of valid tokens. Slots are served first choices first (all tokens' first choices,
   in token order, then all second choices, ...), so a token loses its second expert before
   any token loses its first. A slot over capacity is dropped: it contributes zero, the
   remaining gates are *not* renormalised, and the residual path around the layer carries the
   token on unchanged. ``capacity_factor >= E / k`` (or ``math.inf``) never drops;
4. each expert runs once on its gathered tokens; the gated outputs are scatter-added back.

Both layers return ``(output, aux)`` with ``aux = {"balance_loss", "load", "dropped"}``: the
:func:`medalign.losses.moe_balance_loss` to add to the task loss (1 at perfect balance), the
fraction of routed slots each expert was *assigned* (before capacity, so it shows the router's
preference; sums to 1; detached) and the fraction of slots dropped for capacity (detached).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medalign.losses import moe_balance_loss

__all__ = ["DenseFeedForward", "MoECrossAttention", "MoEFeedForward"]


class _Expert(nn.Sequential):
    """One feed-forward network ``Linear -> GELU -> Dropout -> Linear -> Dropout``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )


def _check_tokens(x: Tensor, valid: Tensor | None) -> Tensor:
    """The [B, L] bool mask of real tokens (all True when ``valid`` is None)."""
    if x.ndim != 3:
        raise ValueError(f"x must be [B, L, D], got {tuple(x.shape)}")
    if valid is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if valid.shape != x.shape[:2]:
        raise ValueError(f"valid must be [B, L] = {tuple(x.shape[:2])}, got {tuple(valid.shape)}")
    return valid.bool()


class MoEFeedForward(nn.Module):
    """Top-k routed mixture of ``num_experts`` feed-forward networks (see the module docstring).

    ``forward(x [B, L, D], valid [B, L] bool | None) -> (y [B, L, D], aux)``; ``y`` has ``x``'s
    dtype and is zero at padded positions and for dropped slots. Add ``y`` to a residual.
    Each expert has ``hidden_dim`` hidden units, so a token's active parameters are those of
    ``k`` experts: compare with ``DenseFeedForward(dim, k * hidden_dim)``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 4,
        k: int = 2,
        capacity_factor: float = 1.25,
        dropout: float = 0.0,
        eval_capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        if capacity_factor <= 0 or (eval_capacity_factor is not None and eval_capacity_factor <= 0):
            raise ValueError(f"capacity factors must be > 0, got {capacity_factor} and {eval_capacity_factor}")
        self.num_experts, self.k = num_experts, k
        # training routes with capacity_factor, eval with eval_capacity_factor (None: the same);
        # chosen by ``self.training`` at each call, so nothing is rewritten when the mode changes
        self.train_capacity_factor = float(capacity_factor)
        self.eval_capacity_factor = float(capacity_factor if eval_capacity_factor is None else eval_capacity_factor)
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(_Expert(dim, hidden_dim, dropout) for _ in range(num_experts))

    @property
    def capacity_factor(self) -> float:
        """The capacity factor of the current mode (training or eval)."""
        return self.train_capacity_factor if self.training else self.eval_capacity_factor

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, capacity_factor={self.train_capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}"
        )

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for ``num_tokens`` valid tokens; never more than the tokens themselves."""
        if num_tokens == 0 or math.isinf(self.capacity_factor):  # inf * 0 would be NaN
            return num_tokens
        slots = self.capacity_factor * num_tokens * self.k / self.num_experts
        return num_tokens if slots >= num_tokens else math.ceil(slots)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        mask = _check_tokens(x, valid)
        b, length, dim = x.shape
        flat = x.reshape(b * length, dim)
        token_ids = mask.reshape(-1).nonzero(as_tuple=True)[0]  # positions of the valid tokens
        tokens = flat[token_ids]  # [T, D]
        num_tokens, num_experts, k = tokens.shape[0], self.num_experts, self.k

        with torch.autocast(x.device.type, enabled=False):
            probs = torch.softmax(self.router(tokens.float()), dim=-1)  # [T, E]
        top_probs, top_experts = probs.topk(k, dim=-1)  # [T, k], largest first
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True)

        # Slot s = r * T + t is the r-th choice of token t: first choices come first in every queue.
        slot_expert = top_experts.T.reshape(-1)  # [k T]
        slot_gate = gates.T.reshape(-1)
        slot_token = torch.arange(num_tokens, device=x.device).repeat(k)
        queue = F.one_hot(slot_expert, num_experts).cumsum(dim=0)  # running count per expert
        position = queue.gather(1, slot_expert[:, None]).squeeze(1) - 1  # place in its expert's queue
        kept = (position < self.capacity(num_tokens)).nonzero(as_tuple=True)[0]

        # Group the kept slots by expert: one gather in, one loop over experts, one scatter-add out.
        order = kept[torch.argsort(slot_expert[kept], stable=True)]
        sizes = torch.bincount(slot_expert[order], minlength=num_experts).tolist()
        inputs = tokens[slot_token[order]].split(sizes)
        outputs = [expert(chunk) for expert, chunk in zip(self.experts, inputs, strict=True)]
        routed = torch.cat(outputs) * slot_gate[order, None].to(outputs[0].dtype)
        mixed = flat.new_zeros(num_tokens, dim).index_add_(0, slot_token[order], routed.to(flat.dtype))
        y = flat.new_zeros(b * length, dim).index_copy_(0, token_ids, mixed).reshape(b, length, dim)

        total_slots = max(num_tokens * k, 1)
        aux = {
            "balance_loss": moe_balance_loss(probs, top_experts, num_experts),
            "load": torch.bincount(slot_expert, minlength=num_experts).float().div(total_slots),
            "dropped": torch.tensor(
                1.0 - order.numel() / total_slots if num_tokens else 0.0, device=x.device
            ),
        }
        return y, aux


class DenseFeedForward(nn.Module):
    """A plain feed-forward layer with MoEFeedForward's call, for ablations and benchmarks.

    ``DenseFeedForward(dim, k * hidden_dim)`` has the active parameters of a token in
    ``MoEFeedForward(dim, hidden_dim, k=k)`` (router aside). Padded positions output zero, as in
    the MoE; ``aux`` has a zero ``balance_loss``, ``load = [1.0]`` and ``dropped = 0``.
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = _Expert(dim, hidden_dim, dropout)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        mask = _check_tokens(x, valid)
        y = self.net(x).to(x.dtype)
        if valid is not None:
            y = y * mask[..., None].to(y.dtype)
        zero = x.new_zeros((), dtype=torch.float32)
        return y, {"balance_loss": zero, "load": torch.ones(1, device=x.device), "dropped": zero.detach()}


class MoECrossAttention(nn.Module):
    """Pre-norm cross-attention block with a Mixture-of-Experts feed-forward (HiCur-NPC Stage III).

    ``x = q + CrossAttn(LN(q), LN(context))`` then ``x = x + MoEFeedForward(LN(x))``.

    In the fusion model the queries are one modality's tokens and ``context`` is the
    concatenation of the text tokens and the other modalities' tokens, with ``context_valid``
    False for padding *and* for every token of a missing modality: a case without a report
    simply has its text positions masked, and a query whose whole context is missing gets a
    zero attention update (no NaN) and passes through on its residual. ``query_valid`` False
    marks padded queries: they are not routed to experts, get no attention update either, and
    so come out equal to their input.

    ``forward(queries [B, Lq, D], context [B, Lc, D], context_valid [B, Lc] | None,
    query_valid [B, Lq] | None) -> (x [B, Lq, D], aux)`` with the MoE's ``aux``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        num_experts: int = 4,
        k: int = 2,
        capacity_factor: float = 1.25,
        hidden_ratio: float = 4.0,
        dropout: float = 0.0,
        eval_capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ffn = MoEFeedForward(
            dim, int(dim * hidden_ratio), num_experts, k, capacity_factor, dropout, eval_capacity_factor
        )

    def _attend(self, queries: Tensor, context: Tensor, context_valid: Tensor) -> Tensor:
        b, lq, dim = queries.shape
        heads = self.num_heads
        q = self.to_q(queries).reshape(b, lq, heads, dim // heads).transpose(1, 2)
        kv = self.to_kv(context).reshape(b, context.shape[1], 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        # A case with no valid context attends to everything (finite), and its update is zeroed below;
        # an all-False mask row is NaN on some backends.
        has_context = context_valid.any(dim=1)
        attend = (context_valid | ~has_context[:, None])[:, None, None, :]  # [B, 1, 1, Lc]
        out = F.scaled_dot_product_attention(
            q, kv[0], kv[1], attn_mask=attend, dropout_p=self.dropout if self.training else 0.0
        )
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, lq, dim)))
        return out * has_context[:, None, None].to(out.dtype)

    def forward(
        self,
        queries: Tensor,
        context: Tensor,
        context_valid: Tensor | None = None,
        query_valid: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if context.ndim != 3 or context.shape[0] != queries.shape[0] or context.shape[2] != queries.shape[2]:
            raise ValueError(f"context must be [B, Lc, D] to match queries {tuple(queries.shape)}")
        context_mask = _check_tokens(context, context_valid)
        query_mask = _check_tokens(queries, query_valid)
        update = self._attend(self.norm_query(queries), self.norm_context(context), context_mask)
        x = queries + update * query_mask[..., None].to(update.dtype)
        ff, aux = self.ffn(self.norm_ff(x), query_mask)
        return x + ff, aux
