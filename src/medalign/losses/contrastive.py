"""Contrastive image-text losses: CLIP, SigLIP, DCL, soft targets and local token alignment.

Conventions and the distributed recipe are in :mod:`medalign.losses.distributed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medalign.losses.distributed import _gather_no_grad, _rank_and_world, gather_with_grad

LOSS_KINDS = ("clip", "siglip", "dcl")
SOFT_TARGET_MODES = ("none", "labels", "text")


def _gather_pair(image_embeds: Tensor, text_embeds: Tensor, gather: bool) -> tuple[Tensor, Tensor, int]:
    """All images, all texts and the global index of this rank's first row."""
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds and text_embeds must both be [B, D] with the same shape, "
            f"got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if not gather:
        return image_embeds, text_embeds, 0
    rank, _ = _rank_and_world()
    return gather_with_grad(image_embeds), gather_with_grad(text_embeds), rank * image_embeds.shape[0]


def _positive_mask(rows: int, cols: int, offset: int, device: torch.device) -> Tensor:
    """Boolean [rows, cols] that is True where local row i meets its own pair at column offset + i."""
    if offset + rows > cols:
        raise ValueError(f"rows {offset}..{offset + rows - 1} do not fit in {cols} columns")
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    idx = torch.arange(rows, device=device)
    mask[idx, idx + offset] = True
    return mask


# --------------------------------------------------------------------------- global losses
def clip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    *,
    targets: Tensor | None = None,
    gather: bool = True,
) -> Tensor:
    """Symmetric InfoNCE (CLIP): mean of the image->text and text->image cross-entropies.

    Embeddings must already be L2-normalised (the caller's job; see the module docstring).
    Under ``gather`` the local rows are scored against the gathered columns with labels
    offset by ``rank * B_local``, so the mean over ranks is the global-batch loss.

    ``targets`` is an optional soft target matrix ``[B_local, B_global]`` (each row sums to 1;
    ``B_global = B_local`` without gather) saying how much of each image's mass belongs to
    each text. It serves both directions: text->image needs *columns* of the global matrix,
    so the targets are gathered across ranks (rows of other ranks), the columns of this
    rank's texts are taken and transposed, and each resulting row is renormalised to sum to
    1. Symmetric targets (all built by this module from labels) are thus used unchanged.
    Hard targets are the identity; passing it gives the same loss as ``targets=None``.
    """
    image_all, text_all, offset = _gather_pair(image_embeds, text_embeds, gather)
    b = image_embeds.shape[0]
    logits_i2t = logit_scale * image_embeds @ text_all.T
    logits_t2i = logit_scale * text_embeds @ image_all.T
    if targets is None:
        labels = torch.arange(b, device=image_embeds.device) + offset
        return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))

    if targets.shape != logits_i2t.shape:
        raise ValueError(
            f"targets must be [B_local, B_global] = {tuple(logits_i2t.shape)}, got {tuple(targets.shape)}"
        )
    targets = targets.to(logits_i2t.dtype)
    targets_all = gather_with_grad(targets) if gather else targets  # [B_global, B_global]
    targets_t2i = targets_all[:, offset : offset + b].T
    targets_t2i = targets_t2i / targets_t2i.sum(dim=1, keepdim=True).clamp_min(
        torch.finfo(targets.dtype).tiny
    )
    return 0.5 * (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets_t2i))


def siglip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    gather: bool = True,
) -> Tensor:
    """Pairwise sigmoid loss (SigLIP): every image-text pair is an independent binary problem.

    ``-1/B_local * sum_i sum_j log sigmoid(z_ij * (t * x_i.y_j + b))`` with ``z_ij = +1`` for
    the matched pair and ``-1`` otherwise; normalised by the (local) batch size as in the
    SigLIP paper, not by the number of pairs, so the loss grows with the number of negatives.
    The sum over all pairs already covers both directions, so there is no symmetrisation.

    Under ``gather`` this rank's images meet all gathered texts. The SigLIP paper passes
    text chunks around a ring instead to save memory; the set of pairs, and hence the mean
    over ranks, is identical, and one all-gather is simpler and fine at our batch sizes.
    """
    _, text_all, offset = _gather_pair(image_embeds, text_embeds, gather)
    b = image_embeds.shape[0]
    logits = logit_scale * image_embeds @ text_all.T + logit_bias
    positive = _positive_mask(b, text_all.shape[0], offset, logits.device)
    signs = positive.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / b


