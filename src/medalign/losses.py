"""Contrastive image-text losses, all in one place with the cross-rank gather they depend on.

Everything here is plain torch so that a loss can be checked by hand, reused by any task,
and imported without training dependencies (open_clip's layout).

Conventions shared by every loss
--------------------------------
* ``image_embeds`` and ``text_embeds`` are ``[B_local, D]`` and already L2-normalised by the
  model. The losses do not normalise again: the model owns that step so retrieval and the
  loss see the same vectors, and normalising twice would hide a model that forgot to.
  (``local_alignment_loss`` is the exception: token features are normalised inside it.)
* ``logit_scale`` is the *already exponentiated* temperature ``t`` (a tensor, so it can be a
  learnable ``exp(log_t)`` upstream); clamping it is the model's job.
* Row ``i`` of the image batch is paired with row ``i`` of the text batch.

Distributed training (world size ``W``, the same ``B_local`` on every rank)
---------------------------------------------------------------------------
With ``gather=True`` each rank gathers the embeddings of all ranks with
:func:`gather_with_grad` and scores only *its own* rows against all ``W * B_local``
columns (open_clip's ``local_loss``); the positive of local row ``i`` sits at column
``rank * B_local + i``. Every per-rank loss is a mean over its local rows, so the mean of
the per-rank losses equals, exactly, the single-process loss on the global batch.

Gradients: the backward of ``torch.distributed.nn.functional.all_gather`` *sums* into each
rank's input the gradients of every rank's loss, so the gradient a rank sees on its
embeddings is ``sum_k dL_k/dx_r = W * d(mean_k L_k)/dx_r``, i.e. ``W`` times the
single-process gradient. DDP then *averages* parameter gradients over the ranks, which
cancels that ``W``: the parameter update equals the single-process update on the global
batch. Therefore call ``loss.backward()`` on the per-rank loss as is; do not scale it by
``W`` or ``1/W``. Without DDP, all-reduce parameter gradients with a mean, not a sum.
All ranks must call the gathered losses together (they run collectives).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ContrastiveLoss",
    "clip_loss",
    "dcl_loss",
    "gather_with_grad",
    "local_alignment_loss",
    "siglip_loss",
    "soft_targets_from_labels",
    "soft_targets_from_similarity",
]

LOSS_KINDS = ("clip", "siglip", "dcl")
SOFT_TARGET_MODES = ("none", "labels", "text")


# --------------------------------------------------------------------------- distributed helpers
def _distributed() -> bool:
    """True only when there is more than one rank to talk to, so single-process runs never pay."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_and_world() -> tuple[int, int]:
    if not _distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` over ranks along dim 0, keeping the autograd graph to every rank's input.

    A plain ``dist.all_gather`` cuts the graph, so other ranks' rows would act as constants
    and the negatives would push only one way. The differentiable gather makes each rank's
    embeddings receive the gradients that all ranks' losses put on them (see the module
    docstring for the resulting factor ``W``, which DDP's averaging cancels).
    Identity when torch.distributed is not initialised or has a single rank.
    """
    if not _distributed():
        return x
    with warnings.catch_warnings():
        # Its suggested replacement lives in a private module; the public function is stable.
        warnings.filterwarnings(
            "ignore", message=r".*nn\.functional\.all_gather is deprecated", category=FutureWarning
        )
        parts = dist_nn.all_gather(x)
    return torch.cat(parts, dim=0)


def _gather_no_grad(x: Tensor) -> Tensor:
    """Gather tensors that only define targets (labels, detached texts): no graph is needed."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


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


# =========================================================================== Segmentation
# Dense losses for the segment task. Shapes: ``logits`` [N, C, H, W] (any number of spatial
# dims). C = 1 is binary: probabilities are ``sigmoid(logits)`` and ``target`` is a {0, 1} (or
# soft) mask of the same shape or without the channel axis. C > 1 is multi-class: probabilities
# are ``softmax(logits, dim=1)`` and ``target`` is an integer index map [N, H, W] / [N, 1, H, W]
# or an already one-hot/soft [N, C, H, W]; every class, background included, enters the Dice
# mean (background Dice keeps empty images from scoring 0 whatever is predicted).
# Nothing here thresholds: metrics in ``medalign.metrics`` do that, losses stay differentiable.

__all__ += [  # extends the contrastive list above without rewriting it
    "SEGMENTATION_LOSS_KINDS",
    "SegmentationLoss",
    "dice_bce_loss",
    "dice_ce_loss",
    "dice_loss",
    "focal_loss",
    "side_output_consistency_loss",
]

SEGMENTATION_LOSS_KINDS = ("dice_bce", "dice_ce", "focal_dice")


def _binary_target(logits: Tensor, target: Tensor) -> Tensor:
    """Target as float with the logits' shape; a missing singleton channel axis is added."""
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    return target.to(logits.dtype)


def _probs_and_target(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(probabilities, target) as [N, C, ...] tensors of one dtype, sigmoid for C = 1, softmax else."""
    if logits.ndim < 3:
        raise ValueError(f"logits must be [N, C, *spatial], got shape {tuple(logits.shape)}")
    c = logits.shape[1]
    if c == 1:
        return torch.sigmoid(logits), _binary_target(logits, target)
    probs = torch.softmax(logits, dim=1)
    if target.shape == logits.shape and target.is_floating_point():
        return probs, target.to(probs.dtype)
    index = target[:, 0] if target.ndim == logits.ndim else target
    if index.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"index target must be [N, *spatial] = {tuple(logits.shape[:1] + logits.shape[2:])}, "
            f"got {tuple(target.shape)}"
        )
    onehot = F.one_hot(index.long(), c).movedim(-1, 1)
    return probs, onehot.to(probs.dtype)


def _soft_dice(probs: Tensor, target: Tensor, smooth: float, per_image: bool, squared: bool) -> Tensor:
    """1 - mean soft Dice over (image,) class; ``squared`` uses the V-Net denominator sum p^2 + sum t^2."""
    dims = tuple(range(2, probs.ndim)) if per_image else (0, *range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    if squared:
        denom = (probs * probs).sum(dims) + (target * target).sum(dims)
    else:
        denom = probs.sum(dims) + target.sum(dims)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return 1.0 - dice.mean()


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0, per_image: bool = True) -> Tensor:
    """Soft Dice loss ``1 - (2 sum p t + smooth) / (sum p + sum t + smooth)``, averaged.

    Dice is insensitive to the foreground/background imbalance that makes plain BCE predict
    "no lesion". ``per_image=True`` computes Dice per image and class and then averages, which
    matches the per-image evaluation protocol; ``False`` pools the pixels of the batch first
    (steadier on small lesions, but large lesions dominate). ``smooth`` keeps an image with an
    empty target and an empty prediction at loss ~0 instead of 0/0.
    """
    probs, tgt = _probs_and_target(logits, target)
    return _soft_dice(probs, tgt, smooth, per_image, squared=False)


def dice_bce_loss(
    logits: Tensor,
    target: Tensor,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    pos_weight: Tensor | float | None = None,
) -> Tensor:
    """``dice_weight * dice_loss + bce_weight * BCE-with-logits`` for binary (C = 1) logits.

    BCE gives well-behaved per-pixel gradients early in training, when soft Dice is flat;
    Dice then handles the imbalance. ``pos_weight`` up-weights foreground pixels in the BCE
    term only (a scalar or a tensor broadcastable to the logits).
    """
    if logits.ndim < 3 or logits.shape[1] != 1:
        raise ValueError(f"dice_bce_loss is binary: logits must be [N, 1, ...], got {tuple(logits.shape)}")
    tgt = _binary_target(logits, target)
    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, tgt, pos_weight=pw)
    return dice_weight * dice_loss(logits, tgt) + bce_weight * bce


def dice_ce_loss(
    logits: Tensor,
    target: Tensor,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    class_weight: Tensor | None = None,
) -> Tensor:
    """Multi-class twin of :func:`dice_bce_loss`: softmax Dice plus cross-entropy on an index map."""
    if logits.ndim < 3 or logits.shape[1] < 2:
        raise ValueError(f"dice_ce_loss needs C >= 2 logit channels, got {tuple(logits.shape)}")
    return dice_weight * dice_loss(logits, target) + ce_weight * _cross_entropy(logits, target, class_weight)


def _cross_entropy(logits: Tensor, target: Tensor, class_weight: Tensor | None) -> Tensor:
    if target.shape == logits.shape and target.is_floating_point():
        return F.cross_entropy(logits, target, weight=class_weight)  # soft / one-hot targets
    index = target[:, 0] if target.ndim == logits.ndim else target
    return F.cross_entropy(logits, index.long(), weight=class_weight)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: float | None = 0.25) -> Tensor:
    """Binary focal loss (Lin et al., 2017), mean over pixels: ``-alpha_t (1 - p_t)^gamma log p_t``.

    Down-weights the many easy background pixels so the few hard ones drive training.
    ``alpha_t = alpha`` on positives and ``1 - alpha`` on negatives (None disables it);
    ``log p_t`` comes from BCE-with-logits for numerical stability at large logits. Equal to
    torchvision's ``sigmoid_focal_loss(..., reduction="mean")``.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    tgt = _binary_target(logits, target)
    ce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * tgt + (1 - p) * (1 - tgt)
    loss = (1 - p_t).pow(gamma) * ce
    if alpha is not None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        loss = (alpha * tgt + (1 - alpha) * (1 - tgt)) * loss
    return loss.mean()


def side_output_consistency_loss(
    side_logits: list[Tensor] | tuple[Tensor, ...], final_logits: Tensor
) -> Tensor:
    """Coarse-to-fine consistency (C2FVL's idea): every side output should agree with the final map.

    Each side output [N, C, h, w] is bilinearly upsampled (``align_corners=False``) to the
    final size and scored against the *detached* final probabilities, so the fine prediction
    teaches the coarse decoder stages and never gets pulled towards them. The score is a
    Dice term plus a BCE term made exactly zero at agreement:

    * Dice with the V-Net denominator ``sum q^2 + sum p^2`` (the plain ``sum q + sum p``
      form is below 1 for soft targets even when q == p);
    * BCE against the soft target minus the target's own entropy, i.e. the KL divergence
      ``KL(p || q)`` per pixel (softmax cross-entropy minus entropy for C > 1). Same
      gradient as BCE, but zero, not ``H(p)``, when the side output matches.

    Returns the mean over side outputs (so the weight does not grow with decoder depth);
    zero, with the graph kept, for an empty list.
    """
    if not side_logits:
        return final_logits.sum() * 0.0
    size = final_logits.shape[2:]
    c = final_logits.shape[1]
    with torch.no_grad():
        final = final_logits.detach().float()
        target = torch.sigmoid(final) if c == 1 else torch.softmax(final, dim=1)
    terms = []
    for side in side_logits:
        if side.shape[:2] != final_logits.shape[:2]:
            raise ValueError(
                f"side output {tuple(side.shape)} must share [N, C] with final {tuple(final_logits.shape)}"
            )
        mode = "bilinear" if side.ndim == 4 else "trilinear" if side.ndim == 5 else "linear"
        up = (
            side if side.shape[2:] == size else F.interpolate(side, size=size, mode=mode, align_corners=False)
        )
        up = up.float()
        if c == 1:
            probs = torch.sigmoid(up)
            entropy = F.binary_cross_entropy(target, target, reduction="mean")
            kl = F.binary_cross_entropy_with_logits(up, target) - entropy
        else:
            probs = torch.softmax(up, dim=1)
            kl = F.kl_div(F.log_softmax(up, dim=1), target, reduction="sum") / target[:, 0].numel()
        dice = _soft_dice(probs, target, smooth=1.0, per_image=True, squared=True)
        terms.append(dice + kl)
    return torch.stack(terms).mean().to(final_logits.dtype)


class SegmentationLoss(nn.Module):
    """One configurable criterion for the segment task: a main loss plus side-output consistency.

    ``kind``: ``"dice_bce"`` (binary, C = 1), ``"dice_ce"`` (multi-class, index-map target) or
    ``"focal_dice"`` (binary; focal instead of BCE for very small lesions). ``dice_weight`` and
    ``bce_weight`` weigh the Dice and the pixel term (BCE, CE or focal) of the main loss;
    ``side_weight`` the :func:`side_output_consistency_loss` when side logits are given.

    ``forward(logits, target, side_logits=None)`` returns ``{"loss": total, "loss_dice": ..,
    "loss_bce" | "loss_ce" | "loss_focal": .., "loss_side": ..}`` where ``loss`` is exactly the
    weighted sum of the components (``loss_side`` only when side logits are given and
    ``side_weight > 0``). Only ``loss`` carries the graph; components are detached for logging.
    """

    def __init__(
        self,
        kind: str = "dice_bce",
        *,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        side_weight: float = 0.0,
        pos_weight: float | None = None,
        focal_gamma: float = 2.0,
        focal_alpha: float | None = 0.25,
        smooth: float = 1.0,
        per_image: bool = True,
    ) -> None:
        super().__init__()
        if kind not in SEGMENTATION_LOSS_KINDS:
            raise ValueError(
                f"unknown segmentation loss kind {kind!r}; choose one of {SEGMENTATION_LOSS_KINDS}"
            )
        for name, value in (
            ("dice_weight", dice_weight),
            ("bce_weight", bce_weight),
            ("side_weight", side_weight),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.kind = kind
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.side_weight = float(side_weight)
        self.pos_weight = pos_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.smooth = smooth
        self.per_image = per_image

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SegmentationLoss:
        """Build from a plain mapping (YAML section); unknown keys raise so typos are not ignored."""
        cfg = dict(config)
        kind = cfg.pop("kind", "dice_bce")
        return cls(kind, **cfg)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, dice_weight={self.dice_weight}, bce_weight={self.bce_weight}, "
            f"side_weight={self.side_weight}"
        )

    def forward(
        self, logits: Tensor, target: Tensor, side_logits: list[Tensor] | tuple[Tensor, ...] | None = None
    ) -> dict[str, Tensor]:
        binary = self.kind != "dice_ce"
        if binary and (logits.ndim < 3 or logits.shape[1] != 1):
            raise ValueError(
                f"kind {self.kind!r} is binary: logits must be [N, 1, ...], got {tuple(logits.shape)}"
            )
        if not binary and (logits.ndim < 3 or logits.shape[1] < 2):
            raise ValueError(f"kind 'dice_ce' needs C >= 2 logit channels, got {tuple(logits.shape)}")
        if binary:
            target = _binary_target(logits, target)
        dice = dice_loss(logits, target, smooth=self.smooth, per_image=self.per_image)
        if self.kind == "dice_bce":
            pixel_name = "loss_bce"
            pw = self.pos_weight
            pwt = None if pw is None else torch.as_tensor(pw, dtype=logits.dtype, device=logits.device)
            pixel = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pwt)
        elif self.kind == "dice_ce":
            pixel_name = "loss_ce"
            pixel = _cross_entropy(logits, target, None)
        else:
            pixel_name = "loss_focal"
            pixel = focal_loss(logits, target, gamma=self.focal_gamma, alpha=self.focal_alpha)

        total = self.dice_weight * dice + self.bce_weight * pixel
        result: dict[str, Tensor] = {"loss_dice": dice.detach(), pixel_name: pixel.detach()}
        if side_logits is not None and self.side_weight > 0:
            side = side_output_consistency_loss(side_logits, logits)
            result["loss_side"] = side.detach()
            total = total + self.side_weight * side
        result["loss"] = total
        return result


# =========================================================================== Fusion
# Losses of the fuse task (MM-EndoCL's align-disentangle-fuse, HiCur-NPC's MoE fusion). A feature
# argument may be [B, D] vectors, [B, L, D] tokens (mean-pooled over L) or channels-first maps
# [B, C, *spatial] with two or more spatial dims (global-average-pooled): every loss here compares
# one vector per case. All are computed in float32, so bf16 features from autocast are safe.

__all__ += [  # extends the lists above without rewriting them
    "disentangled_contrastive_loss",
    "dissimilarity_loss",
    "mmd_loss",
    "moe_balance_loss",
    "multiscale_mmd_loss",
    "orthogonality_loss",
    "similarity_loss",
]

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


# ----------------------------------------------------------------------------- survival
# Prognosis heads (Stage III). Both losses are computed in float32 (bf16 risks from autocast are
# safe) and average over cases, so the loss scale does not depend on the batch size.

__all__ += [  # extends the lists above without rewriting them
    "cox_partial_likelihood_loss",
    "discrete_time_survival_loss",
    "survival_intervals",
]


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
