"""Manifest -> torch Dataset, and the collate function that tokenises text.

A sample is a dict keyed like the manifest: ``image:<modality>`` tensors (C, H, W),
``mask`` (1, H, W) in {0, 1}, ``text``, ``label`` (class index, -1 when missing),
``attrs``, ``time``/``event`` and ``modalities_present`` (a bool per modality, so a case
with a missing modality still batches: its image is zeros and its flag is False).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medalign.data.manifest import Manifest
from medalign.data.readers import ImageData, ImageReadError, read_image
from medalign.data.transforms import (
    AugmentConfig,
    PreprocessConfig,
    build_augment,
    build_preprocess,
    eval_augment,
    mirror_words,
    to_channel_first,
)

if TYPE_CHECKING:
    from medalign.config import DataConfig

Sample = dict[str, Any]


class SampleError(RuntimeError):
    """Loading one sample failed; the message names the case, the column and the file."""


@dataclass(frozen=True)
class DatasetConfig:
    """Which columns to load and how; the defaults take every image column and ``mask``."""

    modalities: tuple[str, ...] | None = None  # image columns, e.g. ("image:wli", "image:nbi")
    mask: str | None = "mask"
    label: str | None = "label"
    channels: int | None = None  # force 1 (mean of RGB) or 3 (repeat gray) channels per modality
    # False: an image must already have `channels` channels (a bundle that does not record how its
    # images were converted; repeating grey could feed it the wrong thing)
    convert_channels: bool = True
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig | None = None  # None = no augmentation (val/test)
    cache: str | None = None  # None, "memory" or a folder for a persistent on-disk cache


class ManifestDataset(Dataset):
    """Cases of one manifest (optionally one split), loaded and transformed on access."""

    def __init__(
        self, manifest: Manifest, config: DatasetConfig = DatasetConfig(), split: str | None = None
    ) -> None:
        self.manifest = manifest.split(split) if split else manifest
        self.config = config
        table = self.manifest.table
        self.image_keys = list(config.modalities or self.manifest.image_columns)
        missing = [k for k in self.image_keys if k not in table.columns]
        if missing:
            raise KeyError(f"manifest has no column(s) {missing}; available: {self.manifest.image_columns}")
        self.mask_keys = [config.mask] if config.mask and config.mask in table.columns else []
        self.manifest.require_inside_root(self.image_keys + self.mask_keys)
        self.label_key = config.label if config.label and config.label in table.columns else None
        self.classes = self.manifest.classes(self.label_key) if self.label_key else []
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        preprocess = config.preprocess
        if self.mask_keys and self.manifest.meta.mask_threshold is not None:
            preprocess = PreprocessConfig(
                **{**preprocess.__dict__, "mask_threshold": self.manifest.meta.mask_threshold / 255}
            )
        self.preprocess = build_preprocess(self.image_keys, self.mask_keys, preprocess)
        self.augment = (
            build_augment(self.image_keys, self.mask_keys, config.augment)
            if config.augment
            else eval_augment(self.image_keys, self.mask_keys)
        )
        self._memory: dict[int, Sample] = {}
        self._disk = Path(config.cache) if config.cache and config.cache != "memory" else None
        if self._disk:
            self._disk.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.manifest)

    def set_random_state(self, seed: int) -> None:
        """Seed the augmentation stream (called per DataLoader worker by :func:`worker_init_fn`)."""
        self.augment.set_random_state(seed=seed % (2**32))

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        """``dataset[i]``, or ``dataset[i, seed]`` to draw this sample's augmentation from ``seed``.

        The seeded form lets the training engine make each augmentation a function of the
        sample's position in the run, so a resumed run sees exactly what the original saw.
        """
        index, seed = key if isinstance(key, tuple) else (key, None)
        return self.sample(index, seed)

    def sample(self, index: int, seed: int | None = None, cells: Mapping[str, Any] | None = None) -> Sample:
        """``dataset[index, seed]``, with the row's non-image ``cells`` replaced when given.

        The replaced cells (``text``, ``attr:*``) go through the same augmentation-aware
        assembly as the row's own: a prompt borrowed from another row is mirrored with the
        image like the row's own prompt would be.
        """
        if seed is not None:
            self.set_random_state(seed)
        row = self.manifest.table.iloc[index]  # looked up once: pandas row access costs ~0.1 ms
        try:
            arrays = self._preprocessed(index, row)
        except SampleError:
            raise
        except Exception as err:  # a decoded file that preprocessing rejects
            raise SampleError(
                f"{self._describe(index)}: {type(err).__name__}: {' '.join(str(err).split())}"
            ) from err
        if cells:
            row = row.copy()
            for column, value in cells.items():
                row[column] = value
        return self.assemble(arrays, row, index)

    def assemble(self, arrays: Sample, row: Mapping[str, Any], index: int) -> Sample:
        """The sample of a row from its preprocessed arrays: augmentation, absent modalities, row fields.

        Public so that a :class:`~medalign.data.shards.ShardDataset` builds its samples with
        exactly this code from the same row read out of a shard. A flip also flips the side
        words of the row's text and attribute values (:func:`mirror_words`).
        """
        try:
            sample, flips, dims = self.augment.apply(dict(arrays))
        except Exception as err:  # arrays that augmentation rejects: name the case
            raise SampleError(
                f"case {row['case_id']!r} (row {index + 1}): {type(err).__name__}: {' '.join(str(err).split())}"
            ) from err
        present = [k in arrays for k in self.image_keys]
        reference = next((sample[k] for k in self.image_keys if k in sample), None)
        for key in self.image_keys:
            if key not in sample and reference is not None:
                sample[key] = torch.zeros_like(reference)
        sample["modalities_present"] = torch.tensor(present, dtype=torch.bool)
        fields = self._row_fields(row)
        if flips:
            fields["text"] = mirror_words(fields["text"], flips, dims)
            fields["attrs"] = {
                k: mirror_words(v, flips, dims) if isinstance(v, str) else v
                for k, v in fields["attrs"].items()
            }
        sample.update(fields)
        return sample

    def case_id(self, index: int) -> str:
        """The case at ``index`` (the engine names it when a DataLoader worker dies)."""
        return str(self.manifest.table.iloc[index]["case_id"])

    def _describe(self, index: int) -> str:
        """``case 'x' (row 3), files [...]``: where a sample's error comes from."""
        row = self.manifest.table.iloc[index]
        files = [str(self.manifest.resolve(row[k])) for k in self.image_keys + self.mask_keys if row[k] != ""]
        return f"case {row['case_id']!r} (row {index + 1}), files {files}"

    def _row_fields(self, row: Mapping[str, Any]) -> Sample:
        fields: Sample = {"case_id": row["case_id"], "text": row.get("text", "")}
        if self.label_key:
            value = row[self.label_key]
            fields["label"] = self._class_index.get(value, -1) if value != "" else -1
        fields["attrs"] = {c.split(":", 1)[1]: row[c] for c in self.manifest.attr_columns}
        if row.get("time", "") != "":
            fields["time"] = float(row["time"])
            fields["event"] = float(row["event"])
        return fields

    def _preprocessed(self, index: int, row: Any) -> Sample:
        if index in self._memory:
            return self._memory[index]
        cache_file = self._cache_file(row) if self._disk else None
        if cache_file is not None and cache_file.is_file():
            with np.load(cache_file) as stored:
                arrays = {k: stored[k] for k in stored.files}
        else:
            raw = self.load_arrays(row, index, lambda _column, cell: read_image(self.manifest.resolve(cell)))
            arrays = self.preprocessed(raw)
            if cache_file is not None:
                tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npz")
                np.savez(tmp, **arrays)
                os.replace(tmp, cache_file)
        if self.config.cache == "memory":
            self._memory[index] = arrays
        return arrays

    def _cache_file(self, row: Any) -> Path:
        key = repr(
            ([row[k] for k in self.image_keys + self.mask_keys], self.config.preprocess, self.config.channels)
        )
        assert self._disk is not None
        return self._disk / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"

    def preprocessed(self, raw: Sample) -> Sample:
        """Resizing and normalisation of :meth:`load_arrays`'s arrays, as float32 numpy arrays."""
        return {k: np.asarray(v, dtype=np.float32) for k, v in self.preprocess(raw).items()}

    def load_arrays(
        self, row: Mapping[str, Any], index: int, read: Callable[[str, str], ImageData]
    ) -> Sample:
        """The row's images and masks, channels first; ``read(column, cell)`` gives a cell's image.

        The manifest reads files; a shard reads the cell's bytes from the tar, so both apply
        the same channel rules and raise the same errors (naming case, row and column).
        """
        arrays: Sample = {}
        for key in self.image_keys + self.mask_keys:
            cell = row[key]
            if cell == "":
                continue
            try:
                array = to_channel_first(read(key, cell).array)
            except ImageReadError as err:
                raise SampleError(
                    f"case {row['case_id']!r} (row {index + 1}), column '{key}': {err}"
                ) from err
            if key in self.image_keys and self.config.channels:
                if not self.config.convert_channels and array.shape[0] != self.config.channels:
                    raise SampleError(
                        f"case {row['case_id']!r} (row {index + 1}), column '{key}': {array.shape[0]} channel(s), "
                        f"the model takes exactly {self.config.channels} (its bundle does not record a conversion)"
                    )
                array = match_channels(array, self.config.channels)
            arrays[key] = array
        if not any(k in arrays for k in self.image_keys) and self.image_keys:
            raise SampleError(f"case {row['case_id']!r} (row {index + 1}) has no image in {self.image_keys}")
        return arrays


