"""The generic importer: images in one folder, masks in another, labels in a table, your names.

For datasets no dedicated importer was written for (an ultrasound set with ``images/``,
``masks/`` and a header-less diagnosis table; a colonoscopy set with ``Original/`` and
``Ground Truth/``)::

    medalign data import images SRC -o cases.csv -O images=Original -O "masks=Ground Truth"
    medalign data import images SRC -o cases.csv -O images=imgs -O labels=diagnosis.xlsx \\
        -O header=no -O id_column=1 -O label_columns=3 -O group_by=2

(options are ``-O name=value``; here they are named without it). Matching. An image's *key*
is its path below ``images`` without the suffix (``case7`` or, with ``recursive``,
``patient3/case7``). A mask matches the image whose key is the mask's with
``mask_prefix``/``mask_suffix`` removed (``mask_case7.png`` with ``mask_prefix=mask_``).
``masks`` may name the image folder itself when masks lie next to their images
(``case7.png`` beside ``case7_mask.png``): a file named by the rule is then a mask.
A label-table row matches by its id cell: the key, the key plus an image suffix, a path that
ends in one of them (``images/case7.png``), or (recursive) the bare file stem when only one
image has it.

Label table (CSV, TSV, TXT or XLSX; ``header=auto|yes|no``): ``id_column`` and
``label_columns`` name columns by header or by 1-based position. One label column becomes
``label``; several become ``label:<name>``. ``map_values`` renames values first (``1=benign``;
``None=`` makes a value missing), then a row whose value is in ``drop_values`` is left out
with its image, and a value in ``missing_values`` (default: the words tools write for a
missing value, ``None``, ``NA``, ``nan``, ...) is an empty, missing label: counted and listed,
never a class. Other columns are kept as ``attr:<name>``, so ``group_by=<column>`` can make
patients of them.

Splits: ``split_column`` (a column of the label table), ``split_file`` (``<id>,<split>``
lines), or the seeded patient-level splitter (``fractions``, ``seed``; stratified by the
label when there is one). ``group_by``/``group_regex`` (every importer has them) redo that
split by patient.

Nothing is dropped silently. Each input (image files, mask files, label rows, split-file rows)
is accounted for in ``extra["import_report"]``: every item is imported or listed with its reason
(a mask without image, a label row without image, a value dropped on request, a file that is
not an image, a subfolder not searched), and rows imported without their mask or label are
listed as incomplete. ``medalign data import`` prints the same report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from medalign.data.groups import SeededSplit
from medalign.data.importers.common import (
    DEFAULT_FRACTIONS,
    IMAGE_SUFFIXES,
    SPLIT_ALIASES,
    check_unique_ids,
    is_image,
    mask_threshold_for,
    natural_key,
    sanitize_id,
    split_suffix,
    strip_image_suffix,
)
from medalign.data.importers.ledger import REPORT_KEY, Ledger
from medalign.data.importers.registry import SEEDED_SPLIT_KEY, DatasetImportError, register_importer
from medalign.data.importers.tables import Table, TableRow, looks_like_header, make_table, read_rows
from medalign.data.manifest import MISSING_LABELS, ManifestMeta, new_table, relative_ref

MISSING_WORDS: tuple[str, ...] = tuple(sorted(MISSING_LABELS - {""}))
SHOWN_NAMES = 5  # file names shown in a note before "..."

OPTIONS: dict[str, str] = {
    "images": "folder of the images, relative to SRC or absolute (default: SRC itself)",
    "masks": "folder of the masks, matched to images by file stem (relative to SRC or absolute); "
    "the image folder itself when masks lie next to their images (then mask_prefix/mask_suffix tell them apart)",
    "recursive": "also search subfolders of the image and mask folders (keys keep the subfolder)",
    "mask_prefix": "text before the image stem in a mask's name, e.g. mask_ for mask_case7.png",
    "mask_suffix": "text after the image stem in a mask's name, e.g. _mask for case7_mask.png",
    "labels": "label table (.csv, .tsv, .txt or .xlsx) with one row per image",
    "sheet": "sheet of an .xlsx label table (default: the first)",
    "header": "whether the label table's first row is a header (auto: guessed, and reported)",
    "id_column": "label-table column holding the image id (file name or stem): header name or 1-based position",
    "label_columns": "label-table column(s) to import as labels (default: the only other column)",
    "map_values": "rename label values before anything else, e.g. 1=benign,2=malignant (None= makes it missing)",
    "drop_values": "label values whose rows (and images) are left out, each listed in the import report",
    "missing_values": "label values that mean 'no label': kept as missing, never a class",
    "split_column": "label-table column holding train/val/test",
    "split_file": "file of <id>,<split> lines (CSV/TSV/TXT/XLSX) giving each image's split",
    "fractions": "train,val,test fractions of the seeded split, default 0.7,0.1,0.2 (without a split column or file)",
    "seed": "seed of the patient-level split (without a split column or file)",
}


@dataclass
class _Case:
    """One image and what joined it; usage is counted once, when rows are written (``_rows``)."""

    key: str
    image: Path
    mask: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, str] = field(default_factory=dict)
    label_row: str = ""  # where its label-table row is ("labels.csv line 7"), if it has one
    split_row: str = ""  # where its split-file row is, if it has one
    split: str = ""
    dropped: str = ""  # why it is left out, once it is


def _folder(src: Path, value: str, option: str) -> Path:
    folder = Path(value) if Path(value).is_absolute() else src / value
    if not folder.is_dir():
        raise DatasetImportError(f"{option} folder '{folder}' does not exist")
    return folder


def _key(path: Path, folder: Path) -> str:
    return relative_ref(path.parent / split_suffix(path.name)[0], folder)


def _list_files(folder: Path, recursive: bool, exclude: set[str], src: Path, ledger: Ledger) -> list[Path]:
    """Every file of ``folder`` (and, ``recursive``, of its subfolders) in natural order.

    Subfolders that are not searched are noted, so a forgotten ``recursive`` shows.
    """
    files: list[Path] = []
    subfolders: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        kept = [d for d in dirnames if os.path.realpath(here / d) not in exclude]
        if not recursive:
            subfolders += kept
            kept = []
        dirnames[:] = kept
        files += [here / name for name in filenames if os.path.realpath(here / name) not in exclude]
    files.sort(key=lambda p: natural_key(p.relative_to(folder).as_posix()))
    if subfolders:
        shown = ", ".join(sorted(subfolders)[:5]) + (", ..." if len(subfolders) > 5 else "")
        where = relative_ref(folder, src)
        ledger.note(
            f"{len(subfolders)} subfolder(s) of '{where}' not searched: {shown} (pass -O recursive=true)"
        )
    return files


def _image_files(
    files: list[Path], folder: Path, src: Path, ledger: Ledger, what: str, label: str
) -> list[Path]:
    """The image files among ``files``, declared as input ``what``; every other file is skipped with its reason."""
    ledger.add_input(what, label, len(files))
    for path in files:
        if _hidden(path, folder):
            ledger.skip(what, relative_ref(path, src), "hidden file")
        elif not is_image(path):
            ledger.skip(what, relative_ref(path, src), "not an image file (by its suffix)")
    return [p for p in files if is_image(p) and not _hidden(p, folder)]


def _scan(
    folder: Path, recursive: bool, exclude: set[str], src: Path, ledger: Ledger, what: str
) -> list[Path]:
    """Image files of ``folder``, which holds only ``what`` (images or masks)."""
    files = _list_files(folder, recursive, exclude, src, ledger)
    return _image_files(
        files, folder, src, ledger, what, f"{what[:-1]} files in '{relative_ref(folder, src)}'"
    )


def _mask_core(path: Path, folder: Path, prefix: str, suffix: str) -> str | None:
    """The image key a file named ``<prefix><image stem><suffix>`` belongs to, else None."""
    parent, _, stem = _key(path, folder).rpartition("/")
    if not (stem.startswith(prefix) and stem.endswith(suffix) and len(stem) > len(prefix) + len(suffix)):
        return None
    core = stem[len(prefix) : len(stem) - len(suffix)]
    return f"{parent}/{core}" if parent else core


def _scan_shared(
    folder: Path, recursive: bool, exclude: set[str], prefix: str, suffix: str, src: Path, ledger: Ledger
) -> tuple[list[Path], list[Path]]:
    """(image files, mask files) of one folder that holds both (``case7.png`` next to ``case7_mask.png``).

    A file named by the mask rule is a mask, even without its image (then it is listed as a mask
    without image, never imported as an image). Images whose name holds the rule's text
    elsewhere (``case7_mask_2.png`` for ``_mask``) stay images, and the import says so.
    """
    if not (prefix or suffix):
        raise DatasetImportError(
            "the images and masks options name the same folder: give mask_prefix or mask_suffix to tell "
            "the masks from the images (e.g. -O mask_suffix=_mask for case7.png next to case7_mask.png)"
        )
    files = _list_files(folder, recursive, exclude, src, ledger)
    named = {p for p in files if _mask_core(p, folder, prefix, suffix) is not None}
    where = relative_ref(folder, src)
    images = _image_files(
        [p for p in files if p not in named], folder, src, ledger, "images", f"image files in '{where}'"
    )
    rule = f"{prefix}<stem>{suffix}"
    masks = _image_files(
        [p for p in files if p in named], folder, src, ledger, "masks", f"mask files ({rule}) in '{where}'"
    )
    lookalike = [
        p for p in images if any(t and t in _key(p, folder).rpartition("/")[2] for t in (prefix, suffix))
    ]
    if lookalike:
        shown = ", ".join(relative_ref(p, src) for p in lookalike[:SHOWN_NAMES])
        more = ", ..." if len(lookalike) > SHOWN_NAMES else ""
        ledger.note(
            f"{len(lookalike)} file(s) hold the mask rule's text but are not named {rule}; imported as "
            f"images: {shown}{more}"
        )
    return images, masks


def _hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _index_images(files: list[Path], folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        key = _key(path, folder)
        if key in found:
            raise DatasetImportError(f"two images with the name stem {key!r}: '{found[key]}' and '{path}'")
        found[key] = path
    return found


def _index_masks(
    files: list[Path], folder: Path, prefix: str, suffix: str, src: Path, ledger: Ledger
) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        key = _mask_core(path, folder, prefix, suffix)
        if key is None:
            ledger.skip("masks", relative_ref(path, src), f"name is not {prefix}<image stem>{suffix}")
            continue
        if key in found:
            raise DatasetImportError(f"two masks for the image {key!r}: '{found[key]}' and '{path}'")
        found[key] = path
    return found


def _affix_hint(image_keys: Sequence[str], mask_keys: Sequence[str]) -> str:
    """Suggest mask_prefix/mask_suffix from a mask name that contains an image name."""
    stems = sorted(image_keys, key=len, reverse=True)[:2000]
    for mask in mask_keys[:200]:
        for stem in stems:
            at = mask.find(stem)
            if at >= 0 and mask != stem:
                prefix, suffix = mask[:at], mask[at + len(stem) :]
                options = " ".join(
                    f"-O 'mask_{n}={v}'" for n, v in (("prefix", prefix), ("suffix", suffix)) if v
                )
                return f"; mask {mask!r} looks like image {stem!r}: try {options}"
    return ""


class _IdMatcher:
    """Finds the image key a table id names: the key, the key with a suffix, or a unique bare stem.

    Tables often hold paths (``images/case7.png``, ``D:\\scans\\case7.png``): the id's trailing
    path components are tried too, longest first, so the folder part never has to match.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = set(keys)
        stems: dict[str, list[str]] = {}
        for key in keys:
            stems.setdefault(key.rpartition("/")[2], []).append(key)
        self.unique_stems = {stem: found[0] for stem, found in stems.items() if len(found) == 1}

    def __call__(self, ident: str) -> str | None:
        ident = ident.replace("\\", "/").removeprefix("./")
        for candidate in (ident, strip_image_suffix(ident)):
            parts = candidate.split("/")
            for tail in ("/".join(parts[start:]) for start in range(len(parts))):
                if tail in self.keys:
                    return tail
            if parts[-1] in self.unique_stems:
                return self.unique_stems[parts[-1]]
        return None

    def known(self, ident: str) -> bool:
        return self(ident) is not None


