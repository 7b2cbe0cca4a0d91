"""Which manifest columns a task reads, and the checks that a model fits them.

Shared by the task modules (and the HTML report, which re-reads a run's data the way its task
did): the recipe's image columns, a fusion model's columns in modality order, the per-modality
data section of models that take each modality as its own input, the class-count check of
classification heads and the modality subsets of a several-modality evaluation.
"""

from __future__ import annotations

from typing import Any

from medalign.config import RunConfig
from medalign.data.dataset import ManifestDataset
from medalign.data.manifest import Manifest


def image_columns(config: RunConfig, manifest: Manifest) -> list[str]:
    """The recipe's modalities (stacked as channels when several), else the first image column."""
    if config.data.modality_rows:
        return ["image"]
    if config.data.modalities:
        missing = [m for m in config.data.modalities if m not in manifest.image_columns]
        if missing:
            raise ValueError(
                f"data.modalities {missing} are not columns of the manifest ({manifest.image_columns})"
            )
        return list(config.data.modalities)
    if not manifest.image_columns:
        raise ValueError("the manifest has no image column")
    return manifest.image_columns[:1]


def fusion_columns(config: RunConfig, manifest: Manifest, model: Any) -> list[str]:
    """The image columns of a fusion model, position by position with ``model.config.modalities``.

    ``data.modalities`` when the recipe names them, else ``image:<name>`` for every modality name.
    """
    names = list(model.config.modalities)
    if config.data.modalities:
        keys = image_columns(config, manifest)
    else:
        keys = [f"image:{name}" for name in names]
        missing = [k for k in keys if k not in manifest.image_columns]
        if missing:
            raise ValueError(
                f"the model's modalities {names} need columns {missing}, which the manifest lacks "
                f"({manifest.image_columns}); set data.modalities to the columns to use, in model order"
            )
    if len(keys) != len(names):
        raise ValueError(f"data.modalities {keys} must list one column per model modality {names}, in order")
    return keys


def per_modality_data(config: RunConfig, model: Any) -> Any:
    """The recipe's data section for models that take each modality as its own input of one
    tower (MAE, clinical): ``in_channels`` channels per modality, not the stacked total."""
    import dataclasses

    return dataclasses.replace(config.data, channels=config.data.channels or model.config.in_channels)


def check_num_classes(dataset: ManifestDataset, num_classes: int, label: str | None) -> None:
    """A classification head must have one output per class of the label column."""
    if len(dataset.classes) != num_classes:
        raise ValueError(
            f"column {label!r} has {len(dataset.classes)} classes {dataset.classes}; "
            f"set model.overrides.num_classes to {len(dataset.classes)}"
        )


def modality_subsets(names: list[str]) -> list[tuple[int, ...]]:
    """Every non-empty subset of modality indices: singles first, the full set last."""
    import itertools

    return [s for r in range(1, len(names) + 1) for s in itertools.combinations(range(len(names)), r)]


def stacked_columns(config: RunConfig, manifest: Manifest, model: Any) -> list[str]:
    """:func:`image_columns` for a model that stacks them as channels of one input."""
    image_keys = image_columns(config, manifest)
    if model.config.in_channels % len(image_keys):
        raise ValueError(
            f"model in_channels={model.config.in_channels} cannot hold {len(image_keys)} stacked modalities"
        )
    return image_keys
