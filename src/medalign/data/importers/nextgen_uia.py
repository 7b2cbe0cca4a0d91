"""NextGen-UIA (Qu et al. 2025, github.com/jinggqu/NextGen-UIA): images plus split-list text files.

Two layouts are accepted; the first is recognised by its ``all/images`` folder.

**Release layout** (the repository's ``data/NextGen-UIA``)::

    all/images/<name>                          images of every dataset, shared by all tasks
    all/masks/<name>                           the mask of an image, under the same file name
    segmentation/<DATASET>/{train,val,test}.txt     one file name per line
    classification/<DATASET>/{train,val,test}.txt   one file name per line
    classification/<DATASET>/labels.csv             "<name>,<integer label>" rows, no header

``task`` ("segmentation", the default, or "classification") chooses whose split lists define the
rows, ``dataset`` which ``<DATASET>`` folder (needed only when there are several). Only listed
images become rows, because ``all/images`` also holds the other datasets. ``mask`` is
``all/masks/<name>``: always for segmentation (a missing mask is then reported by ``validate``),
and only where it exists for classification. ``label`` comes from ``labels.csv`` when present.

**Folder layout** (a dataset folder with split lists, e.g. the BUSI release with its folds)::

    <any folders>/<stem>.<ext> + <stem>_mask.<ext>    images found recursively (not under folds/, splits/)
      or images/<name> + masks/<same stem>.<ext>      when an images/ folder exists
    train.txt, val.txt, test.txt                      in src/, src/splits/ or src/folds/
      or folds/<prefix>_train<k>.txt, <prefix>_val<k>.txt [, <prefix>_test<k>.txt]   with fold=k

Each list line is a stem (``benign (12)``) or a file name (``benign (12).png``). Without ``fold``
the plain lists are used; without those, the lowest fold found (recorded in ``meta.extra["fold"]``).
Images in no list are test cases (``unlisted="test"``: the BUSI folds leave the normal images out
of train and val) or, with ``unlisted="drop"``, left out; either way they are listed in
``meta.extra["not_in_split_files"]``. Labels (``label_from``): ``"csv"`` reads ``labels.csv`` in
``src``; ``"folder"`` is the image's parent folder name; ``"stem"`` the stem's leading word
(``benign (12)`` -> ``benign``); ``"none"``; ``"auto"`` (default) takes csv if present, else folder
when every image sits in a sub-folder, else none.

Integer labels in a ``labels.csv`` are named by ``classes`` (``classes[i]`` for label ``i``);
without it they stay as written. ``classes`` also fixes the declared class order (else: sorted
observed labels). ``case_id`` is the stem made file-name safe, so BUSI ids match the ``busi`` importer.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import pandas as pd

from medalign.data.importers.busi import read_split_list
from medalign.data.importers.common import (
    check_unique_ids,
    is_image,
    list_files,
    mask_threshold_for,
    natural_key,
    pair_masks,
    sanitize_id,
    sorted_mask_columns,
    split_suffix,
    strip_image_suffix,
)
from medalign.data.importers.registry import DatasetImportError, register_importer
from medalign.data.jsonio import read_text
from medalign.data.manifest import SPLITS, ManifestMeta, new_table, relative_ref

TASKS: tuple[str, ...] = ("segmentation", "classification")
LABEL_SOURCES: tuple[str, ...] = ("auto", "csv", "folder", "stem", "none")
HEADER_NAMES = frozenset({"image", "images", "name", "filename", "file", "image_name", "id"})
SKIPPED_FOLDERS = frozenset({"folds", "splits"})
_LEADING_WORD = re.compile(r"[A-Za-z]+")


def read_labels_csv(path: Path, classes: Sequence[str] | None) -> dict[str, str]:
    """``{name without image suffix: label}``; integer labels become ``classes[i]`` when given."""
    labels: dict[str, str] = {}
    text = read_text(path, error=DatasetImportError)
    for number, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise DatasetImportError(f"'{path}' line {number}: expected '<image>,<label>', got {row!r}")
        name, value = row[0].strip(), row[1].strip()
        if number == 1 and name.lower() in HEADER_NAMES and not value.lstrip("-").isdigit():
            continue
        if classes is not None and value.lstrip("-").isdigit():
            index = int(value)
            if not 0 <= index < len(classes):
                raise DatasetImportError(
                    f"'{path}' line {number}: label {index} has no name in classes={list(classes)}"
                )
            value = classes[index]
        key = strip_image_suffix(name)
        if key in labels and labels[key] != value:
            raise DatasetImportError(
                f"'{path}' line {number}: {name!r} is labelled {labels[key]!r} earlier and {value!r} here"
            )
        labels[key] = value
    return labels


def _read_lists(files: Mapping[str, Path]) -> tuple[dict[str, str], dict[str, tuple[Path, int]]]:
    """``{entry: split}`` over several split files; an entry in two files is an error."""
    split_of: dict[str, str] = {}
    origin: dict[str, tuple[Path, int]] = {}
    for split, path in files.items():
        for number, entry in read_split_list(path):
            if entry in split_of:
                first, line = origin[entry]
                raise DatasetImportError(
                    f"'{path}' line {number}: {entry!r} is already listed in '{first}' line {line}"
                )
            split_of[entry] = split
            origin[entry] = (path, number)
    return split_of, origin


def _release(
    src: Path, task: str, dataset: str | None, classes: Sequence[str] | None
) -> tuple[list[dict[str, str]], dict[str, object], list[Path]]:
    task_dir = src / task
    if not task_dir.is_dir():
        raise DatasetImportError(f"'{task_dir}' does not exist; task must be one of {', '.join(TASKS)}")
    available = sorted(d.name for d in task_dir.iterdir() if d.is_dir())
    if dataset is None:
        if len(available) != 1:
            raise DatasetImportError(
                f"'{task_dir}' holds {len(available)} datasets ({', '.join(available) or 'none'}); pass dataset=<name>"
            )
        dataset = available[0]
    lists_dir = task_dir / dataset
    if not lists_dir.is_dir():
        raise DatasetImportError(
            f"'{lists_dir}' does not exist; datasets here: {', '.join(available) or 'none'}"
        )
    files = {s: lists_dir / f"{s}.txt" for s in SPLITS if (lists_dir / f"{s}.txt").is_file()}
    if not files:
        raise DatasetImportError(f"no split lists (train.txt, val.txt, test.txt) in '{lists_dir}'")
    split_of, origin = _read_lists(files)
    labels_path = src / "classification" / dataset / "labels.csv"
    labels = read_labels_csv(labels_path, classes) if labels_path.is_file() else None
    if task == "classification" and labels is None:
        raise DatasetImportError(f"classification lists need '{labels_path}', which does not exist")
    rows, masks = [], []
    for name, split in split_of.items():
        stem = split_suffix(name)[0]
        mask = src / "all" / "masks" / name
        has_mask = task == "segmentation" or mask.is_file()
        row = {
            "case_id": sanitize_id(stem),
            "patient_id": sanitize_id(stem),
            "split": split,
            "image": relative_ref(src / "all" / "images" / name, src),
            "mask": relative_ref(mask, src) if has_mask else "",
        }
        masks += [mask] if has_mask else []
        if labels is not None:
            key = strip_image_suffix(name)
            if key not in labels and task == "classification":
                path, line = origin[name]
                raise DatasetImportError(f"'{path}' line {line}: {name!r} has no row in '{labels_path}'")
            row["label"] = labels.get(key, "")
        rows.append(row)
    extra: dict[str, object] = {
        "layout": "release",
        "task": task,
        "dataset": dataset,
        "split_source": [relative_ref(p, src) for p in files.values()],
    }
    if labels is not None:
        listed = {strip_image_suffix(name) for name in split_of}
        extra["label_rows_without_image"] = sorted((k for k in labels if k not in listed), key=natural_key)
    return rows, extra, masks


def _find_lists(src: Path, fold: int | None) -> tuple[dict[str, Path], int | None]:
    if fold is None:
        for folder in (src, src / "splits", src / "folds"):
            plain = {s: folder / f"{s}.txt" for s in SPLITS if (folder / f"{s}.txt").is_file()}
            if plain:
                return plain, None
    folds: dict[int, dict[str, list[Path]]] = {}
    for folder in (src / "folds", src):
        for path in sorted(folder.glob("*.txt")) if folder.is_dir() else []:
            match = re.fullmatch(r"(?:.*_)?(train|val|test)(\d+)\.txt", path.name)
            if match:
                folds.setdefault(int(match[2]), {}).setdefault(match[1], []).append(path)
    if not folds:
        raise DatasetImportError(
            f"no split lists in '{src}': expected train.txt/val.txt/test.txt or folds/<name>_train<k>.txt"
        )
    chosen = min(folds) if fold is None else fold
    if chosen not in folds:
        raise DatasetImportError(f"fold {chosen} not found in '{src}'; folds available: {sorted(folds)}")
    for split, paths in folds[chosen].items():
        if len(paths) > 1:
            raise DatasetImportError(f"several {split} lists for fold {chosen}: {[str(p) for p in paths]}")
    if "train" not in folds[chosen]:
        raise DatasetImportError(f"fold {chosen} in '{src}' has no *_train{chosen}.txt list")
    return {s: folds[chosen][s][0] for s in SPLITS if s in folds[chosen]}, chosen


def _scan(src: Path) -> tuple[list[tuple[Path, dict[str, Path]]], Path, list[Path]]:
    """(image, masks) pairs, the folder the images live under, and ignored files."""
    images_dir, masks_dir = src / "images", src / "masks"
    if images_dir.is_dir():
        images, ignored = list_files(images_dir, src)
        mask_files, mask_ignored = list_files(masks_dir, src) if masks_dir.is_dir() else ([], [])
        by_stem: dict[str, Path] = {}
        for mask in mask_files:
            key = relative_ref(mask.parent / split_suffix(mask.name)[0], masks_dir)
            if key in by_stem:
                raise DatasetImportError(f"two masks for the same image: '{by_stem[key]}' and '{mask}'")
            by_stem[key] = mask
        pairs = []
        for image in images:
            key = relative_ref(image.parent / split_suffix(image.name)[0], images_dir)
            pairs.append((image, {"mask": by_stem.pop(key)} if key in by_stem else {}))
        if by_stem:
            raise DatasetImportError(
                f"masks without an image in '{images_dir}': {sorted(map(str, by_stem.values()))[:5]}"
            )
        return pairs, images_dir, ignored + mask_ignored
    images, ignored = [], []
    for child in sorted(src.iterdir(), key=lambda p: natural_key(p.name)):
        if child.is_file():
            (images if is_image(child) else ignored).append(child)
        elif child.name not in SKIPPED_FOLDERS:
            found, others = list_files(child, src)
            images += found
            ignored += others
    return pair_masks(images), src, ignored


def _label_for(image: Path, root: Path, source: str, labels: Mapping[str, str] | None) -> str:
    stem = split_suffix(image.name)[0]
    if source == "csv":
        assert labels is not None
        return labels.get(stem, "")
    if source == "folder":
        if image.parent == root:
            raise DatasetImportError(f"label_from='folder' but '{image}' is not inside a class folder")
        return image.parent.name
    if source == "stem":
        match = _LEADING_WORD.match(stem)
        if not match:
            raise DatasetImportError(
                f"label_from='stem' but the name of '{image}' does not start with a word"
            )
        return match[0]
    return ""


def _folders(
    src: Path, fold: int | None, classes: Sequence[str] | None, label_from: str, unlisted: str
) -> tuple[list[dict[str, str]], dict[str, object], list[Path]]:
    files, chosen = _find_lists(src, fold)
    split_of, origin = _read_lists(files)
    pairs, root, ignored = _scan(src)
    if not pairs:
        raise DatasetImportError(f"no images found in '{src}'")
    labels_path = src / "labels.csv"
    if label_from == "auto":
        if labels_path.is_file():
            label_from = "csv"
        elif all(image.parent != root for image, _ in pairs):
            label_from = "folder"
        else:
            label_from = "none"
    labels = None
    if label_from == "csv":
        if not labels_path.is_file():
            raise DatasetImportError(f"label_from='csv' but '{labels_path}' does not exist")
        labels = read_labels_csv(labels_path, classes)

    by_key: dict[str, int] = {}
    rows: list[dict[str, str]] = []
    mask_columns = sorted_mask_columns(c for _, masks in pairs for c in masks)
    for image, masks in pairs:
        stem = split_suffix(image.name)[0]
        if stem in by_key:
            raise DatasetImportError(f"'{rows[by_key[stem]]['image']}' and '{image}' share the stem {stem!r}")
        by_key[stem] = len(rows)
        row = {
            "case_id": sanitize_id(stem),
            "patient_id": sanitize_id(stem),
            "split": "",
            "image": relative_ref(image, src),
        }
        row |= {c: relative_ref(masks[c], src) if c in masks else "" for c in mask_columns}
        if label_from != "none":
            row["label"] = _label_for(image, root, label_from, labels)
        rows.append(row)
    for entry, split in split_of.items():
        key = strip_image_suffix(entry)
        path, line = origin[entry]
        if key not in by_key:
            raise DatasetImportError(f"'{path}' line {line}: {entry!r} matches no image under '{src}'")
        row = rows[by_key[key]]
        if row["split"]:
            raise DatasetImportError(
                f"'{path}' line {line}: {entry!r} names an image listed again for {row['split']}"
            )
        row["split"] = split
    not_listed = [row["case_id"] for row in rows if row["split"] == ""]
    if unlisted == "drop":
        rows = [row for row in rows if row["split"] != ""]
    else:
        for row in rows:
            row["split"] = row["split"] or "test"
    extra: dict[str, object] = {
        "layout": "folders",
        "split_source": [relative_ref(p, src) for p in files.values()],
        "not_in_split_files": not_listed,
        "unlisted": unlisted,
        "label_from": label_from,
        "ignored_files": sorted({relative_ref(p, src) for p in ignored}, key=natural_key),
    }
    if labels is not None:  # a labels.csv row whose image is missing is named, not lost
        extra["label_rows_without_image"] = sorted((k for k in labels if k not in by_key), key=natural_key)
    if chosen is not None:
        extra["fold"] = chosen
    masks_used = [m for _, masks in pairs for m in masks.values()]
    return rows, extra, masks_used


@register_importer(
    "nextgen-uia",
    "NextGen-UIA split lists: all/images + <task>/<DATASET>/*.txt, or folds/*_train<k>.txt",
    {
        "task": "release layout: segmentation or classification lists",
        "dataset": "release layout: the dataset folder under <task>/ (default: the only one)",
        "fold": "folder layout: use the lists of this fold (folds/<name>_train<k>.txt ...)",
        "classes": "names of integer labels in labels.csv (classes[i] for label i); also the class order",
        "label_from": "folder layout: labels from csv (labels.csv), folder, stem, none or auto",
        "unlisted": "folder layout: images in no split list become test, or drop them (listed either way)",
    },
)
def import_nextgen_uia(
    src: Path,
    *,
    task: Literal["segmentation", "classification"] = "segmentation",
    dataset: str | None = None,
    fold: int | None = None,
    classes: list[str] | None = None,
    label_from: Literal["auto", "csv", "folder", "stem", "none"] = "auto",
    unlisted: Literal["test", "drop"] = "test",
) -> tuple[pd.DataFrame, ManifestMeta]:
    """``task``/``dataset`` apply to the release layout, ``fold``/``label_from``/``unlisted`` to the folder one."""
    src = Path(src)
    if task not in TASKS:
        raise DatasetImportError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if label_from not in LABEL_SOURCES:
        raise DatasetImportError(f"label_from {label_from!r} is not one of {', '.join(LABEL_SOURCES)}")
    if unlisted not in ("test", "drop"):
        raise DatasetImportError(f"unlisted {unlisted!r} must be 'test' or 'drop'")
    if (src / "all" / "images").is_dir():
        rows, extra, masks = _release(src, task, dataset, classes)
    else:
        rows, extra, masks = _folders(src, fold, classes, label_from, unlisted)
    check_unique_ids(rows)
    table = new_table(rows)
    meta_classes: dict[str, list[str]] = {}
    if "label" in table.columns:
        observed = sorted({v for v in table["label"] if v != ""}, key=natural_key)
        meta_classes["label"] = list(classes) if classes is not None else observed
    meta = ManifestMeta(
        classes=meta_classes,
        mask_threshold=mask_threshold_for(masks),
        description=f"NextGen-UIA split lists ({extra['layout']} layout) from '{src.name}'",
        extra=extra,
    )
    return table, meta