def _column_key(name: str) -> str:
    return "_".join(name.lower().split())


def _is_name(ref: str | None) -> bool:
    return ref is not None and not ref.isdigit()


@dataclass(frozen=True)
class _LabelRules:
    mapping: Mapping[str, str]
    drop: frozenset[str]
    missing: frozenset[str]


def _read_label_table(
    path: Path,
    sheet: str | None,
    header: str,
    id_column: str,
    label_columns: Sequence[str] | None,
    split_column: str | None,
    match: _IdMatcher,
    ledger: Ledger,
) -> tuple[Table, int, dict[str, int], dict[str, int], int | None]:
    """(table, id index, {label column: index}, {attr column: index}, split index)."""
    rows = read_rows(path, sheet)
    if not rows:
        raise DatasetImportError(f"label table '{path}' has no rows")
    named = any([_is_name(id_column), *(_is_name(c) for c in label_columns or []), _is_name(split_column)])
    if header == "auto":
        has_header = named or looks_like_header(rows, int(id_column) - 1, match.known)
        ledger.note(
            f"label table '{path.name}': first row read as "
            + (f"the header ({', '.join(rows[0].cells)})" if has_header else "data (no header)")
            + "; -O header=yes/no overrides"
        )
    else:
        has_header = header == "yes"
        if named and not has_header:
            raise DatasetImportError("columns are given by name, but header=no says the label table has none")
    table = make_table(path, rows, has_header)
    id_index = table.column(id_column, "id_column")
    split_index = table.column(split_column, "split_column") if split_column else None
    taken = {id_index} | ({split_index} if split_index is not None else set())
    if label_columns:
        label_indices = [table.column(c, "label_columns") for c in label_columns]
    else:
        label_indices = [i for i in range(table.width) if i not in taken]
        if len(label_indices) != 1:
            names = ", ".join(table.name(i) for i in range(table.width))
            raise DatasetImportError(
                f"label table '{path.name}' has columns {names}: choose the label column(s) with "
                "-O label_columns=... (the other columns are kept as attr:<name>)"
            )
    if len(label_indices) == 1:
        labels = {"label": label_indices[0]}
    else:
        labels = {f"label:{_column_key(table.name(i))}": i for i in label_indices}
    taken |= set(label_indices)
    attrs = {f"attr:{_column_key(table.name(i))}": i for i in range(table.width) if i not in taken}
    return table, id_index, labels, attrs, split_index


