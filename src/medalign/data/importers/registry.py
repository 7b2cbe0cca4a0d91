"""Importer registry: one function per source layout, all producing the same manifest.

An importer reads a dataset in the layout its authors released and returns a table whose
path cells are relative to the dataset folder plus the metadata it knows (class lists,
mask encoding). ``import_dataset`` writes it with ``root`` pointing at that folder, so the
data is referenced in place and never copied.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medalign.data.manifest import Manifest, ManifestMeta, read_manifest, write_manifest


class DatasetImportError(ValueError):
    """The source folder does not match the layout; the message names the file or row."""


ImporterFn = Callable[..., tuple[pd.DataFrame, ManifestMeta]]


@dataclass(frozen=True)
class ImporterSpec:
    name: str
    fn: ImporterFn
    description: str


IMPORTERS: dict[str, ImporterSpec] = {}


def register_importer(name: str, description: str) -> Callable[[ImporterFn], ImporterFn]:
    def decorate(fn: ImporterFn) -> ImporterFn:
        if name in IMPORTERS:
            raise ValueError(f"importer {name!r} registered twice")
        IMPORTERS[name] = ImporterSpec(name, fn, description)
        return fn

    return decorate


def list_importers() -> list[str]:
    return sorted(IMPORTERS)


def load_dataset(name: str, src: str | os.PathLike, **options: Any) -> Manifest:
    """Run an importer and return the manifest in memory (paths relative to ``src``)."""
    if name not in IMPORTERS:
        raise DatasetImportError(
            f"unknown import format {name!r}; choose one of {', '.join(list_importers())}"
        )
    src = Path(src)
    if not src.exists():
        raise DatasetImportError(f"source '{src}' does not exist")
    table, meta = IMPORTERS[name].fn(src, **options)
    meta.source = meta.source or name
    meta.root = str(src.resolve())
    manifest = Manifest(table, base_dir=src.resolve(), meta=meta)
    if manifest.rows_outside_root():
        # Only an importer option (medmnist extract_dir, llava image_folder, ...) or the release's
        # own file lists put files outside the dataset folder; the user asked for this import.
        manifest.meta.allow_outside_root = True
    return manifest


def import_dataset(name: str, src: str | os.PathLike, out: str | os.PathLike, **options: Any) -> Manifest:
    """Run an importer and write its manifest to ``out`` (CSV, JSONL or Parquet by suffix)."""
    manifest = load_dataset(name, src, **options)
    write_manifest(manifest, out, root=Path(src).resolve())
    return read_manifest(out)
