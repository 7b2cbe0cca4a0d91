"""Image-text alignment (Stage II): a dual encoder trained with a contrastive loss.

``embed`` returns every per-sample tensor the loss needs (and the learnable logit scale and
bias) through the model's ``forward``, so the engine can cache embeddings across
micro-batches (GradCache) and DDP sees every parameter used in ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medalign.config import LossConfig
from medalign.data.dataset import stack_modalities
from medalign.losses import ContrastiveLoss

EMBEDDING_KEYS = ("image_embeds", "text_embeds", "logit_scale", "logit_bias")
TOKEN_KEYS = ("image_tokens", "text_tokens")


class AlignTask:
    def __init__(self, model: nn.Module, loss: LossConfig, image_keys: Sequence[str] = ("image",)) -> None:
        self.model = model
        self.image_keys = list(image_keys)
        self.use_tokens = loss.local_weight > 0
        if not self.use_tokens:
            # Without the local loss the token projections get no gradient; DDP refuses trainable
            # parameters that take no part in the loss, and AdamW skips them anyway (grad None).
            for name in ("image_token_proj", "text_token_proj"):
                if hasattr(model, name):
                    getattr(model, name).requires_grad_(False)
        self.use_labels = loss.soft_targets == "labels"
        self.criterion = ContrastiveLoss(
            kind=loss.kind, local_weight=loss.local_weight, soft_targets=loss.soft_targets
        )

    def embed(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = self.model(
            pixel_values=stack_modalities(batch, self.image_keys),
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            return_tokens=self.use_tokens,
        )
        keys = EMBEDDING_KEYS + (TOKEN_KEYS if self.use_tokens else ())
        return {k: outputs[k] for k in keys if outputs.get(k) is not None}

    def loss_from_embeddings(
        self, embeddings: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        outputs: dict[str, Any] = {k: v.float() for k, v in embeddings.items()}
        if self.use_tokens:
            outputs["text_mask"] = batch["attention_mask"].bool()
        labels = batch.get("label") if self.use_labels else None
        return self.criterion(outputs, labels=labels)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss_from_embeddings(self.embed(batch), batch)
