"""The manifest: one table of cases that every importer writes and every task reads.

A manifest is a CSV, JSONL or Parquet table (one row per case) plus an optional sidecar
``<stem>.meta.json`` that records what a bare table cannot: the folder that relative paths
resolve against, the class list of each label column, whether the manifest is text-only, and
how masks are encoded. Cells are kept as strings in memory ("" = missing) so that nothing is
silently coerced (an id "007" keeps its zeros); typed values are parsed where they are used,
with errors that name the row. One exception is named, not silent: a label cell that spells a
missing value (``None``, ``NA``, ``nan``, ... see :data:`MISSING_LABELS`) is a missing label,
unless the sidecar declares it as a class.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from medalign.data.jsonio import read_jsonl, read_text
from medalign.data.readers import parse_image_ref

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".parquet")
IMAGE_PREFIX = "image"
MASK_PREFIX = "mask"
LABEL_PREFIX = "label"
ATTR_PREFIX = "attr:"
PLAIN_COLUMNS: tuple[str, ...] = ("case_id", "patient_id", "split", "text", "time", "event")
# Label cells that mean "no label" (what spreadsheets and pandas write for a missing value),
# unless the sidecar declares one of them as a class of that column.
MISSING_LABELS = frozenset({"", "None", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL"})


class ManifestError(ValueError):
    """A manifest (or its sidecar) cannot be read or written; the message names the file."""


@dataclass
class ManifestMeta:
    """What a bare table cannot say about itself; stored as ``<stem>.meta.json``.

    ``root`` is where relative paths point, stored relative to the manifest's folder when
    possible so that a manifest and its data can move together. Importers set it to the
    dataset folder so that the dataset is referenced in place, never copied.
    """

    root: str = "."
    classes: dict[str, list[str]] = field(default_factory=dict)
    text_only: bool = False
    source: str = ""
    mask_threshold: float | None = None
    description: str = ""
    # Path cells must stay inside ``root`` unless this is true (see Manifest.outside_root).
    allow_outside_root: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ManifestMeta:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        meta = cls(**{k: v for k, v in data.items() if k in known})
        meta.extra.update({k: data[k] for k in unknown})
        return meta


_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "root": str,
    "classes": dict,
    "text_only": bool,
    "source": str,
    "mask_threshold": (int, float, type(None)),
    "description": str,
    "extra": dict,
}


def _check_meta_types(data: Any) -> None:
    """The sidecar is hand-editable JSON: check each field's type before anything trusts it."""
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    for key, kind in _META_TYPES.items():
        value = data.get(key)
        if key in data and (
            not isinstance(value, kind) or (key == "mask_threshold" and isinstance(value, bool))
        ):
            raise TypeError(f"field '{key}' has the wrong type ({type(value).__name__}: {value!r})")
    for column, names in data.get("classes", {}).items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"classes of column '{column}' must be a list of strings, got {names!r}")


def _is_prefixed(column: str, prefix: str) -> bool:
    return column == prefix or column.startswith(prefix + ":")


