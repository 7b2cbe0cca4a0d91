"""Stage I pretraining: masked reconstruction plus a contrastive term between two views of a case.

Images of every listed modality are pooled: each present ``(case, image column)`` image is one
reconstruction sample, so one encoder learns from all modalities (a case missing a column
simply contributes fewer images). The two views of the contrastive term are

* ``views: augment``: two random augmentations of each pooled image (:func:`augment_views`,
  made in torch on the batch and drawn from torch's RNG, which the engine seeds), each masked
  independently; every pooled image is a contrastive row;
* ``views: modalities``: the first two image columns of the same case, each masked
  independently; a case missing either contributes reconstruction only.

Loss = mean reconstruction over all views + ``contrastive_weight`` x symmetric InfoNCE between
the two views' encoder embeddings at ``temperature`` (:func:`paired_infonce`). The embeddings
are the masked forward's (``contrast_on: masked``: no extra encoder pass, but each view shows the
encoder a quarter of its patches) or the encoder's on the whole views (``contrast_on: full``).
Full views are what a downstream model reads. On the phantom the masked views' pooled CLS
features barely differ between images and the InfoNCE sits near ln(batch) (every pair equally
likely) from the first steps; on the full views it moves a little further, not enough for
view retrieval well above chance at the curriculum's budget (BENCHMARKS.md, the curriculum
investigation), so the shipped recipes keep the cheaper ``masked``.

``Pretraining.plan`` sets up the run for the engine and ``evaluate_pretrain`` scores the trained model on
``eval.split``: reconstruction loss with a fixed mask seed, view-to-view retrieval, and
optionally a linear probe on the encoder's features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from medalign.config import PretrainLossConfig, RunConfig
from medalign.data.dataset import Collator, ManifestDataset, dataset_for_model
from medalign.data.manifest import Manifest
from medalign.losses import gather_with_grad
from medalign.progress import progress
from medalign.tasks.base import Task, TrainingPlan, register_task
from medalign.tasks.columns import per_modality_data

EVAL_MASK_SEED = 0  # the masks (and eval views) every evaluation draws, whatever the training seed
EVAL_VIEW_SEED = 1


# ---------------------------------------------------------------------------------------------
# Views and the contrastive loss
# ---------------------------------------------------------------------------------------------


def _uniform(
    n: int, low: float, high: float, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    noise_device = generator.device if generator is not None else device
    return (torch.rand(n, generator=generator, device=noise_device) * (high - low) + low).to(device)


def augment_views(
    images: Tensor,
    crop_min_scale: float = 0.35,
    intensity_jitter: float = 0.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One random view of each image ``[B, C, H, W]`` in [0, 1]: resized crop, flip, intensity jitter.

    The crop keeps an area fraction in ``[crop_min_scale, 1]`` with aspect ratio in [3/4, 4/3]
    at a random position and resamples it to the full size (one affine grid for the batch);
    half of the images are mirrored left-right; contrast is scaled by ``1 +- intensity_jitter``
    around the image mean and brightness shifted by ``+- intensity_jitter / 2``. Everything is
    drawn from ``generator`` or torch's global RNG, so the engine's seeding makes it reproducible.
    """
    b, device = images.shape[0], images.device
    area = _uniform(b, crop_min_scale, 1.0, device, generator)
    log_ratio = _uniform(b, math.log(3 / 4), math.log(4 / 3), device, generator)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (_uniform(b, -1.0, 1.0, device, generator) * (1 - width)).to(images.dtype)
    cy = (_uniform(b, -1.0, 1.0, device, generator) * (1 - height)).to(images.dtype)
    flip = torch.where(_uniform(b, 0.0, 1.0, device, generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = _uniform(b, 1 - intensity_jitter, 1 + intensity_jitter, device, generator).view(-1, 1, 1, 1)
    shift = _uniform(b, -intensity_jitter / 2, intensity_jitter / 2, device, generator).view(-1, 1, 1, 1)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    return ((views - mean) * contrast.to(views.dtype) + mean + shift.to(views.dtype)).clamp(0.0, 1.0)


def paired_infonce(a: Tensor, b: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between row-paired embeddings, over the rows where ``valid`` is True.

    ``a``, ``b`` are ``[R, D]`` L2-normalised; row ``i`` of ``a`` and of ``b`` are two views of the
    same case. Invalid rows (a case missing a view) neither ask a query nor serve as a negative.
    Across ranks the rows are gathered with gradients (``medalign.losses.gather_with_grad``, with
    the same ``R`` on every rank, which is why invalid rows are masked instead of dropped); with
    every row valid this is ``medalign.losses.clip_loss(a, b, 1 / temperature)``. Zero (with a
    graph) when no local row is valid.
    """
    if a.shape != b.shape or a.ndim != 2 or valid.shape != a.shape[:1]:
        raise ValueError(
            f"paired_infonce needs a, b [R, D] and valid [R]; got {tuple(a.shape)}, {tuple(b.shape)}, "
            f"{tuple(valid.shape)}"
        )
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    a_all, b_all = gather_with_grad(a), gather_with_grad(b)
    valid_all = gather_with_grad(valid.to(a.dtype)) > 0.5
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    blocked = ~valid_all[None]
    logits_ab = (a @ b_all.T / temperature).masked_fill(blocked, float("-inf"))
    logits_ba = (b @ a_all.T / temperature).masked_fill(blocked, float("-inf"))
    rows = valid.bool()
    if not bool(rows.any()):
        return (a.sum() + b.sum()) * 0.0
    return 0.5 * (
        F.cross_entropy(logits_ab[rows], labels[rows]) + F.cross_entropy(logits_ba[rows], labels[rows])
    )


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


def pooled_images(batch: dict[str, Any], image_keys: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Every present image of the batch, ``[P, C, H, W]`` in (case, column) order, and ``present [B, M]``.

    ``present`` is the dataset's ``modalities_present`` (all True when a batch has no flags).
    """
    stacked = torch.stack([batch[k] for k in image_keys], dim=1)  # [B, M, C, H, W]
    present = batch.get("modalities_present")
    if present is None:
        present = torch.ones(stacked.shape[:2], dtype=torch.bool, device=stacked.device)
    present = present.to(stacked.device).bool()
    if present.shape != stacked.shape[:2]:
        raise ValueError(
            f"modalities_present {tuple(present.shape)} does not match {len(image_keys)} columns"
        )
    return stacked[present], present


def _scatter_rows(values: Tensor, present: Tensor) -> Tensor:
    """``[P, D]`` rows of the present slots -> ``[B * M, D]`` with zeros where an image is missing."""
    out = values.new_zeros(present.numel(), values.shape[-1])
    return out.index_copy(0, present.flatten().nonzero().squeeze(1), values)


class PretrainTask:
    """Stage I training step for a :class:`~medalign.models.mae.HybridMAE` (see the module docstring)."""

    def __init__(self, model: nn.Module, loss: PretrainLossConfig, image_keys: Sequence[str]) -> None:
        self.model = model
        self.config = loss
        self.image_keys = list(image_keys)
        if not self.image_keys:
            raise ValueError("task pretrain needs at least one image column")
        if loss.views == "modalities" and len(self.image_keys) < 2:
            raise ValueError(
                f"mae_loss.views: modalities needs two image columns, got {self.image_keys}; "
                "list them in data.modalities (the first two are the views)"
            )

    def views(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """Reconstruction output plus the two views' embeddings ``[R, D]`` and which rows pair up."""
        images, present = pooled_images(batch, self.image_keys)
        full = self.config.contrast_on == "full"
        if self.config.views == "augment":
            augment = torch.cat(
                [augment_views(images, self.config.crop_min_scale, self.config.intensity_jitter) for _ in range(2)]
            )
            out = self.model(augment)
            first, second = (self.model.embed(augment).float() if full else out["embedding"]).chunk(2)
            return out, _scatter_rows(first, present), _scatter_rows(second, present), present.flatten()
        out = self.model(images)
        embedding = self.model.embed(images).float() if full else out["embedding"]
        rows = _scatter_rows(embedding, present).view(*present.shape, -1)
        return out, rows[:, 0], rows[:, 1], present[:, 0] & present[:, 1]

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        out, first, second, valid = self.views(batch)
        reconstruction = out["loss"]
        contrastive = paired_infonce(first, second, valid, self.config.temperature)
        loss = reconstruction + self.config.contrastive_weight * contrastive
        if self.config.contrastive_weight == 0:
            loss = loss + 0.0 * contrastive  # keeps the projection head in the graph (DDP)
        return {"loss": loss, "reconstruction": reconstruction.detach(), "contrastive": contrastive.detach()}


# ---------------------------------------------------------------------------------------------
# Run and evaluation
# ---------------------------------------------------------------------------------------------


def pretrain_columns(config: RunConfig, manifest: Manifest) -> list[str]:
    """``data.modalities`` (checked against the manifest), else every image column: all are pooled."""
    keys = list(config.data.modalities or manifest.image_columns)
    missing = [k for k in keys if k not in manifest.image_columns]
    if missing:
        raise ValueError(
            f"data.modalities {missing} are not image columns of the manifest ({manifest.image_columns})"
        )
    if not keys:
        raise ValueError("the manifest has no image column")
    return keys


def pretrain_dataset(
    config: RunConfig,
    manifest: Manifest,
    model: Any,
    image_keys: list[str],
    split: str,
    *,
    augment: bool,
    label: str | None = None,
) -> ManifestDataset:
    """A split with every column at the model's own channel count (modalities are separate images)."""

    return dataset_for_model(
        manifest, model, split, label, image_keys, data=per_modality_data(config, model), augment=augment
    )


class Pretraining(Task):
    """``task: pretrain`` (Stage I): a hybrid MAE; view retrieval and a linear probe of its features."""

    name = "pretrain"
    model_kind = "a hybrid MAE (mae_tiny, mae_small, ...)"

    def model_class(self) -> type:
        from medalign.models.mae import HybridMAE

        return HybridMAE

    def plan(self, config: RunConfig, manifest: Manifest, model: Any, out: Path, echo: Any) -> TrainingPlan:
        image_keys = pretrain_columns(config, manifest)
        dataset = pretrain_dataset(config, manifest, model, image_keys, "train", augment=True)
        return TrainingPlan(
            PretrainTask(model, config.mae_loss, image_keys),
            dataset,
            lambda m: evaluate_pretrain(m, manifest, config, image_keys),
        )


def _loader(dataset: ManifestDataset, config: RunConfig) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=config.data.eval_batch_size, collate_fn=Collator())


@torch.no_grad()
def _eval_split(
    model: Any, dataset: ManifestDataset, config: RunConfig, image_keys: list[str]
) -> dict[str, Any]:
    """Reconstruction (fixed masks) and the two views' embeddings, full and masked, over one split."""
    masks = torch.Generator().manual_seed(EVAL_MASK_SEED)
    views = torch.Generator().manual_seed(EVAL_VIEW_SEED)
    losses, weights, firsts, seconds, masked_first, masked_second = [], [], [], [], [], []
    for batch in progress(_loader(dataset, config), desc="evaluate"):
        images, present = pooled_images(batch, image_keys)
        if config.mae_loss.views == "augment":
            pair = [
                augment_views(images, config.mae_loss.crop_min_scale, config.mae_loss.intensity_jitter, views)
                for _ in range(2)
            ]
            out = model(torch.cat(pair), generator=masks)
            masked = out["embedding"].chunk(2)
            full = (model.embed(pair[0]), model.embed(pair[1]))
        else:
            out = model(images, generator=masks)
            rows = _scatter_rows(out["embedding"], present).view(*present.shape, -1)
            full_rows = _scatter_rows(model.embed(images), present).view(*present.shape, -1)
            keep = present[:, 0] & present[:, 1]
            masked = (rows[keep, 0], rows[keep, 1])
            full = (full_rows[keep, 0], full_rows[keep, 1])
        losses.append(float(out["loss"]))
        weights.append(int(out["mask"].shape[0]))
        firsts.append(full[0])
        seconds.append(full[1])
        masked_first.append(masked[0])
        masked_second.append(masked[1])
    n = sum(weights)
    return {
        "reconstruction": sum(loss * w for loss, w in zip(losses, weights, strict=True)) / n,
        "n_images": n,
        "full": (torch.cat(firsts), torch.cat(seconds)),
        "masked": (torch.cat(masked_first), torch.cat(masked_second)),
    }


def view_retrieval(first: Tensor, second: Tensor) -> dict[str, Any]:
    """R@K and ranks of finding a case's other view among all second views (and back); mean R@1."""
    from medalign.evaluation.metrics import retrieval_metrics

    if len(first) == 0:
        raise ValueError("view retrieval needs at least one case with both views")
    similarity = (F.normalize(first.float(), dim=-1) @ F.normalize(second.float(), dim=-1).T).numpy()
    forward, backward = retrieval_metrics(similarity), retrieval_metrics(similarity.T)
    return {
        "R@1": 0.5 * (forward["R@1"] + backward["R@1"]),
        "first_to_second": forward,
        "second_to_first": backward,
    }


@torch.no_grad()
def encoder_features(
    model: Any, dataset: ManifestDataset, config: RunConfig, image_keys: list[str]
) -> tuple[Tensor, Tensor]:
    """Per case: the mean of ``encode()`` over its present modalities, and its label (-1 unknown)."""
    features, labels = [], []
    for batch in progress(_loader(dataset, config), desc="evaluate"):
        images, present = pooled_images(batch, image_keys)
        rows = _scatter_rows(model.encode(images).float(), present).view(*present.shape, -1)
        features.append(rows.sum(1) / present.sum(1, keepdim=True).clamp(min=1))
        labels.append(batch["label"] if "label" in batch else torch.full((present.shape[0],), -1))
    return torch.cat(features), torch.cat(labels)


def evaluate_pretrain(
    model: Any, manifest: Manifest, config: RunConfig, image_keys: list[str]
) -> dict[str, Any]:
    """Scores on ``eval.split`` (see the module docstring); every number is reproducible.

    * ``reconstruction``: masked-patch MSE, averaged over the split's images, masks drawn from
      ``EVAL_MASK_SEED`` (and, with ``views: augment``, the views from ``EVAL_VIEW_SEED``);
    * ``retrieval``: view-to-view R@K on the unmasked embeddings (``model.embed``, what a
      downstream model sees); ``retrieval_masked`` on the masked forward's embeddings (what the
      contrastive term trained);
    * ``probe`` (``eval.probe`` and the manifest has ``eval.probe_label``): linear probe
      (``medalign.evaluation.probe.linear_probe``) on ``encode()`` features, mean over a case's modalities.
    """
    from medalign.evaluation.probe import linear_probe

    model.eval()
    split = config.eval.split
    scores = _eval_split(
        model, pretrain_dataset(config, manifest, model, image_keys, split, augment=False), config, image_keys
    )
    results: dict[str, Any] = {
        "split": split,
        "views": config.mae_loss.views,
        "reconstruction": scores["reconstruction"],
        "n_reconstructed": scores["n_images"],
        "mask_ratio": model.config.mask_ratio,
        "mask_seed": EVAL_MASK_SEED,
        "n_pairs": len(scores["full"][0]),
    }
    if results["n_pairs"]:
        results["retrieval"] = view_retrieval(*scores["full"])
        results["retrieval_masked"] = view_retrieval(*scores["masked"])
    label = config.eval.probe_label
    if config.eval.probe and label in manifest.table.columns:
        classes = manifest.classes(label)  # of the whole manifest: a split may lack a class
        splits = {}
        for name in ("train", "val", split):
            dataset = pretrain_dataset(config, manifest, model, image_keys, name, augment=False, label=label)
            x, y = encoder_features(model, dataset, config, image_keys)
            known = y >= 0
            index = torch.tensor([classes.index(c) for c in dataset.classes] or [0], dtype=torch.long)
            splits[name] = (x[known].numpy(), index[y[known]].numpy())
        results["probe"] = linear_probe(*splits["train"], *splits["val"], *splits[split], class_names=classes)
    return results


register_task(Pretraining())