def dataset_for_model(
    manifest: Manifest,
    model: Any,
    split: str | None,
    label: str | None = None,
    image_keys: Sequence[str] | None = None,
    *,
    mask: str | None = None,
    data: DataConfig | None = None,
    augment: bool = False,
) -> ManifestDataset:
    """A split preprocessed for ``model``: its image size and its channels per stacked modality.

    ``data`` (a recipe's ``data:`` section) can override size and channels and supplies the
    normalisation, cache and augmentation settings, so training and evaluation of a run
    preprocess alike; without it the model's own input description is used. A model loaded
    from a bundle brings its input record (:mod:`medalign.bundle.inputs`): its columns are the default
    ``image_keys`` and its channels per modality and normalisation are used.
    """
    from medalign.config import DataConfig

    recorded = getattr(model, "bundle_inputs", None)
    if data is None:
        data = DataConfig(normalisation=recorded.normalisation) if recorded is not None else DataConfig()
    if image_keys is None:
        image_keys = recorded.columns_for(manifest.image_columns) if recorded is not None else None
    modalities = tuple(image_keys or manifest.image_columns[:1])
    per_modality = model.config.in_channels // len(modalities)
    if recorded is not None and recorded.layout != "unrecorded":
        per_modality = recorded.channels
    size = data.image_size or model.config.image_size
    augmentation = (
        AugmentConfig(
            flip_axes=tuple(data.flip_axes),
            rotate_degrees=data.rotate_degrees,
            scale=data.scale,
            translate=data.translate,
            intensity_shift=0.05,
        )
        if augment and data.augment
        else None
    )
    return ManifestDataset(
        manifest,
        DatasetConfig(
            modalities=modalities,
            mask=mask,
            label=label,
            channels=data.channels or per_modality,
            convert_channels=recorded is None or recorded.convert_channels,
            preprocess=PreprocessConfig(size=(size, size), normalisation=data.normalisation),
            augment=augmentation,
            cache=data.cache,
        ),
        split=split,
    )


