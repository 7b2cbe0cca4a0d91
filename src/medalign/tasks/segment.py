"""Segmentation: supervised, CLIP-feature and text-guided models trained with Dice-style losses.

A text-guided model receives the tokenised ``text`` of each case (the prompt says what to
segment); an attribute-driven one receives its ``attr:*`` values as attribute tokens
(C2FVL). Image-only models ignore both, so one task serves every segmentation model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medalign.config import SegLossConfig
from medalign.data.dataset import stack_modalities
from medalign.losses import SegmentationLoss


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