def _cell(row: TableRow, index: int) -> str:
    return row.cells[index] if index < len(row.cells) else ""


def _join_labels(
    table: Table,
    id_index: int,
    labels: Mapping[str, int],
    attrs: Mapping[str, int],
    split_index: int | None,
    cases: dict[str, _Case],
    rules: _LabelRules,
    match: _IdMatcher,
    ledger: Ledger,
) -> None:
    """Give each case its label row; rows that join no image are skipped here with their reason."""
    ledger.add_input("labels", f"rows of the label table '{table.path.name}'", len(table.rows))
    first: dict[str, TableRow] = {}
    for row in table.rows:
        where = table.where(row)
        ident = _cell(row, id_index)
        key = match(ident) if ident else None
        if key is None:
            if ident:
                ledger.skip("labels", f"{where} {ident!r}", "no image with this id")
            else:
                ledger.skip("labels", where, "empty id cell")
            continue
        if key in first:
            if row.cells != first[key].cells:
                raise DatasetImportError(
                    f"'{table.path}' {where}: {ident!r} is described again with other values than on "
                    f"{table.where(first[key])}"
                )
            ledger.skip(
                "labels", f"{where} {ident!r} (= {table.where(first[key])})", "repeats an earlier row"
            )
            continue
        first[key] = row
        case = cases[key]
        case.label_row = where
        case.attrs = {column: _cell(row, index) for column, index in attrs.items()}
        if split_index is not None:
            case.split = _split_value(_cell(row, split_index), f"'{table.path}' {where}")
        for column, index in labels.items():
            raw = _cell(row, index)
            value = rules.mapping.get(raw, raw)
            if value in rules.drop:
                case.dropped = f"{column} value {value!r} is in drop_values"
            case.labels[column] = "" if value in rules.missing else value
    for case in cases.values():
        if not case.label_row:
            case.labels = dict.fromkeys(labels, "")
            case.attrs = dict.fromkeys(attrs, "")


