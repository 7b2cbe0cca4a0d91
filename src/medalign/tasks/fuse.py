"""Fusion of imaging modalities (and text), Stage III: one task for every fusion model.

The loss is the task loss (``seg_loss``'s Dice+BCE for a segmentation head, cross-entropy for a
classification head) plus the weighted terms of ``fuse_loss`` that the model's ``features``
support: MM-EndoCL's align-disentangle-fuse losses (``fuse_adf``) and the MoE load-balancing
loss (``fuse_moe``). The ADF terms compare modalities pairwise over the cases where both are
present *after* modality dropout (``outputs["present"]``), so a dropped or missing modality never
enters a loss; a pair with too few such cases in the batch contributes nothing.

Batch -> model: the manifest columns ``image_keys`` map position by position onto
``model.config.modalities``; ``modalities_present`` (the dataset's per-case flags) becomes
``present``; models that read reports get the tokenised ``text`` and ``text_present`` (False
where a case's text is empty).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medalign.config import FuseLossConfig, RunConfig, SegLossConfig
from medalign.data.dataset import Collator, ManifestDataset, dataset_for_model
from medalign.data.manifest import Manifest
from medalign.losses import (
    SegmentationLoss,
    disentangled_contrastive_loss,
    dissimilarity_loss,
    multiscale_mmd_loss,
    orthogonality_loss,
    similarity_loss,
)
from medalign.progress import progress
from medalign.tasks.base import Task, TrainingPlan, register_task
from medalign.tasks.columns import check_num_classes, fusion_columns, modality_subsets


def fusion_inputs(
    model: Any, batch: dict[str, Any], image_keys: Sequence[str], present: Tensor | None = None
) -> dict[str, Any]:
    """The keyword arguments a fusion model takes for this batch (``present`` overrides the flags)."""
    names = model.config.modalities
    if len(names) != len(image_keys):
        raise ValueError(f"{len(image_keys)} image columns {list(image_keys)} for model modalities {names}")
    inputs: dict[str, Any] = {
        "pixel_values": {name: batch[key] for name, key in zip(names, image_keys, strict=True)},
        "present": batch["modalities_present"] if present is None else present,
    }
    if getattr(model, "needs_text", False) and "input_ids" in batch:
        inputs["input_ids"], inputs["attention_mask"] = batch["input_ids"], batch["attention_mask"]
        inputs["text_present"] = torch.tensor(
            [bool(str(t).strip()) for t in batch["text"]], device=batch["input_ids"].device
        )
    return inputs


def _pairwise(
    values: Sequence[Any], present: Tensor, min_rows: int, term: Callable[[Any, Any, Tensor], Tensor]
) -> Tensor | None:
    """Mean of ``term(values[i], values[j], rows)`` over modality pairs with >= ``min_rows`` shared cases."""
    terms = []
    for i, j in itertools.combinations(range(len(values)), 2):
        rows = present[:, i] & present[:, j]
        if int(rows.sum()) >= min_rows:
            terms.append(term(values[i], values[j], rows))
    return torch.stack(terms).mean() if terms else None


def adf_losses(features: dict[str, Any], present: Tensor, config: FuseLossConfig) -> dict[str, Tensor]:
    """The unweighted ADF terms the features allow (keys ``loss_mmd``, ``loss_similarity``, ...)."""
    out: dict[str, Tensor | None] = {}
    if config.mmd_weight > 0 and "multiscale" in features:
        out["loss_mmd"] = _pairwise(
            features["multiscale"],
            present,
            2,
            lambda a, b, rows: multiscale_mmd_loss([f[rows] for f in a], [f[rows] for f in b]),
        )
    shared, specific = features.get("shared"), features.get("specific")
    if shared is not None and specific is not None:
        if config.similarity_weight > 0:
            out["loss_similarity"] = _pairwise(
                shared, present, 1, lambda a, b, rows: similarity_loss(a[rows], b[rows])
            )
        if config.dissimilarity_weight > 0:
            out["loss_dissimilarity"] = _pairwise(
                specific,
                present,
                1,
                lambda a, b, rows: dissimilarity_loss(a[rows], b[rows], margin=config.dissimilarity_margin),
            )
        if config.orthogonality_weight > 0:
            terms = [
                orthogonality_loss(s[present[:, m]], p[present[:, m]])
                for m, (s, p) in enumerate(zip(shared, specific, strict=True))
                if int(present[:, m].sum()) >= 2
            ]
            out["loss_orthogonality"] = torch.stack(terms).mean() if terms else None
        if config.contrastive_weight > 0:
            pairs = list(zip(shared, specific, strict=True))
            out["loss_contrastive"] = _pairwise(
                pairs,
                present,
                2,
                lambda a, b, rows: disentangled_contrastive_loss(
                    [a[0][rows], b[0][rows]], [a[1][rows], b[1][rows]], config.contrastive_temperature
                ),
            )
    return {k: v for k, v in out.items() if v is not None}


WEIGHTS = {
    "loss_mmd": "mmd_weight",
    "loss_similarity": "similarity_weight",
    "loss_dissimilarity": "dissimilarity_weight",
    "loss_orthogonality": "orthogonality_weight",
    "loss_contrastive": "contrastive_weight",
    "loss_balance": "balance_weight",
}


class FuseTask:
    def __init__(
        self,
        model: nn.Module,
        fuse_loss: FuseLossConfig,
        seg_loss: SegLossConfig,
        image_keys: Sequence[str],
        mask_key: str | None = None,
        label_key: str = "label",
    ) -> None:
        self.model = model
        self.config = fuse_loss
        self.image_keys = list(image_keys)
        self.mask_key, self.label_key = mask_key, label_key
        self.segment = model.config.task_head == "segment"
        if self.segment and not mask_key:
            raise ValueError("a fusion model with a segmentation head needs a mask column")
        self.criterion = SegmentationLoss(
            kind=seg_loss.kind, dice_weight=seg_loss.dice_weight, bce_weight=seg_loss.bce_weight
        )

    def task_loss(self, logits: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.segment:
            assert self.mask_key is not None
            return self.criterion(logits.float(), batch[self.mask_key])
        labels = batch[self.label_key].long()
        loss = F.cross_entropy(
            logits.float(), labels, ignore_index=-1, label_smoothing=self.config.label_smoothing
        )
        if not bool((labels >= 0).any()):  # a batch without labels (cross-entropy would be NaN)
            loss = logits.sum() * 0.0
        return {"loss": loss, "loss_ce": loss.detach()}

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = self.model(**fusion_inputs(self.model, batch, self.image_keys))
        result = self.task_loss(outputs["logits"], batch)
        terms = adf_losses(outputs["features"], outputs["present"], self.config)
        if "balance_loss" in outputs and self.config.balance_weight > 0:
            terms["loss_balance"] = outputs["balance_loss"].float()
        total = result["loss"]
        for name, value in terms.items():
            total = total + getattr(self.config, WEIGHTS[name]) * value
            result[name] = value.detach()
        result["loss"] = total
        return result


@torch.no_grad()
def predict(model: Any, batch: dict[str, Any], image_keys: Sequence[str], present: Tensor) -> Tensor:
    """Foreground probabilities [B, H, W] (segmentation) or class probabilities [B, K] (classification)."""
    logits = model(**fusion_inputs(model, batch, image_keys, present))["logits"].float()
    if model.config.task_head == "segment":
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)


def fusion_dataset(
    config: RunConfig, manifest: Manifest, model: Any, image_keys: list[str], split: str, augment: bool
) -> ManifestDataset:
    """Masks for a segmentation head, labels for a classification head; every modality of each case."""
    segment = model.config.task_head == "segment"
    return dataset_for_model(
        manifest,
        model,
        split,
        None if segment else config.data.label,
        image_keys,
        mask=config.data.mask if segment else None,
        data=config.data,
        augment=augment,
    )


class Fusion(Task):
    """``task: fuse``: a fusion model (``medalign.models.fusion``) over several modalities of each case."""

    name = "fuse"
    model_kind = "a fusion model (fuse_adf, fuse_moe, ...)"

    def model_class(self) -> type:
        from medalign.models.fusion import FusionModel

        return FusionModel

    def plan(self, config: RunConfig, manifest: Manifest, model: Any, out: Path, echo: Any) -> TrainingPlan:
        image_keys = fusion_columns(config, manifest, model)
        dataset = fusion_dataset(config, manifest, model, image_keys, "train", augment=True)
        if model.config.task_head == "classify":
            check_num_classes(dataset, model.num_classes, config.data.label)
        step = FuseTask(
            model, config.fuse_loss, config.seg_loss, image_keys, config.data.mask, config.data.label or "label"
        )
        return TrainingPlan(
            step, dataset, lambda m: evaluate_fusion(m, manifest, config, image_keys, config.eval.split)
        )


def evaluate_fusion(
    model: Any, manifest: Manifest, config: RunConfig, image_keys: list[str], split: str
) -> dict[str, Any]:
    """The metric for every non-empty subset of modalities, keyed like ``"a"``, ``"b"``, ``"a+b"``.

    Each subset hides the other modalities from the model (``present`` False), so one trained
    model answers "how good is it with only these scans". A case is scored on a subset when it
    has at least one of the subset's modalities. Segmentation: per-image Dice/IoU, pooled Dice,
    HD95, NSD (``SegmentationMetrics``); classification: ACC, balanced ACC, macro-F1, AUC
    (``classification_metrics``; cases without a label are left out and counted). The top
    level repeats the full set's metrics (with per-case rows) so the run reads like any other.
    """
    import numpy as np
    import torch

    from medalign.evaluation.metrics import SegmentationMetrics, classification_metrics, without_rows

    names = list(model.config.modalities)
    segment = model.config.task_head == "segment"
    dataset = fusion_dataset(config, manifest, model, image_keys, split, augment=False)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.data.eval_batch_size,
        collate_fn=Collator(model.tokenizer, max_length=config.data.text_max_length),
    )
    subsets = modality_subsets(names)
    keys = ["+".join(names[i] for i in s) for s in subsets]
    seg = {k: SegmentationMetrics() for k in keys}
    scores: dict[str, list[Any]] = {k: [] for k in keys}
    labels: dict[str, list[Any]] = {k: [] for k in keys}
    unlabelled = 0
    for batch in progress(loader, desc=f"evaluate {split}"):
        available = batch["modalities_present"].bool()
        if not segment:
            unlabelled += int((batch["label"] < 0).sum())
        for subset, key in zip(subsets, keys, strict=True):
            chosen = torch.zeros(len(names), dtype=torch.bool)
            chosen[list(subset)] = True
            present = available & chosen
            rows = present.any(dim=1) if segment else present.any(dim=1) & (batch["label"] >= 0)
            if not rows.any():
                continue
            output = predict(model, batch, image_keys, present)[rows].cpu().numpy()
            if segment:
                ids = [c for c, keep in zip(batch["case_id"], rows.tolist(), strict=True) if keep]
                seg[key].update(output, batch[config.data.mask][rows][:, 0].numpy(), ids)
            else:
                scores[key].append(output)
                labels[key].append(batch["label"][rows].numpy())

    results: dict[str, Any] = {"split": split, "modalities": names, "subsets": {}}
    for key in keys:
        if segment:
            metrics = seg[key].aggregate() if len(seg[key]) else None
        elif scores[key]:
            metrics = classification_metrics(
                np.concatenate(labels[key]),
                np.concatenate(scores[key]),
                dataset.classes,
                scores_are="probabilities",
            )
        else:
            metrics = None
        if metrics is None:
            results["subsets"][key] = {"n_images": 0}
            continue
        results["subsets"][key] = without_rows(metrics)
        if key == keys[-1]:
            results.update(metrics)
    if not segment:
        results["n_unlabelled"] = unlabelled
    return results


register_task(Fusion())
