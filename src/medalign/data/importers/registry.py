"""Importer registry: one function per source layout, all producing the same manifest.

An importer reads a dataset in the layout its authors released and returns a table whose
path cells are relative to the dataset folder plus the metadata it knows (class lists,
mask encoding). ``import_dataset`` writes it with ``root`` pointing at that folder, so the
data is referenced in place and never copied.

What every importer shares lives here, so it behaves the same whatever the layout: options are
checked against the importer's declared ones (:mod:`.options`), ``group_by``/``group_regex``
make patients of cases and redo a seeded split by patient (:mod:`medalign.data.groups`), the
sidecar's ``source``/``description`` name what was imported, and near-duplicate file stems
across splits are recorded.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medalign.data.groups import (
    GroupingError,
    SeededSplit,
    format_near_duplicates,
    format_ungrouped,
    group_ids,
    groups_across_splits,
    near_duplicate_stems,
)
from medalign.data.importers.options import (
    OptionError,
    OptionSpec,
    check_options,
    option_specs,
    parse_option_pairs,
)
from medalign.data.manifest import Manifest, ManifestMeta, read_manifest, write_manifest


class DatasetImportError(ValueError):
    """The source folder does not match the layout; the message names the file or row."""


ImporterFn = Callable[..., tuple[pd.DataFrame, ManifestMeta]]

# Options every importer takes; the registry applies them after the importer ran.
COMMON_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "group_by",
        "str",
        None,
        "column whose value is the patient/group of a case (e.g. a patient column of a label table); "
        "a seeded split keeps each group in one split",
        optional=True,
    ),
    OptionSpec(
        "group_regex",
        "str",
        None,
        "regex on the image file name whose named group 'group' (or first group) is the patient/sequence, "
        r"e.g. '^(seq\d+)_'; a seeded split keeps each group in one split",
        optional=True,
    ),
)
# Where an importer records the seeded split it used, so that grouping can redo it by patient.
SEEDED_SPLIT_KEY = "split_seeded"


@dataclass(frozen=True)
class ImporterSpec:
    name: str
    fn: ImporterFn
    description: str
    options: tuple[OptionSpec, ...] = ()
    writes_files: bool = False  # takes ``manifest_dir``: it writes files next to the output manifest

    @property
    def all_options(self) -> tuple[OptionSpec, ...]:
        return self.options + COMMON_OPTIONS

    def check(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Python keyword options, checked; an unknown one names the valid ones and the nearest."""
        try:
            return check_options(options, self.all_options, f"the {self.name!r} importer")
        except OptionError as err:
            raise DatasetImportError(str(err)) from err

    def parse_pairs(self, pairs: list[str]) -> dict[str, Any]:
        """Command-line ``name=value`` texts (``-O masks=masks -O recursive=true``), checked."""
        try:
            return parse_option_pairs(pairs, self.all_options, f"the {self.name!r} importer")
        except OptionError as err:
            raise DatasetImportError(str(err)) from err


IMPORTERS: dict[str, ImporterSpec] = {}


def register_importer(
    name: str, description: str, options: Mapping[str, str] | None = None
) -> Callable[[ImporterFn], ImporterFn]:
    """Register ``fn`` as format ``name``; ``options`` gives a one-line meaning per keyword option."""

    def decorate(fn: ImporterFn) -> ImporterFn:
        if name in IMPORTERS:
            raise ValueError(f"importer {name!r} registered twice")
        specs = option_specs(fn, options or {})
        clash = {s.name for s in specs} & {s.name for s in COMMON_OPTIONS}
        if clash:
            raise ValueError(f"importer {name!r} redefines the common option(s) {sorted(clash)}")
        writes_files = "manifest_dir" in inspect.signature(fn).parameters
        IMPORTERS[name] = ImporterSpec(name, fn, description, specs, writes_files)
        return fn

    return decorate


def list_importers() -> list[str]:
    return sorted(IMPORTERS)