@dataclass
class Manifest:
    """A table of cases plus the folder its relative paths resolve against."""

    table: pd.DataFrame
    base_dir: Path = field(default_factory=Path.cwd)
    meta: ManifestMeta = field(default_factory=ManifestMeta)
    _real_folders: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.table = normalise_table(self.table)
        self.base_dir = Path(self.base_dir)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def root(self) -> Path:
        """Folder that relative image/mask paths are resolved against."""
        root = Path(self.meta.root)
        return Path(os.path.normpath(root if root.is_absolute() else self.base_dir / root))

    @property
    def image_columns(self) -> list[str]:
        return [c for c in self.table.columns if _is_prefixed(c, IMAGE_PREFIX)]

    @property
    def mask_columns(self) -> list[str]:
        return [c for c in self.table.columns if _is_prefixed(c, MASK_PREFIX)]

    @property
    def label_columns(self) -> list[str]:
        return [c for c in self.table.columns if _is_prefixed(c, LABEL_PREFIX)]

    @property
    def attr_columns(self) -> list[str]:
        return [c for c in self.table.columns if c.startswith(ATTR_PREFIX)]

    @property
    def modalities(self) -> list[str]:
        """Modality names: ``image:flair`` -> ``flair``; a bare ``image`` column is ``image``."""
        return [c.split(":", 1)[1] if ":" in c else c for c in self.image_columns]

    def resolve(self, ref: str) -> str:
        """Absolute form of a path cell, keeping any ``#selector`` suffix untouched.

        Refuses a cell that points outside the root (``../../etc/passwd``, an absolute path
        elsewhere) unless the sidecar sets ``allow_outside_root``: a manifest from someone else
        must not be able to make training or prediction read arbitrary files of this machine.
        """
        if not ref:
            raise ValueError("empty path cell")
        if self.outside_root(ref):
            raise ManifestError(
                f"path {ref!r} points outside the manifest root '{self.root}'; set "
                '"allow_outside_root": true in the manifest sidecar if the data really lives there'
            )
        path = Path(ref)
        return str(path if path.is_absolute() else self.root / ref)

    def outside_root(self, ref: str) -> bool:
        """Whether a path cell leaves the root, and that is not allowed.

        A cell leaves it lexically (``..``, an absolute path elsewhere) or through a symbolic link:
        links are followed (the root's own as well), so a link inside the dataset folder that
        points at ``/etc`` is outside. ``allow_outside_root`` in the sidecar accepts both.
        """
        if self.meta.allow_outside_root:
            return False
        root = self.root
        target = Path(os.path.normpath(root / _ref_path(ref)))  # an absolute ref replaces the root
        if target != root and root not in target.parents:
            return True
        try:
            real_root, real = Path(self._realpath(str(root))), Path(self._real_file(target))
        except (OSError, ValueError):  # a NUL byte, a link loop: unreadable, and reading says so by name
            return False
        return real != real_root and real_root not in real.parents

    def _realpath(self, folder: str) -> str:
        """``os.path.realpath`` of a folder, cached: most cells of a manifest share a few folders."""
        if folder not in self._real_folders:
            self._real_folders[folder] = os.path.realpath(folder)
        return self._real_folders[folder]

    def _real_file(self, path: Path) -> str:
        real = os.path.join(self._realpath(str(path.parent)), path.name)
        return os.path.realpath(real) if os.path.islink(real) else real

    def rows_outside_root(self, columns: Sequence[str] | None = None) -> list[tuple[int, str, str]]:
        """``(row, column, cell)`` of every path cell outside the root (image and mask columns by default)."""
        columns = list(columns) if columns is not None else self.image_columns + self.mask_columns
        return [
            (row, column, cell)
            for column in columns
            for row, cell in enumerate(self.table[column])
            if cell and self.outside_root(cell)
        ]

    def require_inside_root(self, columns: Sequence[str] | None = None) -> None:
        """Raise naming the rows whose paths leave the root, before any of them is read."""
        outside = self.rows_outside_root(columns)
        if outside:
            ids = self.table["case_id"] if "case_id" in self.table.columns else [""] * len(self.table)
            shown = "; ".join(
                f"row {row + 1} (case_id={ids[row]}), column '{column}': {cell!r}"
                for row, column, cell in outside[:5]
            )
            more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
            raise ManifestError(
                f"{len(outside)} path cell(s) point outside the manifest root '{self.root}': {shown}{more}; "
                'set "allow_outside_root": true in the manifest sidecar if the data really lives there'
            )

    def subset(self, rows: pd.Series | np.ndarray | list[bool]) -> Manifest:
        return Manifest(
            self.table[np.asarray(rows, dtype=bool)].reset_index(drop=True), self.base_dir, self.meta
        )

    def split(self, name: str) -> Manifest:
        if "split" not in self.table.columns:
            raise ManifestError(f"manifest has no 'split' column; cannot select split {name!r}")
        return self.subset(self.table["split"] == name)

    def classes(self, column: str = "label") -> list[str]:
        """Declared classes of a label column, or the sorted observed values when none are declared.

        Observed values that mean "no label" (:data:`MISSING_LABELS`) are never classes.
        """
        if column in self.meta.classes:
            return list(self.meta.classes[column])
        values = self.table[column] if column in self.table.columns else pd.Series([], dtype=str)
        return sorted(v for v in values.unique() if v not in MISSING_LABELS)

    def missing_labels(self, column: str) -> pd.Series:
        """Rows of a label column without a label: an empty cell, or a missing-value word such as
        ``None`` or ``NA`` that the sidecar does not declare as a class of that column."""
        declared = set(self.meta.classes.get(column, []))
        missing = MISSING_LABELS - declared
        return self.table[column].isin(missing)