def _split_value(text: str, where: str) -> str:
    if not text:
        return ""
    if text.lower() not in SPLIT_ALIASES:
        raise DatasetImportError(f"{where}: split {text!r} is not one of {', '.join(sorted(SPLIT_ALIASES))}")
    return SPLIT_ALIASES[text.lower()]


def _read_split_file(
    path: Path, sheet: str | None, cases: dict[str, _Case], match: _IdMatcher, ledger: Ledger
) -> None:
    rows = read_rows(path, sheet)
    if not rows:
        raise DatasetImportError(f"split file '{path}' has no rows")
    header = len(rows[0].cells) > 1 and rows[0].cells[1].lower() not in SPLIT_ALIASES
    table = make_table(path, rows, header)
    if table.width < 2:
        raise DatasetImportError(f"split file '{path}' needs two columns: <id>,<split>")
    ledger.add_input("split", f"rows of the split file '{path.name}'", len(table.rows))
    for row in table.rows:
        where = table.where(row)
        ident, split = _cell(row, 0), _split_value(_cell(row, 1), f"'{path}' {where}")
        key = match(ident) if ident else None
        if key is None or not split:
            reason = "no image with this id" if ident and split else "empty id or split cell"
            ledger.skip("split", f"{where} {ident!r}", reason)
            continue
        case = cases[key]
        if case.split_row:
            if case.split != split:
                raise DatasetImportError(
                    f"'{path}' {where}: {ident!r} is listed for {case.split} and for {split}"
                )
            ledger.skip("split", f"{where} {ident!r} (= {case.split_row})", "repeats an earlier row")
            continue
        case.split, case.split_row = split, where


