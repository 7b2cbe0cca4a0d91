"""Segmentation: supervised, CLIP-feature and prompt-guided models trained with Dice-style losses.

A text-guided model receives the tokenised ``text`` of each case (the prompt says what to
segment); an attribute-driven one receives its ``attr:*`` values as attribute tokens
(C2FVL). Image-only models ignore both, so one task serves every segmentation model.

Prompt-guided training and evaluation also live here:

* :class:`PromptGroups` shows a prompt-guided model the same image with several prompts and
  targets in one batch (``data.prompts``; see :class:`medalign.config.PromptConfig`), so the
  text is the only thing that tells the rows of a batch apart;
* :func:`prompt_variant` rebuilds an evaluation split with each row's prompt replaced by
  another image's (``shuffled``) or by the empty prompt (``empty``): the Dice a model keeps
  without its true prompt measures how much it relies on the text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medalign.config import PromptConfig, RunConfig, SegLossConfig
from medalign.data.dataset import Collator, ManifestDataset, Sample, dataset_for_model, stack_modalities
from medalign.data.manifest import Manifest
from medalign.losses import SegmentationLoss
from medalign.progress import progress
from medalign.tasks.base import Task, TrainingPlan, register_task
from medalign.tasks.columns import image_columns

PROMPT_VARIANTS = ("true", "shuffled", "empty")


def is_prompt_guided(model: Any) -> bool:
    """Whether the model reads a prompt (text tokens or structured attributes)."""
    return bool(getattr(model, "needs_text", False) or getattr(model, "takes_attributes", False))


def model_inputs(model: Any, batch: dict[str, Any], image_keys: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments a segmentation model takes for this batch."""
    inputs: dict[str, Any] = {"pixel_values": stack_modalities(batch, image_keys)}
    if getattr(model, "needs_text", False):
        inputs["input_ids"], inputs["attention_mask"] = batch["input_ids"], batch["attention_mask"]
    if getattr(model, "takes_attributes", False):
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


# ---------------------------------------------------------------------------------------------
# Prompts in training: the same image with several prompts and targets per batch
# ---------------------------------------------------------------------------------------------


def _prompt_cells(table: Any, row: int, attr_columns: Sequence[str]) -> dict[str, Any]:
    """The cells that make up row ``row``'s prompt: its text and every attribute value."""
    cells = {"text": table["text"].iat[row] if "text" in table.columns else ""}
    cells |= {c: table[c].iat[row] for c in attr_columns}
    return cells


def _empty_prompt(attr_columns: Sequence[str]) -> dict[str, str]:
    return {"text": "", **dict.fromkeys(attr_columns, "")}


def image_groups(dataset: ManifestDataset) -> list[list[int]]:
    """Row indices grouped by their image cells (rows that show the same pixels), in row order."""
    table = dataset.manifest.table
    groups: dict[tuple[Any, ...], list[int]] = {}
    for row, key in enumerate(zip(*(table[k] for k in dataset.image_keys), strict=True)):
        groups.setdefault(tuple(key), []).append(row)
    return list(groups.values())