def _ref_path(ref: str) -> Path:
    """The file part of a path cell (without a ``#slice=..`` selector)."""
    try:
        return parse_image_ref(ref)[0]
    except ValueError:  # a malformed selector: reading reports it; the path check uses the cell as is
        return Path(ref)


def normalise_table(table: pd.DataFrame) -> pd.DataFrame:
    """All cells as stripped strings, missing as ""; integers written by JSON stay integral."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return str(int(value)) if not isinstance(value, bool) else str(value)
        if isinstance(value, (list, tuple)):
            return ";".join(str(v) for v in value)
        return str(value).strip()

    out = table.copy()
    out.columns = [str(c).strip() for c in out.columns]
    repeated = sorted({c for c in out.columns if list(out.columns).count(c) > 1})
    if repeated:  # a second column of the same name would shadow the first in every lookup
        raise ValueError(f"duplicate column name(s) {repeated} (after stripping spaces)")
    for column in out.columns:
        out[column] = [cell(v) for v in out[column].tolist()]
    return out.astype(object).reset_index(drop=True)


def meta_path_for(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(manifest_stem(path) + ".meta.json")


def manifest_stem(path: Path) -> str:
    name = path.name
    for suffix in MANIFEST_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ManifestError(
            f"'{path}': unsupported manifest format {suffix or '(none)'!r}; use one of {', '.join(MANIFEST_SUFFIXES)}"
        )
    return suffix


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest table and its sidecar (if any)."""
    path = Path(path)
    suffix = _check_suffix(path)
    if not path.is_file():
        raise ManifestError(f"manifest '{path}' does not exist")
    meta = _read_sidecar(meta_path_for(path))
    try:
        # Building the Manifest normalises every cell, which is where Arrow decodes Parquet strings
        # and where duplicate column names show up, so it belongs inside the try.
        return Manifest(_read_table(path, suffix), base_dir=path.parent.resolve(), meta=meta)
    except ManifestError:
        raise
    except UnicodeDecodeError as err:
        raise ManifestError(f"manifest '{path}' is not valid UTF-8 (byte {err.start}): {err.reason}") from err
    except (ValueError, KeyError, TypeError, pd.errors.ParserError, OSError, pa.ArrowException) as err:
        # KeyError/TypeError: pandas trusting a corrupt 'pandas' metadata block in a Parquet footer
        raise ManifestError(f"cannot parse manifest '{path}': {_describe(err)}") from err


def _read_sidecar(sidecar: Path) -> ManifestMeta:
    if not sidecar.is_file():
        return ManifestMeta()
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        _check_meta_types(data)  # a wrong type fails here, not deep in validation or training
        return ManifestMeta.from_dict(data)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
        raise ManifestError(f"cannot parse manifest sidecar '{sidecar}': {err}") from err


def _read_table(path: Path, suffix: str) -> pd.DataFrame:
    if suffix == ".csv":
        return read_csv_text(path, ManifestError)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    return pd.read_parquet(path)


def _describe(err: BaseException) -> str:
    """``KeyError: 'name'`` rather than a bare ``'name'``: the type says what kind of damage it is."""
    return str(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {err}"


def read_csv_text(path: Path, error: type[Exception]) -> pd.DataFrame:
    """A CSV as strings ("" for empty cells); bad UTF-8 is an ``error`` naming the line and byte."""
    text = read_text(path, error=error)
    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)


