"""MM-EndoCL paired white-light (WLI) + narrow-band (NBI) endoscopy with tumour masks.

Accepted layout (``src`` holds the CSV files)::

    Training.csv, Val.csv, Test.csv     columns wli_path, nbi_path, label_path (paths relative
                                        to the CSV's folder); any subset of the three files, and
                                        any CSV named like a split (Train, Valid, Validation, ...)
    imgs/...                            wherever the CSV paths point

Columns: ``image:wli``, ``image:nbi`` (the two modalities of one case) and ``mask``; further CSV
columns are kept as ``attr:<lower-cased name>``. A row's key is its ``wli_path``; ``case_id`` is
the WLI file's stem without the release's ``_1`` modality suffix (``1_5965083906411_1.png`` ->
``1_5965083906411``). Nothing in the release names patients, so ``patient_id`` is the case id.

Splits come from the file names (Training -> train, Val -> val, Test -> test) when the files are
disjoint. The public demo release ships Training.csv and Test.csv with identical rows; trusting
them would evaluate on the training set, so as soon as any case is listed in two files, every
case is listed once and split with a seeded :func:`assign_splits` (default 0.7/0.1/0.2), and the
overlap is recorded in ``meta.extra["overlap_between_csvs"]``. A case listed twice with different
NBI or mask paths is an error: there is no way to know which is right.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import pandas as pd

from medalign.data.groups import SeededSplit
from medalign.data.importers.common import (
    DEFAULT_FRACTIONS,
    SPLIT_ALIASES,
    check_unique_ids,
    natural_key,
    sanitize_id,
)
from medalign.data.importers.options import seeded_split_help
from medalign.data.importers.registry import SEEDED_SPLIT_KEY, DatasetImportError, register_importer
from medalign.data.manifest import ManifestMeta, new_table, read_csv_text, relative_ref

REQUIRED = ("wli_path", "nbi_path", "label_path")
COLUMNS = {"wli_path": "image:wli", "nbi_path": "image:nbi", "label_path": "mask"}
DEFAULT_FILES = ("Training.csv", "Val.csv", "Test.csv")
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def _csv_files(src: Path, csv: str | None) -> list[Path]:
    if csv is not None:
        path = Path(csv) if Path(csv).is_absolute() else src / csv
        if not path.is_file():
            raise DatasetImportError(f"CSV '{path}' does not exist")
        return [path]
    files = [p for p in sorted(src.glob("*.csv")) if p.stem.lower() in SPLIT_ALIASES]
    if not files:
        raise DatasetImportError(
            f"no split CSV in '{src}': expected any of {', '.join(DEFAULT_FILES)} (or pass csv=<file>)"
        )
    return sorted(files, key=lambda p: _SPLIT_ORDER[SPLIT_ALIASES[p.stem.lower()]])


def _cell_ref(value: str, csv_path: Path, src: Path) -> str:
    """Path cell relative to ``src``; CSV paths are relative to the CSV's own folder."""
    if Path(value).is_absolute():
        return Path(value).as_posix()
    return relative_ref(csv_path.parent / value, src)


def _read(csv_path: Path, src: Path) -> list[dict[str, str]]:
    try:
        frame = read_csv_text(csv_path, DatasetImportError)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DatasetImportError(f"cannot read '{csv_path}': {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise DatasetImportError(
            f"'{csv_path}' lacks column(s) {missing}; it has {list(frame.columns)} (expected {', '.join(REQUIRED)})"
        )
    records = []
    for index, record in enumerate(frame.to_dict("records")):
        line = index + 2  # 1-based, after the header line
        cells = {k: str(v).strip() for k, v in record.items()}
        empty = [c for c in REQUIRED if not cells[c]]
        if empty:
            raise DatasetImportError(f"'{csv_path}' line {line}: empty {', '.join(empty)}")
        row = {COLUMNS[c]: _cell_ref(cells[c], csv_path, src) for c in REQUIRED}
        row |= {f"attr:{c.lower().replace(' ', '_')}": v for c, v in cells.items() if c not in REQUIRED}
        row["_line"] = str(line)
        records.append(row)
    return records


def _case_id(wli_ref: str) -> str:
    stem = PurePosixPath(wli_ref).stem
    return sanitize_id(stem[:-2] if stem.endswith("_1") and len(stem) > 2 else stem)


@register_importer(
    "mmendocl",
    "MM-EndoCL paired WLI+NBI endoscopy: Training/Val/Test.csv (wli_path, nbi_path, label_path)",
    {
        "csv": "read this one CSV (relative to SRC or absolute) instead of the split-named ones",
        **seeded_split_help(when="when the CSV files cannot give the split"),
    },
)
def import_mmendocl(
    src: Path,
    *,
    csv: str | None = None,
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
) -> tuple[pd.DataFrame, ManifestMeta]:
    """``csv`` reads one file only; ``seed``/``fractions`` apply when the files cannot give the split."""
    src = Path(src)
    files = _csv_files(src, csv)
    cases: dict[str, dict[str, str]] = {}
    listed_in: dict[str, list[str]] = {}
    for csv_path in files:
        split = SPLIT_ALIASES.get(csv_path.stem.lower(), "")
        name = relative_ref(csv_path, src)
        seen_here: dict[str, str] = {}
        for record in _read(csv_path, src):
            key, line = record["image:wli"], record.pop("_line")
            if key in seen_here:
                raise DatasetImportError(
                    f"'{csv_path}' line {line}: wli_path {key!r} is already listed on line {seen_here[key]}"
                )
            seen_here[key] = line
            if key in cases:
                if cases[key] != record | {"split": cases[key]["split"]}:
                    raise DatasetImportError(
                        f"'{csv_path}' line {line}: wli_path {key!r} is listed in {listed_in[key]} with other "
                        "NBI/mask paths or attributes"
                    )
                listed_in[key].append(name)
                continue
            cases[key] = record | {"split": split}
            listed_in[key] = [name]
    if not cases:
        raise DatasetImportError(f"no rows in {[str(f) for f in files]}")

    ids = {key: _case_id(key) for key in cases}
    clashing = {i for i in ids.values() if list(ids.values()).count(i) > 1}
    ids = {
        k: i if i not in clashing else sanitize_id(str(PurePosixPath(k).with_suffix("")))
        for k, i in ids.items()
    }
    rows = [{"case_id": ids[key], "patient_id": ids[key]} | record for key, record in cases.items()]
    rows.sort(key=lambda r: natural_key(r["case_id"]))
    check_unique_ids(rows, "image:wli", source=", ".join(f"'{f}'" for f in files))
    table = new_table(rows)
    overlap = {ids[k]: v for k, v in listed_in.items() if len(v) > 1}
    seeded: dict[str, object] = {}
    if overlap or any(r["split"] == "" for r in rows):
        plan = SeededSplit(fractions or DEFAULT_FRACTIONS, seed)
        table["split"] = plan.apply(table).to_numpy()
        split_source = f"assign_splits(seed={seed})"
        seeded[SEEDED_SPLIT_KEY] = plan.record()
    else:
        split_source = "csv file names"
    meta = ManifestMeta(
        description="MM-EndoCL paired WLI/NBI endoscopy with tumour masks",
        extra={
            "csv_files": [relative_ref(f, src) for f in files],
            "overlap_between_csvs": overlap,
            "split_source": split_source,
            **seeded,
        },
    )
    return table, meta