class PromptGroups(torch.utils.data.Dataset):
    """One item per image: ``per_image`` samples of it, each with its own prompt and target.

    Item ``(g, seed)`` is a list of samples drawn with the same augmentation seed, so every
    sample of an image shows identical (equally flipped, rotated, ...) pixels; only prompt and
    mask differ. See :class:`medalign.config.PromptConfig` for how the slots are filled.
    ``collate`` flattens the lists into one batch of ``images x per_image`` rows.
    """

    def __init__(self, dataset: ManifestDataset, config: PromptConfig, mask_key: str) -> None:
        self.dataset, self.config, self.mask_key = dataset, config, mask_key
        self.groups = image_groups(dataset)
        table = dataset.manifest.table
        self.attr_columns = list(dataset.manifest.attr_columns)
        missing = [c for c in config.negatives_from if c not in table.columns]
        if missing:
            raise ValueError(
                f"data.prompts.negatives_from {missing} are not columns of the manifest "
                f"(attribute columns: {self.attr_columns})"
            )
        self.keys = [tuple(table[c].iat[r] for c in config.negatives_from) for r in range(len(table))]
        self.rows_by_key: dict[tuple[Any, ...], list[int]] = {}
        for row, key in enumerate(self.keys):
            self.rows_by_key.setdefault(key, []).append(row)

    def __len__(self) -> int:
        return len(self.groups)

    def set_random_state(self, seed: int) -> None:
        self.dataset.set_random_state(seed)

    def case_id(self, index: int) -> str:
        return self.dataset.case_id(self.groups[index][0])

    def __getitem__(self, key: int | tuple[int, int]) -> list[Sample]:
        index, seed = key if isinstance(key, tuple) else (key, int(key))
        rows = self.groups[index]
        rng = np.random.default_rng([seed, index])
        own = [rows[i] for i in rng.permutation(len(rows))]
        slots: list[tuple[int, dict[str, Any] | None]] = [(r, None) for r in own[: self.config.per_image]]
        negatives = self._negative_rows(rows, rng, self.config.per_image - len(slots))
        slots += [(rows[0], self._cells(r)) for r in negatives]
        while len(slots) < self.config.per_image:  # no negatives to borrow: repeat its own rows
            slots.append((own[len(slots) % len(own)], None))
        samples = []
        for row, cells in slots:
            if self.config.dropout and rng.random() < self.config.dropout:
                samples.append(self._without_prompt(rows, seed))
                continue
            sample = self.dataset.sample(row, seed, cells)
            if cells is not None:  # another image's prompt: nothing of it is in this image
                sample[self.mask_key] = torch.zeros_like(sample[self.mask_key])
            samples.append(sample)
        return samples

    def _cells(self, row: int) -> dict[str, Any]:
        return _prompt_cells(self.dataset.manifest.table, row, self.attr_columns)

    def _negative_rows(self, rows: list[int], rng: np.random.Generator, n: int) -> list[int]:
        """``n`` rows of other images whose ``negatives_from`` values none of ``rows`` has."""
        if n <= 0 or not self.config.negatives_from:
            return []
        taken = {self.keys[r] for r in rows}
        free = [k for k in self.rows_by_key if k not in taken]
        if not free:
            return []
        picks = [free[i] for i in rng.integers(len(free), size=n)]
        return [self.rows_by_key[k][int(rng.integers(len(self.rows_by_key[k])))] for k in picks]

    def _without_prompt(self, rows: list[int], seed: int) -> Sample:
        """The empty prompt, whose target is every target of the image (the union of its rows)."""
        sample = self.dataset.sample(rows[0], seed, _empty_prompt(self.attr_columns))
        for row in rows[1:]:
            other = self.dataset.sample(row, seed)[self.mask_key]
            sample[self.mask_key] = torch.maximum(sample[self.mask_key], other)
        return sample


def flatten_groups(collate: Callable[[list[Sample]], Sample]) -> Callable[[list[list[Sample]]], Sample]:
    """A collate function for :class:`PromptGroups` items: their samples side by side."""

    def collate_groups(items: list[list[Sample]]) -> Sample:
        return collate([sample for item in items for sample in item])

    return collate_groups


def prompt_training_data(
    dataset: ManifestDataset, config: PromptConfig, mask_key: str, collate: Collator, batch_size: int
) -> tuple[torch.utils.data.Dataset, Callable[[list[Any]], Sample], int]:
    """``(dataset, collate, images per batch)`` for training as ``data.prompts`` asks.

    The defaults (one row at a time, no negatives, no dropout) leave the dataset as it is.
    """
    if config.per_image == 1 and not config.negatives_from and not config.dropout:
        return dataset, collate, batch_size
    return PromptGroups(dataset, config, mask_key), flatten_groups(collate), batch_size // config.per_image


# ---------------------------------------------------------------------------------------------
# Prompts in evaluation: true, another image's, none
# ---------------------------------------------------------------------------------------------