def _read_jsonl(path: Path) -> pd.DataFrame:
    """JSON lines without pandas' type guessing (which turns '*_time' columns into dates)."""
    return pd.DataFrame(read_jsonl(path, error=ManifestError))


def write_manifest(
    manifest: Manifest | pd.DataFrame,
    path: str | os.PathLike,
    *,
    meta: ManifestMeta | None = None,
    root: str | os.PathLike | None = None,
) -> Path:
    """Write table + sidecar atomically. ``root`` (absolute or cwd-relative) is stored relative to ``path``."""
    path = Path(path)
    suffix = _check_suffix(path)
    if isinstance(manifest, Manifest):
        table, meta = manifest.table, meta or manifest.meta
        if root is None and manifest.meta.root:
            root = manifest.root
    else:
        table, meta = normalise_table(manifest), meta or ManifestMeta()
    meta = ManifestMeta.from_dict(asdict(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    if root is not None:
        meta.root = _relative_or_absolute(Path(root), path.parent)
    tmp = path.with_name(path.name + ".tmp")
    if suffix == ".csv":
        # csv quotes only cells holding the "\n" terminator, and readers split rows on a bare "\r"
        # too: a report with a carriage return would become two rows unless every cell is quoted.
        has_cr = any(table[c].str.contains("\r", regex=False).any() for c in table.columns)
        table.to_csv(
            tmp, index=False, encoding="utf-8", quoting=csv.QUOTE_ALL if has_cr else csv.QUOTE_MINIMAL
        )
    elif suffix == ".jsonl":
        table.to_json(tmp, orient="records", lines=True, force_ascii=False)
    else:
        table.astype(str).to_parquet(tmp, index=False)
    os.replace(tmp, path)
    sidecar = meta_path_for(path)
    sidecar_tmp = sidecar.with_name(sidecar.name + ".tmp")
    sidecar_tmp.write_text(json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(sidecar_tmp, sidecar)
    return path


def _relative_or_absolute(target: Path, start: Path) -> str:
    target, start = target.resolve(), start.resolve()
    try:
        return os.path.relpath(target, start)
    except ValueError:  # different drives on Windows
        return str(target)


def relative_ref(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """Path cell for ``path`` relative to ``root`` with forward slashes (portable across OSes)."""
    return Path(os.path.relpath(Path(path), Path(root))).as_posix()


def assign_splits(
    table: pd.DataFrame,
    fractions: Mapping[str, float] | Sequence[float] | None = None,
    *,
    seed: int = 0,
    patient_column: str = "patient_id",
    stratify: str | None = None,
    groups: pd.Series | None = None,
) -> pd.Series:
    """Patient-level split: every case of a patient lands in the same split.

    ``groups`` (one value per row) replaces the patient column: the groups that
    :func:`medalign.data.groups.group_ids` makes from another column or from file names.

    Deterministic for a given seed and set of patients (row order does not matter: patients are
    sorted before the seeded shuffle). Counts per split are exact (largest remainder), so small
    datasets get the fractions as closely as whole patients allow. With ``stratify`` the
    patients are grouped by their most frequent value of that column and each group is split
    on its own, which keeps rare classes in every split.
    """
    if fractions is not None and not isinstance(fractions, Mapping):
        fractions = dict(zip(SPLITS, fractions, strict=True))  # [0.7, 0.1, 0.2] from the CLI
    fractions = dict(fractions or {"train": 0.7, "val": 0.1, "test": 0.2})
    if any(f < 0 for f in fractions.values()) or not np.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    if groups is not None:
        patients = pd.Series(groups.to_numpy(), index=table.index).astype(str)
    else:
        patients = table[patient_column] if patient_column in table.columns else table["case_id"]
    patients = patients.where(patients != "", table["case_id"])
    if stratify:
        strata = table.groupby(patients)[stratify].agg(_most_frequent)
    else:
        strata = pd.Series("", index=sorted(patients.unique()))
    assignment: dict[str, str] = {}
    for stratum_index, stratum in enumerate(sorted(strata.unique())):
        members = sorted(strata.index[strata == stratum])
        rng = np.random.default_rng([seed, stratum_index])
        order = [members[i] for i in rng.permutation(len(members))]
        for name, chunk in zip(fractions, _exact_counts(len(order), list(fractions.values())), strict=True):
            for patient in order[:chunk]:
                assignment[patient] = name
            order = order[chunk:]
    return patients.map(assignment).rename("split")


def _most_frequent(values: pd.Series) -> str:
    """The patient's stratum; a tie goes to the smallest value, not the first row, so row order never matters."""
    counts = values.value_counts()
    return str(min(counts.index[counts == counts.max()]))


def _exact_counts(n: int, fractions: list[float]) -> list[int]:
    raw = np.asarray(fractions) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def new_table(rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None) -> pd.DataFrame:
    """Build a manifest table from row dicts, with the contract's columns first."""
    table = pd.DataFrame(list(rows))
    if columns is not None:
        table = table.reindex(columns=columns)
    ordered = [c for c in ("case_id", "patient_id", "split") if c in table.columns]
    ordered += [c for c in table.columns if _is_prefixed(c, IMAGE_PREFIX)]
    ordered += [c for c in table.columns if _is_prefixed(c, MASK_PREFIX)]
    ordered += [c for c in table.columns if c not in ordered]
    return normalise_table(table[ordered])


def summarize(manifest: Manifest) -> dict[str, Any]:
    """Counts a person checks first: cases, patients, splits, modalities, labels, attributes, survival."""
    table = manifest.table
    summary: dict[str, Any] = {
        "cases": len(table),
        "source": manifest.meta.source or "",
        "modalities": manifest.modalities,
    }
    if "patient_id" in table.columns:
        fallback = (
            table["case_id"] if "case_id" in table.columns else ""
        )  # validation reports a missing case_id
        patients = table["patient_id"].where(table["patient_id"] != "", fallback)
        summary["patients"] = int(patients[patients != ""].nunique())
    if "split" in table.columns:
        summary["splits"] = {s: int((table["split"] == s).sum()) for s in SPLITS}
    summary["masks"] = {c: int((table[c] != "").sum()) for c in manifest.mask_columns}
    if "text" in table.columns:
        texts = table["text"][table["text"] != ""]
        summary["texts"] = {
            "non_empty": len(texts),
            "mean_words": round(float(texts.str.split().str.len().mean()), 1) if len(texts) else 0.0,
        }
    missing = {c: manifest.missing_labels(c) for c in manifest.label_columns}
    summary["labels"] = {
        c: {k: int(v) for k, v in table[c][~missing[c]].value_counts().sort_index().items()}
        for c in manifest.label_columns
    }
    if manifest.label_columns:  # counted apart, so a missing label never reads as a class
        summary["missing_labels"] = {c: int(missing[c].sum()) for c in manifest.label_columns}
    summary["attributes"] = {c: int(table[c].nunique()) for c in manifest.attr_columns}
    if "time" in table.columns and "event" in table.columns:
        times = pd.to_numeric(table["time"], errors="coerce")
        events = pd.to_numeric(table["event"], errors="coerce")
        summary["survival"] = {
            "median_time": float(times.median()),
            "event_rate": round(float(events.mean()), 3),
        }
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable form of :func:`summarize` for the terminal."""
    lines = []
    for key, value in summary.items():
        if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            lines.append(f"{key}:")
            lines += [f"  {k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in value.items()]
        elif isinstance(value, Mapping):
            lines.append(f"{key}: " + (", ".join(f"{a}={b}" for a, b in value.items()) or "-"))
        elif isinstance(value, list):
            lines.append(f"{key}: " + (", ".join(map(str, value)) or "-"))
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