def get_importer(name: str) -> ImporterSpec:
    """The importer of a format, or an error naming the formats and the nearest one."""
    if name not in IMPORTERS:
        close = difflib.get_close_matches(name, list_importers(), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetImportError(
            f"unknown import format {name!r}{hint}; choose one of {', '.join(list_importers())}"
        )
    return IMPORTERS[name]


def load_dataset(
    name: str, src: str | os.PathLike, *, out: str | os.PathLike | None = None, **options: Any
) -> Manifest:
    """Run an importer and return the manifest in memory (paths relative to the dataset folder).

    ``out`` is the manifest the result will be written to: importers that must write files
    (``medmnist`` extracts images) write them next to it.
    """
    spec = get_importer(name)
    checked = spec.check(options)
    given = {k: _jsonable(v) for k, v in checked.items()}
    group_by, group_regex = checked.pop("group_by", None), checked.pop("group_regex", None)
    src = Path(src)
    if not src.exists():
        raise DatasetImportError(f"source '{src}' does not exist")
    if spec.writes_files:
        checked["manifest_dir"] = Path(out).resolve().parent if out is not None else None
    table, meta = spec.fn(src, **checked)
    if group_by is not None or group_regex is not None:
        table = _apply_grouping(table, meta, group_by, group_regex)
    folder = src.resolve() if src.is_dir() else src.resolve().parent
    root = Path(meta.root) if Path(meta.root).is_absolute() else folder
    meta.root = str(root)
    meta.source = str(src.resolve())
    what = f"'{src.name}' imported with the {name!r} importer"
    meta.description = f"{what}: {meta.description}" if meta.description else what
    meta.extra["importer"] = {"format": name, "options": given}
    manifest = Manifest(table, base_dir=root, meta=meta)
    if manifest.rows_outside_root():
        # Only an importer option (llava image_folder, a mask folder given elsewhere, ...), a
        # folder of symbolic links or the release's own file lists put files outside the
        # dataset folder; the user asked for this import, and `data import` says so.
        manifest.meta.allow_outside_root = True
    near = near_duplicate_stems(manifest.table)
    if near:
        meta.extra["near_duplicate_stems_across_splits"] = [str(n) for n in near]
    return manifest


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _apply_grouping(
    table: pd.DataFrame, meta: ManifestMeta, group_by: str | None, group_regex: str | None
) -> pd.DataFrame:
    """``patient_id`` from the grouping; a seeded split is redone by group, a release split checked."""
    try:
        grouping = group_ids(table, group_by=group_by, group_regex=group_regex)
    except GroupingError as err:
        raise DatasetImportError(str(err)) from err
    table = table.copy()
    table["patient_id"] = grouping.groups.to_numpy()
    meta.extra["groups"] = {"source": grouping.source, "groups": int(grouping.groups.nunique())}
    if grouping.ungrouped:
        meta.extra["groups"]["ungrouped_cases"] = grouping.ungrouped
    seeded = meta.extra.get(SEEDED_SPLIT_KEY)
    if isinstance(seeded, Mapping):
        table["split"] = SeededSplit.from_record(seeded).apply(table, grouping.groups).to_numpy()
        meta.extra["split_source"] = f"{meta.extra.get('split_source', 'seeded split')}, by {grouping.source}"
    elif "split" in table.columns:
        spread = groups_across_splits(table, grouping.groups)
        if spread:
            meta.extra["groups_across_splits"] = spread
    return table


def import_dataset(name: str, src: str | os.PathLike, out: str | os.PathLike, **options: Any) -> Manifest:
    """Run an importer and write its manifest to ``out`` (CSV, JSONL or Parquet by suffix)."""
    manifest = load_dataset(name, src, out=out, **options)
    write_manifest(manifest, out, root=manifest.root)
    return read_manifest(out)


def import_warnings(meta: ManifestMeta) -> list[str]:
    """What an import found that can mislead a model or its scores, one line each."""
    lines = []
    near = meta.extra.get("near_duplicate_stems_across_splits")
    if near:
        lines.append(format_near_duplicates(near))
    groups = meta.extra.get("groups")
    if isinstance(groups, Mapping) and groups.get("ungrouped_cases"):
        lines.append(format_ungrouped(str(groups["source"]), list(groups["ungrouped_cases"])))
    spread = meta.extra.get("groups_across_splits")
    if spread:
        shown = ", ".join(f"{g} ({'/'.join(s)})" for g, s in list(spread.items())[:5])
        more = f" and {len(spread) - 5} more" if len(spread) > 5 else ""
        lines.append(f"the release split puts {len(spread)} group(s) in several splits: {shown}{more}")
    return lines


__all__ = [
    "COMMON_OPTIONS",
    "IMPORTERS",
    "DatasetImportError",
    "ImporterSpec",
    "get_importer",
    "import_dataset",
    "import_warnings",
    "list_importers",
    "load_dataset",
    "register_importer",
]