@register_importer(
    "images",
    "generic: images in one folder, masks in another matched by stem, labels from a CSV/TSV/XLSX table",
    OPTIONS,
)
def import_images(
    src: Path,
    *,
    images: str = ".",
    masks: str | None = None,
    recursive: bool = False,
    mask_prefix: str = "",
    mask_suffix: str = "",
    labels: str | None = None,
    sheet: str | None = None,
    header: Literal["auto", "yes", "no"] = "auto",
    id_column: str = "1",
    label_columns: list[str] | None = None,
    map_values: dict[str, str] | None = None,
    drop_values: list[str] | None = None,
    missing_values: Sequence[str] = MISSING_WORDS,
    split_column: str | None = None,
    split_file: str | None = None,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
) -> tuple[pd.DataFrame, ManifestMeta]:
    """Join an image folder, an optional mask folder and an optional label table into a manifest."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetImportError(f"'{src}' is not a folder; the images importer reads a dataset folder")
    if split_column and split_file:
        raise DatasetImportError("give split_column or split_file, not both")
    if split_column and not labels:
        raise DatasetImportError("split_column names a column of the label table: give labels too")
    ledger = Ledger()
    image_dir = _folder(src, images, "images")
    mask_dir = _folder(src, masks, "masks") if masks is not None else None
    shared = mask_dir is not None and os.path.realpath(mask_dir) == os.path.realpath(image_dir)
    label_path = _file(src, labels)
    split_path = _file(src, split_file)
    exclude = {os.path.realpath(p) for p in (label_path, split_path) if p is not None}
    mask_files: list[Path] = []
    if shared:
        image_files, mask_files = _scan_shared(
            image_dir, recursive, exclude, mask_prefix, mask_suffix, src, ledger
        )
    else:
        exclude |= {os.path.realpath(mask_dir)} if mask_dir is not None else set()
        image_files = _scan(image_dir, recursive, exclude, src, ledger, "images")
    image_index = _index_images(image_files, image_dir)
    if not image_index:
        raise DatasetImportError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in '{image_dir}'")
    cases = {key: _Case(key, path) for key, path in image_index.items()}
    if mask_dir is not None:
        if not shared:
            mask_files = _scan(mask_dir, recursive, exclude, src, ledger, "masks")
        _pair_masks(cases, mask_files, mask_dir, mask_prefix, mask_suffix, src, ledger)
    match = _IdMatcher(list(cases))
    label_names: list[str] = []
    if label_path is not None:
        table, id_index, label_cols, attrs, split_index = _read_label_table(
            label_path, sheet, header, id_column, label_columns, split_column, match, ledger
        )
        rules = _LabelRules(
            dict(map_values or {}), frozenset(drop_values or ()), frozenset(missing_values) | {""}
        )
        _join_labels(table, id_index, label_cols, attrs, split_index, cases, rules, match, ledger)
        if not any(case.label_row for case in cases.values()):
            ids = [_cell(r, id_index) for r in table.rows[:3]]
            raise DatasetImportError(
                f"no row of '{table.path}' names an image: ids look like {ids}, image keys like {sorted(cases)[:3]}"
            )
        label_names = list(label_cols)
    if split_path is not None:
        _read_split_file(split_path, sheet, cases, match, ledger)
    split_given = bool(split_column or split_file)
    unsplit = "not in the split file" if split_file else "no split in the label table"
    rows = _rows(cases, label_names, src, ledger, unsplit if split_given else "")
    table_out = new_table(rows)
    extra: dict[str, object] = {"label_columns": label_names} if label_names else {}
    if split_given:
        extra["split_source"] = f"column {split_column!r} of the label table" if split_column else split_file
    else:
        stratify = "label" if label_names == ["label"] else None
        plan = SeededSplit(dict(fractions or DEFAULT_FRACTIONS), seed, stratify)
        table_out["split"] = plan.apply(table_out).to_numpy()
        extra["split_source"] = f"seeded patient-level split (seed {seed}" + (
            ", by label)" if stratify else ")"
        )
        extra[SEEDED_SPLIT_KEY] = plan.record()
    extra[REPORT_KEY] = ledger.report(len(table_out))
    classes = {column: sorted({v for v in table_out[column] if v}, key=natural_key) for column in label_names}
    masks_used = [Path(src / ref) for ref in table_out["mask"] if ref] if mask_dir is not None else []
    parts = [f"{len(table_out)} images from '{relative_ref(image_dir, src)}'"]
    if mask_dir is not None:
        parts.append(f"{len(masks_used)} masks from '{relative_ref(mask_dir, src)}'")
    if label_path is not None:
        parts.append(f"labels {', '.join(label_names)} from '{label_path.name}'")
    meta = ManifestMeta(
        classes=classes,
        mask_threshold=mask_threshold_for(masks_used),
        description=", ".join(parts),
        extra=extra,
    )
    return table_out, meta


def _file(src: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value) if Path(value).is_absolute() else src / value
    if not path.is_file():
        raise DatasetImportError(f"file '{path}' does not exist")
    return path


def _pair_masks(
    cases: dict[str, _Case],
    files: list[Path],
    mask_dir: Path,
    prefix: str,
    suffix: str,
    src: Path,
    ledger: Ledger,
) -> None:
    masks = _index_masks(files, mask_dir, prefix, suffix, src, ledger)
    if masks and not any(key in cases for key in masks):
        raise DatasetImportError(
            f"no mask in '{mask_dir}' matches an image by stem (images like {sorted(cases)[:2]}, "
            f"masks like {sorted(masks)[:2]})" + _affix_hint(list(cases), list(masks))
        )
    for key, path in masks.items():
        if key in cases:
            cases[key].mask = path
        else:
            ledger.skip("masks", relative_ref(path, src), "no image with this stem")


def _rows(
    cases: dict[str, _Case], label_names: list[str], src: Path, ledger: Ledger, unsplit: str
) -> list[dict[str, str]]:
    """Manifest rows, counting each input's use here, once: a case left out takes its parts along.

    ``unsplit`` is the reason for leaving out a case that got no split, when splits are given.
    """
    rows = []
    with_masks = "masks" in ledger.inputs
    for key, case in sorted(cases.items(), key=lambda item: natural_key(item[0])):
        ref = relative_ref(case.image, src)
        if not case.dropped and unsplit and not case.split:
            case.dropped = unsplit
        parts = [("masks", relative_ref(case.mask, src))] if case.mask is not None else []
        parts += [("labels", case.label_row)] if case.label_row else []
        parts += [("split", case.split_row)] if case.split_row else []
        if case.dropped:
            ledger.skip("images", ref, case.dropped)
            for source, item in parts:
                ledger.skip(source, item, f"its image is left out: {case.dropped}")
            continue
        for source, _ in parts:
            ledger.use(source)
        ledger.use("images")
        case_id = sanitize_id(key)
        row = {"case_id": case_id, "patient_id": case_id, "split": case.split, "image": ref}
        if with_masks:
            row["mask"] = relative_ref(case.mask, src) if case.mask is not None else ""
            if case.mask is None:
                ledger.mark_incomplete(case_id, "no mask")
        if label_names and not case.label_row:
            ledger.mark_incomplete(case_id, "no row in the label table")
        for column in label_names:
            if case.label_row and not case.labels[column]:
                ledger.mark_incomplete(case_id, f"missing {column}")
        rows.append(row | case.labels | case.attrs)
    if not rows:
        raise DatasetImportError(
            "no image is left to import: every image was left out (see the reasons above)"
        )
    check_unique_ids(rows)
    return rows