def shuffled_donors(dataset: ManifestDataset, seed: int = 0) -> list[int]:
    """For each row, the row whose prompt it borrows in the ``shuffled`` evaluation.

    Rows are visited in a seeded random order and each takes the next row in that order that
    shows another image and whose prompt (text and attributes) differs from its own; when no
    such row exists (every image has the same prompt) the next row of another image is used.
    """
    table = dataset.manifest.table
    n = len(table)
    group_of = {row: g for g, rows in enumerate(image_groups(dataset)) for row in rows}
    attr_columns = list(dataset.manifest.attr_columns)
    prompts = [tuple(_prompt_cells(table, r, attr_columns).values()) for r in range(n)]
    order = np.random.default_rng(seed).permutation(n).tolist()
    position = {row: i for i, row in enumerate(order)}
    donors = []
    for row in range(n):
        candidates = [order[(position[row] + step) % n] for step in range(1, n)]
        other_image = [r for r in candidates if group_of[r] != group_of[row]]
        differing = [r for r in other_image if prompts[r] != prompts[row]]
        if not other_image:
            raise ValueError("a shuffled-prompt evaluation needs rows of at least two images")
        donors.append((differing or other_image)[0])
    return donors


class PromptVariant(torch.utils.data.Dataset):
    """An evaluation split with every row's prompt replaced (``shuffled`` or ``empty``)."""

    def __init__(self, dataset: ManifestDataset, variant: str) -> None:
        if variant not in PROMPT_VARIANTS[1:]:
            raise ValueError(f"prompt variant must be one of {PROMPT_VARIANTS[1:]}, got {variant!r}")
        self.dataset, self.variant = dataset, variant
        self.attr_columns = list(dataset.manifest.attr_columns)
        self.donors = shuffled_donors(dataset) if variant == "shuffled" else []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        if self.variant == "empty":
            cells = _empty_prompt(self.attr_columns)
        else:
            cells = _prompt_cells(self.dataset.manifest.table, self.donors[index], self.attr_columns)
        return self.dataset.sample(index, None, cells)


def prompt_variant(dataset: ManifestDataset, variant: str) -> torch.utils.data.Dataset:
    """``dataset`` with its true prompts (``true``), another image's (``shuffled``) or none (``empty``)."""
    return dataset if variant == "true" else PromptVariant(dataset, variant)


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
        collate = Collator(model.tokenizer, max_length=config.data.text_max_length)
        source, batch_size = dataset, config.data.batch_size
        if is_prompt_guided(model):
            if config.data.shards and config.data.prompts != type(config.data.prompts)():
                raise ValueError("data.prompts (grouped prompts, negatives, dropout) cannot read data.shards")
            source, collate, batch_size = prompt_training_data(
                dataset, config.data.prompts, config.data.mask, collate, config.data.batch_size
            )
        return TrainingPlan(
            SegmentTask(model, config.seg_loss, image_keys, config.data.mask),
            source,
            lambda m: evaluate_segmentation(m, manifest, config, image_keys, config.eval.split),
            collate=collate,
            batch_size=batch_size,
        )


def evaluate_segmentation(
    model: Any, manifest: Manifest, config: RunConfig, image_keys: list[str], split: str
) -> dict[str, Any]:
    """Per-image Dice/IoU (LViT/C2FVL protocol), pooled Dice, HD95, NSD on one split.

    A prompt-guided model is also evaluated with every row's prompt replaced by another
    image's (``shuffled``) and by the empty prompt (``empty``); ``prompt_ablation`` holds the
    three side by side (``true`` repeats the top-level numbers, which are the true prompt's).
    """
    from medalign.evaluation.metrics import SegmentationMetrics, without_rows

    dataset = segmentation_dataset(config, manifest, model, image_keys, split, augment=False)
    variants = PROMPT_VARIANTS if is_prompt_guided(model) else PROMPT_VARIANTS[:1]
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        loader = torch.utils.data.DataLoader(
            prompt_variant(dataset, variant),
            batch_size=config.data.eval_batch_size,
            collate_fn=Collator(model.tokenizer, max_length=config.data.text_max_length),
        )
        metrics = SegmentationMetrics()
        label = split if variant == "true" else f"{split}, {variant} prompts"
        for batch in progress(loader, desc=f"evaluate {label}"):
            metrics.update(
                predict_probabilities(model, batch, image_keys),
                batch[config.data.mask][:, 0].numpy(),
                batch["case_id"],
            )
        results[variant] = metrics.aggregate()
    out: dict[str, Any] = {"split": split, **results["true"]}
    if len(results) > 1:
        keep = ("dice", "iou", "pooled_dice", "n_images")
        out["prompt_ablation"] = {v: {k: without_rows(r)[k] for k in keep} for v, r in results.items()}
    return out


register_task(Segmentation())
