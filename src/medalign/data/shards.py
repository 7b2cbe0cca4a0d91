"""WebDataset-format tar shards of a manifest, and the IterableDataset that trains from them.

A manifest reads one file per image at random positions, which is what a shared file system
of a cluster serves worst; shards turn that into a few large sequential reads. The layout is
WebDataset's, written with :mod:`tarfile` (plain tar files ``shard-000000.tar``, the files of
one sample adjacent and sharing a key), so the ``webdataset`` package reads them too:

* ``<key>.json``: every cell of the row except image/mask paths (case_id, split, text,
  labels, ``attr:*``, time/event, ...), as the manifest's strings;
* ``<key>.<field><ext>`` per image/mask column (``image:a`` -> field ``image-a``): the file's
  own bytes when the cell has no selector; when it has one (``#slice=``, ``#channel=``), the
  selected array as PNG (uint8 grey/RGB/RGBA, uint16 grey) or else ``.npy``, checked at write
  time to decode to the identical array;
* ``<key>.txt`` (the text) and ``<key>.<field>.cls`` per label column (class index in the
  manifest's class list) for WebDataset consumers.

The key is the manifest row number (9 digits). Rows are grouped by split, so a shard holds one
split and training reads only train shards. ``index.json`` lists the shards with their sample
counts and keeps the manifest's sidecar meta (class lists, mask threshold), its columns and its
splits. :class:`ShardDataset` decodes a sample with the same code as
:class:`~medalign.data.dataset.ManifestDataset`, so both give identical samples for a row.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medalign.data.dataset import DatasetConfig, ManifestDataset, Sample
from medalign.data.manifest import SPLITS, Manifest, ManifestMeta
from medalign.data.readers import (
    ImageData,
    ImageReadError,
    parse_image_ref,
    read_image,
    read_image_bytes,
    storage_suffix,
)

INDEX_NAME = "index.json"
INDEX_FORMAT = "medalign-shards"
INDEX_VERSION = 1
KEY_DIGITS = 9

RawSample = tuple[str, str, dict[str, bytes]]  # (shard file, key, member suffix -> bytes)


class ShardError(ValueError):
    """Shards cannot be written or read; the message names the folder, shard, row or column."""


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def field_name(column: str) -> str:
    """Member name part of a column: ``image:a`` -> ``image-a`` (tar names portable to any OS)."""
    return column.replace(":", "-")


def write_shards(manifest: Manifest, out: str | Path, shard_size: int, *, source: str = "") -> Path:
    """Write ``manifest`` as tar shards of at most ``shard_size`` samples into ``out``; returns the index.

    ``out`` must be empty or new: shards of an earlier run left beside new ones would be read too.
    """
    out = Path(out)
    if shard_size < 1:
        raise ShardError(f"shard size must be >= 1, got {shard_size}")
    if out.exists() and any(out.iterdir()):
        raise ShardError(f"'{out}' is not empty; write shards into a new or empty folder")
    fields = _fields(manifest)
    out.mkdir(parents=True, exist_ok=True)
    table = manifest.table
    shards: list[dict[str, Any]] = []
    splits: dict[str, Any] = {}
    for split, rows in _rows_by_split(table):
        subset = table.iloc[rows]
        splits[split] = {
            "samples": len(rows),
            "observed_classes": {c: _observed(subset[c]) for c in manifest.label_columns},
        }
        for start in range(0, len(rows), shard_size):
            chunk = rows[start : start + shard_size]
            name = f"shard-{len(shards):06d}.tar"
            _write_tar(out / name, manifest, fields, chunk)
            shards.append({"file": name, "split": split, "samples": len(chunk)})
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "source": source,
        "samples": len(table),
        "columns": list(table.columns),
        "fields": fields,
        "meta": {**asdict(manifest.meta), "root": "."},
        "observed_classes": {c: _observed(table[c]) for c in manifest.label_columns},
        "splits": splits,
        "shards": shards,
    }
    path = out / INDEX_NAME
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


def _fields(manifest: Manifest) -> dict[str, str]:
    columns = manifest.image_columns + manifest.mask_columns + manifest.label_columns
    fields = {c: field_name(c) for c in columns}
    names = list(fields.values())
    clashes = sorted({n for n in names if names.count(n) > 1 or n in ("json", "txt")})
    if clashes:
        raise ShardError(
            f"columns {sorted(c for c in fields if fields[c] in clashes)} give the same member names"
        )
    return fields


def _rows_by_split(table: Any) -> list[tuple[str, list[int]]]:
    """Row numbers per split (train, val, test, then others by name; "" when there is no split)."""
    if "split" not in table.columns:
        return [("", list(range(len(table))))]
    names = [s for s in SPLITS if s in set(table["split"])]
    names += sorted(set(table["split"]) - set(names))
    return [(name, [int(i) for i in np.flatnonzero(table["split"].to_numpy() == name)]) for name in names]


def _observed(values: Any) -> list[str]:
    """What ``Manifest.classes`` returns for a label column without declared classes."""
    return sorted(v for v in values.unique() if v != "")


def _write_tar(path: Path, manifest: Manifest, fields: dict[str, str], rows: list[int]) -> None:
    paths = manifest.image_columns + manifest.mask_columns
    classes = {c: manifest.classes(c) for c in manifest.label_columns}
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for index in rows:
            row = manifest.table.iloc[index]
            key = f"{index:0{KEY_DIGITS}d}"
            cells = {c: row[c] for c in manifest.table.columns if c not in paths}
            _add(tar, f"{key}.json", json.dumps(cells, ensure_ascii=False).encode())
            for column in paths:
                if row[column] != "":
                    suffix, data = _image_bytes(manifest, row[column], f"row {index + 1}, column '{column}'")
                    _add(tar, f"{key}.{fields[column]}{suffix}", data)
            if "text" in cells:
                _add(tar, f"{key}.txt", cells["text"].encode())
            for column, names in classes.items():
                if row[column] in names:
                    _add(tar, f"{key}.{fields[column]}.cls", str(names.index(row[column])).encode())
    tmp.replace(path)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: the same rows give the same bytes
    tar.addfile(info, io.BytesIO(data))


def _image_bytes(manifest: Manifest, cell: str, where: str) -> tuple[str, bytes]:
    """(suffix, bytes) of one image cell: the file itself, or the selected array encoded losslessly."""
    ref = manifest.resolve(cell)
    path, selectors = parse_image_ref(ref)
    try:
        if not selectors:
            return storage_suffix(path), path.read_bytes()
        array = read_image(ref).array
    except (OSError, ImageReadError) as err:
        raise ShardError(f"{where}: {err}") from err
    suffix, data = _encode(array)
    decoded = read_image_bytes(data, suffix).array
    if decoded.dtype != array.dtype or not np.array_equal(decoded, array):
        raise ShardError(
            f"{where}: the selected array {array.shape} {array.dtype} of '{cell}' does not survive "
            f"encoding as {suffix} (it would read back as {decoded.shape} {decoded.dtype})"
        )
    return suffix, data


def _encode(array: np.ndarray) -> tuple[str, bytes]:
    """PNG where it stores the array exactly and compactly, NumPy's .npy for everything else."""
    from PIL import Image

    buffer = io.BytesIO()
    png = (
        array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)))
    ) or (array.dtype == np.uint16 and array.ndim == 2)
    if png:
        Image.fromarray(array).save(buffer, format="PNG")
        return ".png", buffer.getvalue()
    np.save(buffer, array, allow_pickle=False)
    return ".npy", buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def read_shard_index(directory: str | Path) -> dict[str, Any]:
    """The folder's ``index.json``, checked: right format and every listed shard present."""
    path = Path(directory) / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ShardError(f"cannot read shard index '{path}': {err}") from err
    if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
        raise ShardError(f"'{path}' is not a {INDEX_FORMAT} index of version {INDEX_VERSION}")
    missing = [s["file"] for s in index["shards"] if not (Path(directory) / s["file"]).is_file()]
    if missing:
        raise ShardError(f"shard index '{path}' lists shards that are missing: {missing}")
    return index


def iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member suffix: bytes}) per sample, reading the tar sequentially (WebDataset's grouping)."""
    key, files = None, {}
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                member_key, _, suffix = name.partition(".")
                if member_key != key and files:
                    yield key, files
                    files = {}
                key = member_key
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file always has a handle
                files[suffix] = handle.read()
    except tarfile.TarError as err:
        raise ShardError(f"corrupt shard '{path}': {err}") from err
    if files:
        yield key, files


class ShardDataset(torch.utils.data.IterableDataset):
    """The samples of one split of a shard folder, as :class:`ManifestDataset` gives them for its rows.

    Each epoch the split's shards go to ranks, then to DataLoader workers: whole shards when
    there are at least as many shards as readers, every n-th sample otherwise. Ranks see the
    same number of samples (a rank with fewer repeats its first ones, as ``DistributedSampler``
    pads), so distributed steps stay in lockstep; nothing is dropped. With ``shuffle``, the shard
    order is permuted per epoch (seeded by ``seed`` and the epoch) and samples pass through a
    shuffle buffer of ``buffer`` samples. ``resample`` instead draws shards with replacement,
    each reader its own stream, ``ceil(samples / ranks)`` per rank and epoch: for multi-node runs
    whose shards do not divide evenly. Augmentation is seeded per sample from (seed, epoch,
    reader, position), so a run does not depend on worker scheduling.
    """

    def __init__(
        self,
        directory: str | Path,
        config: DatasetConfig | None = None,
        split: str | None = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
        buffer: int = 256,
        resample: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.index = read_shard_index(self.directory)
        if split is not None and split not in self.index["splits"]:
            raise ShardError(
                f"'{self.directory}' has no split {split!r}; it has {sorted(self.index['splits'])}"
            )
        self.split = split
        self.shards = [s for s in self.index["shards"] if split is None or s["split"] == split]
        self.seed, self.shuffle, self.buffer, self.resample = seed, shuffle, buffer, resample
        self.rank, self.world_size, self.epoch = 0, 1, 0
        self.template = ManifestDataset(self._columns_manifest(), config or DatasetConfig())
        self._paths = self.template.image_keys + self.template.mask_keys

    @classmethod
    def like(
        cls, dataset: ManifestDataset, directory: str | Path, split: str | None, **kwargs: Any
    ) -> ShardDataset:
        """The shard version of ``dataset``: the same columns, preprocessing and augmentation."""
        return cls(directory, dataset.config, split, **kwargs)

    def _columns_manifest(self) -> Manifest:
        """A manifest without rows that carries the columns, sidecar meta and this split's classes."""
        import pandas as pd

        observed = (
            self.index["splits"][self.split]["observed_classes"]
            if self.split
            else self.index["observed_classes"]
        )
        meta = ManifestMeta.from_dict(self.index["meta"])
        meta.classes = {**observed, **meta.classes}
        return Manifest(pd.DataFrame(columns=self.index["columns"]), self.directory, meta)

    @property
    def image_keys(self) -> list[str]:
        return self.template.image_keys

    @property
    def classes(self) -> list[str]:
        return self.template.classes

    @property
    def total(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_distributed(self, rank: int, world_size: int) -> None:
        """This process's rank among ``world_size``; the engine calls it before iterating."""
        if self.total < world_size:
            raise ShardError(f"{self.total} samples in '{self.directory}' cannot feed {world_size} ranks")
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        """Samples per rank and epoch (every rank gets the same number)."""
        if self.resample:
            return math.ceil(self.total / self.world_size)
        return max(self._count(*self._rank_plan(r)) for r in range(self.world_size))

    # -- who reads what -----------------------------------------------------------------------------

    def _rank_plan(self, rank: int) -> tuple[list[int], int, int]:
        """(shards, stride, residue): the rank reads these shards and keeps samples ``i % stride == residue``."""
        n, world = len(self.shards), self.world_size
        if n >= world:
            return list(range(rank, n, world)), 1, 0
        return list(range(n)), world, rank

    def _worker_plan(self, worker: int, workers: int) -> tuple[list[int], int, int]:
        shards, stride, residue = self._rank_plan(self.rank)
        if self.shuffle:  # the same permutation on every rank, so sample strides still partition
            shards = [
                shards[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            ]
        if stride == 1 and len(shards) >= workers:
            return shards[worker::workers], 1, 0
        return shards, stride * workers, residue + worker * stride

    def _count(self, shards: list[int], stride: int, residue: int) -> int:
        total = sum(self.shards[i]["samples"] for i in shards)
        return max(0, (total - residue + stride - 1) // stride)

    def _padding(self, worker: int, workers: int) -> int:
        """How many of its first samples this worker repeats so that its rank reaches ``len(self)``."""
        counts = [self._count(*self._worker_plan(w, workers)) for w in range(workers)]
        extra = len(self) - sum(counts)
        readers = [w for w in range(workers) if counts[w] > 0]
        if worker not in readers:
            return 0
        position = readers.index(worker)
        return extra // len(readers) + (position < extra % len(readers))

    # -- iteration ----------------------------------------------------------------------------------

    def _read(self, shards: list[int], stride: int, residue: int) -> Iterator[RawSample]:
        counter = 0
        for i in shards:
            name = self.shards[i]["file"]
            for key, files in iter_tar(self.directory / name):
                if counter % stride == residue:
                    yield name, key, files
                counter += 1

    def _resampled(self, worker: int, workers: int) -> Iterator[RawSample]:
        per_rank = len(self)
        quota = per_rank // workers + (worker < per_rank % workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 2])

        def draws() -> Iterator[RawSample]:
            while True:
                name = self.shards[int(rng.integers(len(self.shards)))]["file"]
                for key, files in iter_tar(self.directory / name):
                    yield name, key, files

        return islice(draws(), quota)

    def _stream(self, worker: int, workers: int) -> Iterator[RawSample]:
        if self.resample:
            return self._resampled(worker, workers)
        plan = self._worker_plan(worker, workers)
        padding = self._padding(worker, workers)
        repeats = islice(chain.from_iterable(self._read(*plan) for _ in range(padding)), padding)
        return chain(self._read(*plan), repeats)

    def _buffered(self, stream: Iterator[RawSample], rng: np.random.Generator) -> Iterator[RawSample]:
        """WebDataset's shuffle buffer: hold ``buffer`` samples, emit a random one as each arrives."""
        if not self.shuffle or self.buffer <= 1:
            yield from stream
            return
        held: list[RawSample] = []
        for item in stream:
            if len(held) < self.buffer:
                held.append(item)
                continue
            j = int(rng.integers(len(held)))
            held[j], item = item, held[j]
            yield item
        for j in rng.permutation(len(held)):
            yield held[j]

    def __iter__(self) -> Iterator[Sample]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.rank * workers + worker
        rng = np.random.default_rng([self.seed, self.epoch, reader, 1])
        for position, raw in enumerate(self._buffered(self._stream(worker, workers), rng)):
            seed = self.seed * 1_000_003 + self.epoch * 10_007 + reader * 7919 + position * 104_729
            yield self.decode(raw, seed % 2**31)

    def decode(self, raw: RawSample, seed: int | None = None) -> Sample:
        """One sample from its tar members, through :class:`ManifestDataset`'s loading code."""
        name, key, files = raw
        try:
            row: dict[str, Any] = json.loads(files["json"])
        except (KeyError, json.JSONDecodeError) as err:
            raise ShardError(f"shard '{name}', sample {key}: no readable {key}.json ({err})") from err
        for column in self._paths:
            field = self.index["fields"][column]
            row[column] = next((s for s in files if s.startswith(field + ".")), "")

        def read(column: str, suffix: str) -> ImageData:
            field = self.index["fields"][column]
            return read_image_bytes(files[suffix], suffix[len(field) :], name=f"{name}/{key}.{suffix}")

        arrays = self.template.preprocessed(self.template.load_arrays(row, int(key), read))
        if seed is not None:
            self.template.set_random_state(seed)
        return self.template.assemble(arrays, row, int(key))


def shard_summary(index: Mapping[str, Any]) -> str:
    """One line for the terminal: shards and samples per split."""
    parts = []
    for split, info in index["splits"].items():
        count = sum(1 for s in index["shards"] if s["split"] == split)
        parts.append(f"{split or 'all'}={info['samples']} in {count}")
    return f"{len(index['shards'])} shards, {index['samples']} samples (" + ", ".join(parts) + ")"
