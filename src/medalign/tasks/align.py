"""Image-text alignment (Stage II): a dual encoder trained with a contrastive loss.

``embed`` returns every per-sample tensor the loss needs (and the learnable logit scale and
bias) through the model's ``forward``, so the engine can cache embeddings across
micro-batches (GradCache) and DDP sees every parameter used in ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medalign.config import LossConfig, RunConfig
from medalign.data.dataset import dataset_for_model, stack_modalities
from medalign.data.manifest import Manifest
from medalign.losses import ContrastiveLoss
from medalign.tasks.base import Task, TrainingPlan, register_task
from medalign.tasks.columns import stacked_columns

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


def texts_from_labels(manifest: Manifest, templates: str, label: str) -> Manifest:
    """Fill empty text cells from the label with a prompt template (for datasets without reports).

    The template of each case is fixed by its case_id, so runs are reproducible.
    """
    import zlib

    from medalign.evaluation.zeroshot import build_class_prompts, load_templates, resolve_classes

    spec = load_templates(templates)
    classes = manifest.classes(label)
    prompts = build_class_prompts(spec["templates"], resolve_classes(spec, classes))
    by_class = dict(zip(classes, prompts, strict=True))
    table = manifest.table.copy()
    if "text" not in table.columns:
        table["text"] = ""
    for row, (case_id, value) in enumerate(zip(table["case_id"], table[label], strict=True)):
        if table.at[row, "text"] == "" and value in by_class:
            options = by_class[value]
            table.at[row, "text"] = options[zlib.crc32(case_id.encode()) % len(options)]
    return Manifest(table, manifest.base_dir, manifest.meta)


class Alignment(Task):
    """``task: align``: a dual encoder on image-text pairs; zero-shot, retrieval and probe scores."""

    name = "align"

    def plan(self, config: RunConfig, manifest: Manifest, model: Any, out: Path, echo: Any) -> TrainingPlan:
        if config.data.text_from_labels:
            manifest = texts_from_labels(manifest, config.data.text_from_labels, config.data.label or "label")
        image_keys = stacked_columns(config, manifest, model)
        dataset = dataset_for_model(
            manifest, model, "train", config.data.label, image_keys, data=config.data, augment=True
        )
        return TrainingPlan(
            AlignTask(model, config.loss, image_keys=image_keys),
            dataset,
            lambda m: evaluate_alignment(m, manifest, config, image_keys),
        )


def evaluate_alignment(
    model: Any, manifest: Manifest, config: RunConfig, image_keys: list[str]
) -> dict[str, Any]:
    """Zero-shot / retrieval / probe on ``eval.split`` as the recipe asks; each split embedded once."""
    from functools import cache

    from medalign.evaluation import alignment as ev

    ev_cfg = config.eval

    @cache
    def embed(split: str, label: str | None) -> ev.SplitEmbeddings:
        label = label if label in manifest.table.columns else None
        dataset = dataset_for_model(manifest, model, split, label, image_keys, data=config.data)
        return ev.embed_split(model, dataset)

    results: dict[str, Any] = {"split": ev_cfg.split}
    if ev_cfg.zeroshot:
        results["zeroshot"] = ev.zero_shot(model, embed(ev_cfg.split, ev_cfg.zeroshot_label), ev_cfg.zeroshot)
    if ev_cfg.retrieval:
        test = embed(ev_cfg.split, ev_cfg.zeroshot_label if ev_cfg.zeroshot else None)
        if test.text is not None:
            results["retrieval"] = {**ev.retrieval(test), "examples": ev.retrieval_examples(test)}
    if ev_cfg.probe:
        label = ev_cfg.probe_label
        results["probe"] = ev.probe(embed("train", label), embed("val", label), embed(ev_cfg.split, label))
    return results


register_task(Alignment())