def match_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Training's channel rule: RGB -> grey by the mean, grey repeated, RGBA -> RGB; else an error."""
    if array.shape[0] == channels:
        return array
    if channels == 1:
        return (
            array[:3]
            .mean(axis=0, keepdims=True)
            .astype(np.float32 if array.dtype.kind == "f" else array.dtype)
        )
    if array.shape[0] == 1:
        return np.repeat(array, channels, axis=0)
    if array.shape[0] == 4 and channels == 3:  # RGBA -> RGB
        return array[:3]
    raise ValueError(f"cannot convert {array.shape[0]} channels to {channels}")


class Collator:
    """Stacks tensors, keeps strings and dicts as lists, tokenises ``text`` when given a tokenizer.

    Tokenisation happens here (once per batch, in the worker) rather than in the model, so the
    training step receives ready ``input_ids``/``attention_mask`` tensors.
    """

    def __init__(self, tokenizer: Callable[..., Any] | None = None, max_length: int = 77) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: Sequence[Sample]) -> Sample:
        batch: Sample = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            if isinstance(values[0], torch.Tensor):
                shapes = {tuple(v.shape) for v in values}
                if len(shapes) > 1:
                    cases = [s["case_id"] for s in samples]
                    raise SampleError(
                        f"cannot batch '{key}': shapes {sorted(shapes)} differ across cases {cases}; "
                        "set a fixed preprocess size and DatasetConfig.channels"
                    )
                batch[key] = torch.stack(values)
            elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
                batch[key] = torch.tensor(values)
            else:
                batch[key] = values
        if self.tokenizer is not None and "text" in batch:
            tokens = self.tokenizer(
                list(batch["text"]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch["input_ids"] = tokens["input_ids"]
            batch["attention_mask"] = tokens["attention_mask"]
        return batch


def stack_modalities(batch: Sample, keys: Sequence[str]) -> torch.Tensor:
    """Early fusion for single-input models: the modalities' channels side by side, (B, sum C, H, W)."""
    return batch[keys[0]] if len(keys) == 1 else torch.cat([batch[k] for k in keys], dim=1)


def worker_init_fn(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream, derived from the loader's seed."""
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "set_random_state"):
        info.dataset.set_random_state(info.seed)


def make_loader(
    dataset: ManifestDataset,
    *,
    batch_size: int = 16,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    collate: Collator | None = None,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A seeded DataLoader: the same seed gives the same order and the same augmentations."""
    generator = torch.Generator().manual_seed(seed)
    if num_workers == 0:
        dataset.set_random_state(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate or Collator(),
        worker_init_fn=worker_init_fn,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
