"""Segmentation: supervised, CLIP-feature and text-guided models trained with Dice-style losses.

A text-guided model receives the tokenised ``text`` of each case (the prompt says what to
segment); an attribute-driven one receives its ``attr:*`` values as attribute tokens
(C2FVL). Image-only models ignore both, so one task serves every segmentation model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medalign.config import RunConfig, SegLossConfig
from medalign.data.dataset import Collator, ManifestDataset, dataset_for_model, stack_modalities
from medalign.data.manifest import Manifest
from medalign.losses import SegmentationLoss
from medalign.progress import progress
from medalign.tasks.base import Task, TrainingPlan, register_task
from medalign.tasks.columns import image_columns


def model_inputs(model: Any, batch: dict[str, Any], image_keys: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments a segmentation model takes for this batch."""
    inputs: dict[str, Any] = {"pixel_values": stack_modalities(batch, image_keys)}
    if getattr(model, "needs_text", False):
        inputs["input_ids"], inputs["attention_mask"] = batch["input_ids"], batch["attention_mask"]
    if getattr(model.config, "attributes_vocab", None):
        inputs["attributes"] = model.encode_attributes(batch["attrs"])
    return inputs


class SegmentTask:
    def __init__(
        self, model: nn.Module, loss: SegLossConfig, image_keys: Sequence[str], mask_key: str
    ) -> None:
        self.model = model
        self.image_keys = list(image_keys)
        self.mask_key = mask_key
        self.criterion = SegmentationLoss(
            kind=loss.kind,
            dice_weight=loss.dice_weight,
            bce_weight=loss.bce_weight,
            side_weight=loss.side_weight,
        )

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = self.model(**model_inputs(self.model, batch, self.image_keys))
        return self.criterion(
            outputs["logits"].float(), batch[self.mask_key], [s.float() for s in outputs["side_logits"]]
        )


@torch.no_grad()
def predict_probabilities(model: Any, batch: dict[str, Any], image_keys: Sequence[str]) -> np.ndarray:
    """Foreground probabilities [B, H, W] (binary models)."""
    logits = model(**model_inputs(model, batch, image_keys))["logits"].float()
    return torch.sigmoid(logits[:, 0]).cpu().numpy()


def segmentation_dataset(
    config: RunConfig, manifest: Manifest, model: Any, image_keys: list[str], split: str, augment: bool
) -> ManifestDataset:
    return dataset_for_model(
        manifest, model, split, None, image_keys, mask=config.data.mask, data=config.data, augment=augment
    )


class Segmentation(Task):
    """``task: segment``: any segmentation model on image/mask pairs; Dice, IoU, HD95, NSD."""

    name = "segment"

    def plan(self, config: RunConfig, manifest: Manifest, model: Any, out: Path, echo: Any) -> TrainingPlan:
        image_keys = image_columns(config, manifest)
        assert config.data.mask is not None  # validate_ranges checked it
        dataset = segmentation_dataset(config, manifest, model, image_keys, "train", augment=True)
        return TrainingPlan(
            SegmentTask(model, config.seg_loss, image_keys, config.data.mask),
            dataset,
            lambda m: evaluate_segmentation(m, manifest, config, image_keys, config.eval.split),
        )


def evaluate_segmentation(
    model: Any, manifest: Manifest, config: RunConfig, image_keys: list[str], split: str
) -> dict[str, Any]:
    """Per-image Dice/IoU (LViT/C2FVL protocol), pooled Dice, HD95, NSD on one split."""
    import torch

    from medalign.evaluation.metrics import SegmentationMetrics

    dataset = segmentation_dataset(config, manifest, model, image_keys, split, augment=False)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.data.eval_batch_size,
        collate_fn=Collator(model.tokenizer, max_length=config.data.text_max_length),
    )
    metrics = SegmentationMetrics()
    for batch in progress(loader, desc=f"evaluate {split}"):
        metrics.update(
            predict_probabilities(model, batch, image_keys),
            batch[config.data.mask][:, 0].numpy(),
            batch["case_id"],
        )
    return {"split": split, **metrics.aggregate()}


register_task(Segmentation())