def dcl_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    *,
    gather: bool = True,
) -> Tensor:
    """Decoupled contrastive loss (Yeh et al., 2022), symmetric over both directions.

    InfoNCE with the positive removed from the denominator:
    ``-t x_i.y_i + log sum_{j != i} exp(t x_i.y_j)``. With the positive in the denominator,
    an easy positive shrinks the gradient on the negatives too (the negative-positive
    coupling), which hurts most at small batch sizes. Negatives are cross-modal only (the
    CLIP form), and the two directions are averaged like :func:`clip_loss`.
    Needs at least two pairs in the (gathered) batch.
    """
    image_all, text_all, offset = _gather_pair(image_embeds, text_embeds, gather)
    b, b_all = image_embeds.shape[0], text_all.shape[0]
    if b_all < 2:
        raise ValueError("dcl_loss needs at least two pairs: a single pair has no negatives")
    positive = _positive_mask(b, b_all, offset, image_embeds.device)

    def one_direction(logits: Tensor) -> Tensor:
        pos = logits[positive]  # row-major, so pos[i] belongs to row i
        neg = torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=1)
        return (neg - pos).mean()

    logits_i2t = logit_scale * image_embeds @ text_all.T
    logits_t2i = logit_scale * text_embeds @ image_all.T
    return 0.5 * (one_direction(logits_i2t) + one_direction(logits_t2i))


# --------------------------------------------------------------------------- soft targets
def soft_targets_from_labels(labels: Tensor, labels_all: Tensor | None = None, *, offset: int = 0) -> Tensor:
    """Targets ``[B, B_all]`` whose rows are uniform over the columns with the same label.

    Two reports of the same finding are then not pushed apart as false negatives.
    A label ``< 0`` means unknown: such a row (and column) matches only its own pair, never
    another unknown. ``labels_all`` are the labels of all columns (the gathered batch) and
    ``offset`` the global index of ``labels[0]`` among them; both default to this batch.
    The matrix is symmetric over the global batch, so :func:`clip_loss` uses its
    transpose for text->image unchanged.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [B], got shape {tuple(labels.shape)}")
    if labels_all is None:
        labels_all = labels
    same = (labels[:, None] == labels_all[None, :]) & (labels[:, None] >= 0)
    match = same | _positive_mask(labels.shape[0], labels_all.shape[0], offset, labels.device)
    match_f = match.to(torch.get_default_dtype())
    return match_f / match_f.sum(dim=1, keepdim=True)


def soft_targets_from_similarity(
    text_embeds: Tensor,
    text_embeds_all: Tensor | None = None,
    temperature: float = 0.1,
    mix: float = 0.5,
    *,
    offset: int = 0,
) -> Tensor:
    """Targets ``(1 - mix) * I + mix * softmax(text_i.text_j / temperature)`` row-wise, detached.

    Near-duplicate reports share target mass without any labels. Texts with identical
    embeddings get identical similarity, hence equal mass from the softmax part; the
    identity part still keeps ``1 - mix`` on a row's own pair so the true pair stays the
    most likely one (use label targets where duplicates should be fully interchangeable).
    Embeddings are expected L2-normalised (the similarity is a cosine). Detached because
    the targets are a teacher signal: letting gradients through would reward the text
    tower for collapsing texts together. ``text_embeds_all``/``offset`` as in
    :func:`soft_targets_from_labels`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    with torch.no_grad():
        text = text_embeds.detach()
        text_all = text if text_embeds_all is None else text_embeds_all.detach()
        soft = torch.softmax(text @ text_all.T / temperature, dim=1)
        eye = _positive_mask(text.shape[0], text_all.shape[0], offset, text.device).to(soft.dtype)
        return (1.0 - mix) * eye + mix * soft


# --------------------------------------------------------------------------- local alignment
# GLoRIA (Huang et al., 2021) temp1, temp2, temp3: word->region attention, word pooling, and the
# scale of the pooled scores in the contrastive loss.
GLORIA_TEMPERATURE_ATTENTION = 4.0
GLORIA_TEMPERATURE_AGGREGATION = 5.0
GLORIA_TEMPERATURE_SCORES = 10.0


def local_alignment_loss(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    logit_scale_local: Tensor | float | None = None,
    *,
    temperature_attention: float = GLORIA_TEMPERATURE_ATTENTION,
    temperature_aggregation: float = GLORIA_TEMPERATURE_AGGREGATION,
) -> Tensor:
    """GLoRIA-style word-region alignment, turned into a symmetric InfoNCE over pair scores.

    Findings live in small regions that a pooled embedding averages away; scoring each word
    against the regions it attends to lets "left basal opacity" align with that patch.
    For every (image i, text j):

    1. word w of text j attends over the regions r of image i:
       ``a = softmax_r(temperature_attention * cos(w, r))``;
    2. its region context is ``c_w = sum_r a_r r`` and its score ``cos(w, c_w)``;
    3. the valid words are pooled with a smooth maximum
       ``s_ij = log(sum_w exp(gamma * cos(w, c_w))) / gamma`` (``gamma`` =
       ``temperature_aggregation``; padded words are excluded, so they change nothing);
    4. ``logit_scale_local * s`` is scored with symmetric InfoNCE, positives on the diagonal;
       the default (None) is GLoRIA's: ``temp3 * gamma = 10 * 5 = 50``.

    Tokens are L2-normalised here (unlike the global losses) because the attention
    temperature is meant for cosines, and token features are not normalised by models.
    GLoRIA omits the ``1/gamma`` in step 3; with it, ``s`` stays in cosine units, and
    GLoRIA's ``temp3 = 10`` corresponds to ``logit_scale_local = 10 * gamma`` (GLoRIA's
    temperatures: ``temp1 = 4`` attention, ``temp2 = 5`` aggregation, ``temp3 = 10`` scores).

    Not gathered across ranks: the per-pair work is ``[B, B, L, N]`` and the tokens are large,
    so each rank contrasts its own batch (DDP averages the per-rank losses). The context
    norm uses the region Gram matrix, so ``[B, B, L, D]`` is never built; fine for B <= 64.
    Every text needs at least one valid word (an all-padding text has no score).
    """
    if image_tokens.ndim != 3 or text_tokens.ndim != 3:
        raise ValueError("image_tokens must be [B, N, D] and text_tokens [B, L, D]")
    b, length = text_tokens.shape[:2]
    if image_tokens.shape[0] != b or image_tokens.shape[2] != text_tokens.shape[2]:
        raise ValueError(
            f"batch and feature sizes differ: image_tokens {tuple(image_tokens.shape)}, "
            f"text_tokens {tuple(text_tokens.shape)}"
        )
    if text_mask.shape != (b, length):
        raise ValueError(f"text_mask must be [B, L] = {(b, length)}, got {tuple(text_mask.shape)}")
    mask = text_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every text needs at least one unmasked word")

    regions = F.normalize(image_tokens, dim=-1)  # [B, N, D]
    words = F.normalize(text_tokens, dim=-1)  # [B, L, D]
    # sim[i, j, l, n]: word l of text j against region n of image i.
    sim = torch.einsum("ind,jld->ijln", regions, words)
    attn = torch.softmax(temperature_attention * sim, dim=-1)
    # With c = sum_n a_n r_n and |w| = 1: w.c = sum_n a_n (w.r_n) and |c|^2 = a^T G a.
    word_dot_context = (attn * sim).sum(dim=-1)  # [B, B, L]
    gram = torch.einsum("ind,imd->inm", regions, regions)  # [B, N, N]
    context_sq = (torch.einsum("ijln,inm->ijlm", attn, gram) * attn).sum(dim=-1)
    word_cos = word_dot_context / context_sq.clamp_min(1e-12).sqrt()

    gamma = temperature_aggregation
    if logit_scale_local is None:
        logit_scale_local = GLORIA_TEMPERATURE_SCORES * gamma
    pooled = (gamma * word_cos).masked_fill(~mask[None, :, :], float("-inf"))
    scores = torch.logsumexp(pooled, dim=-1) / gamma  # [B_images, B_texts]
    logits = logit_scale_local * scores
    labels = torch.arange(b, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# --------------------------------------------------------------------------- module wrapper
class ContrastiveLoss(nn.Module):
    """One configurable criterion for the alignment task: a global loss, soft targets, a local term.

    Holds configuration only; the learnable ``logit_scale``/``logit_bias`` live in the model
    so that DDP and the optimizer see them with the other parameters.

    ``forward(outputs, labels)`` reads ``image_embeds``, ``text_embeds``, ``logit_scale``
    (``logit_bias`` for SigLIP; ``image_tokens``, ``text_tokens``, ``text_mask`` when
    ``local_weight > 0``) and returns ``{"loss": total, "loss_<kind>": ..., "loss_local": ...,
    "logit_scale": ...}``. Only ``loss`` carries the graph; the components are detached so
    that logging them never keeps a graph alive.
    """

    def __init__(
        self,
        kind: str = "clip",
        *,
        local_weight: float = 0.0,
        soft_targets: str = "none",
        soft_target_mix: float = 0.5,
        soft_target_temperature: float = 0.1,
        gather: bool = True,
        local_logit_scale: float | None = None,
        local_temperature_attention: float = GLORIA_TEMPERATURE_ATTENTION,
        local_temperature_aggregation: float = GLORIA_TEMPERATURE_AGGREGATION,
    ) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
        if soft_targets not in SOFT_TARGET_MODES:
            raise ValueError(f"unknown soft_targets {soft_targets!r}; choose one of {SOFT_TARGET_MODES}")
        if soft_targets != "none" and kind != "clip":
            raise ValueError(f"soft targets are defined for the softmax (clip) loss only, not {kind!r}")
        if local_weight < 0:
            raise ValueError(f"local_weight must be >= 0, got {local_weight}")
        self.kind = kind
        self.local_weight = float(local_weight)
        self.soft_targets = soft_targets
        self.soft_target_mix = soft_target_mix
        self.soft_target_temperature = soft_target_temperature
        self.gather = gather
        self.local_logit_scale = local_logit_scale
        self.local_temperature_attention = local_temperature_attention
        self.local_temperature_aggregation = local_temperature_aggregation

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, local_weight={self.local_weight}, soft_targets={self.soft_targets!r}"

    def _targets(self, text_embeds: Tensor, labels: Tensor | None) -> Tensor | None:
        """Soft targets over the columns clip_loss will see (the gathered batch when gathering)."""
        if self.soft_targets == "none":
            return None
        rank, _ = _rank_and_world()
        offset = rank * text_embeds.shape[0] if self.gather else 0
        if self.soft_targets == "labels":
            if labels is None:
                raise ValueError("soft_targets='labels' needs labels in forward(outputs, labels=...)")
            labels = labels.to(text_embeds.device).long()
            labels_all = _gather_no_grad(labels) if self.gather else labels
            return soft_targets_from_labels(labels, labels_all, offset=offset).to(text_embeds.dtype)
        text = text_embeds.detach()
        text_all = _gather_no_grad(text) if self.gather else text
        return soft_targets_from_similarity(
            text, text_all, self.soft_target_temperature, self.soft_target_mix, offset=offset
        )

    def forward(self, outputs: Mapping[str, Any], labels: Tensor | None = None) -> dict[str, Tensor]:
        image, text, scale = outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"]
        if self.kind == "clip":
            main = clip_loss(image, text, scale, targets=self._targets(text, labels), gather=self.gather)
        elif self.kind == "siglip":
            bias = outputs.get("logit_bias")
            if bias is None:
                raise ValueError("the siglip loss needs 'logit_bias' in the model outputs")
            main = siglip_loss(image, text, scale, bias, gather=self.gather)
        else:
            main = dcl_loss(image, text, scale, gather=self.gather)

        result: dict[str, Tensor] = {f"loss_{self.kind}": main.detach()}
        total = main
        if self.local_weight > 0:
            missing = [k for k in ("image_tokens", "text_tokens", "text_mask") if outputs.get(k) is None]
            if missing:
                raise ValueError(f"local_weight > 0 needs {missing} in the model outputs")
            local = local_alignment_loss(
                outputs["image_tokens"],
                outputs["text_tokens"],
                outputs["text_mask"],
                self.local_logit_scale,
                temperature_attention=self.local_temperature_attention,
                temperature_aggregation=self.local_temperature_aggregation,
            )
            result["loss_local"] = local.detach()
            total = total + self.local_weight * local
        if isinstance(scale, Tensor):
            result["logit_scale"] = scale.detach()
        result["loss"] = total
        return result
