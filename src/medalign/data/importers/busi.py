"""BUSI breast ultrasound (Al-Dhabyani et al. 2020) in its release layout.

Accepted layout (``src`` is the folder that holds ``Dataset_BUSI_with_GT``, or that folder itself)::

    Dataset_BUSI_with_GT/<class>/<class> (N).png          class: benign, malignant, normal
    Dataset_BUSI_with_GT/<class>/<class> (N)_mask.png     lesion mask (empty for normal)
    Dataset_BUSI_with_GT/<class>/<class> (N)_mask_K.png   further lesions of the same image
    folds/busi_train{k}.txt, folds/busi_val{k}.txt        optional; one release stem per line

The release gives every image a mask, so an image without one is an error rather than an empty
cell. A few original cases have extra lesions drawn in separate files (``_mask_1``, ``_mask_2``);
the manifest has one cell per file, so they go to ``mask:1``, ``mask:2`` and the full lesion map is
the union of ``mask`` and those columns.

``case_id`` is the release stem made safe for file names (``benign (12)`` -> ``benign_12``);
BUSI has no patient ids, so ``patient_id`` is the case id. Splits: with ``fold=k`` the fold files
give train/val and every case in neither is test (the folds cover benign and malignant only, so
all normal images are test); without ``fold`` a seeded split stratified by class, default
0.7/0.1/0.2.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from medalign.data.groups import SeededSplit
from medalign.data.importers.common import (
    DEFAULT_FRACTIONS,
    check_unique_ids,
    list_files,
    natural_key,
    pair_masks,
    sanitize_id,
    sorted_mask_columns,
    split_suffix,
    strip_image_suffix,
)
from medalign.data.importers.options import seeded_split_help
from medalign.data.importers.registry import SEEDED_SPLIT_KEY, DatasetImportError, register_importer
from medalign.data.jsonio import read_text
from medalign.data.manifest import ManifestMeta, new_table, relative_ref

CLASSES: list[str] = ["benign", "malignant", "normal"]
RELEASE_FOLDER = "Dataset_BUSI_with_GT"


def _release_root(src: Path) -> Path:
    if (src / RELEASE_FOLDER).is_dir():
        return src / RELEASE_FOLDER
    if any((src / name).is_dir() for name in CLASSES):
        return src
    raise DatasetImportError(
        f"'{src}' has neither '{RELEASE_FOLDER}/' nor class folders ({', '.join(CLASSES)}); "
        "expected the BUSI release layout <src>/Dataset_BUSI_with_GT/<class>/<class> (N).png"
    )


def read_split_list(path: Path) -> list[tuple[int, str]]:
    """Non-empty lines of a split file with their 1-based line numbers (for error messages)."""
    if not path.is_file():
        raise DatasetImportError(f"split file '{path}' does not exist")
    lines = read_text(path, error=DatasetImportError).splitlines()
    return [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]


def fold_splits(
    src: Path, fold: int, known: Mapping[str, str], prefix: str = "busi"
) -> tuple[dict[str, str], list[str]]:
    """``{case key: split}`` from ``folds/<prefix>_{train,val}<fold>.txt``; keys absent there are test.

    Every entry must name a case, and no case may be in both files: a fold that silently lost or
    duplicated cases would make results incomparable with the published folds.
    """
    splits: dict[str, str] = {}
    where: dict[str, str] = {}
    files = []
    for split in ("train", "val"):
        path = src / "folds" / f"{prefix}_{split}{fold}.txt"
        files.append(relative_ref(path, src))
        for number, entry in read_split_list(path):
            key = strip_image_suffix(entry)
            if key not in known:
                raise DatasetImportError(f"'{path}' line {number}: {entry!r} is not an image of the dataset")
            if key in splits:
                raise DatasetImportError(
                    f"'{path}' line {number}: {entry!r} is already listed in {where[key]}"
                )
            splits[key] = split
            where[key] = f"'{path}' ({split})"
    for key in known:
        splits.setdefault(key, "test")
    return splits, files


@register_importer(
    "busi",
    "BUSI breast ultrasound release (Dataset_BUSI_with_GT/<class>/...), optional folds/",
    {
        "fold": "use the release folds folds/busi_{train,val}<fold>.txt (cases in neither are test)",
        **seeded_split_help(when="without fold"),
    },
)
def import_busi(
    src: Path,
    *,
    fold: int | None = None,
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
) -> tuple[pd.DataFrame, ManifestMeta]:
    """``fold`` picks the release folds; ``seed``/``fractions`` (0.7/0.1/0.2) apply only without it."""
    src = Path(src)
    root = _release_root(src)
    unexpected = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in CLASSES)
    if unexpected:
        raise DatasetImportError(
            f"unexpected folder(s) {unexpected} in '{root}'; BUSI has only {', '.join(CLASSES)}"
        )
    ignored = [relative_ref(p, src) for p in root.iterdir() if p.is_file()]
    found = []
    for label in CLASSES:
        folder = root / label
        if not folder.is_dir():
            continue
        images, others = list_files(folder, src)
        ignored += [relative_ref(p, src) for p in others]
        pairs = pair_masks(images)
        missing = [relative_ref(image, src) for image, masks in pairs if "mask" not in masks]
        if missing:
            shown = ", ".join(f"'{m}'" for m in missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise DatasetImportError(f"BUSI images without their '<stem>_mask.png': {shown}")
        found += [(label, image, masks) for image, masks in pairs]
    if not found:
        raise DatasetImportError(f"no BUSI images found in '{root}'")

    mask_columns = sorted_mask_columns(c for _, _, masks in found for c in masks)
    rows, stems = [], {}
    for label, image, masks in found:
        stem = split_suffix(image.name)[0]
        case_id = sanitize_id(stem)
        stems[stem] = case_id
        row = {"case_id": case_id, "patient_id": case_id, "split": "", "image": relative_ref(image, src)}
        row |= {c: relative_ref(masks[c], src) if c in masks else "" for c in mask_columns}
        row["label"] = label
        rows.append(row)
    check_unique_ids(rows)
    table = new_table(rows)
    extra: dict[str, object] = {"ignored_files": sorted(ignored, key=natural_key)}
    if fold is not None:
        by_stem, files = fold_splits(src, fold, stems)
        split_of = {stems[stem]: split for stem, split in by_stem.items()}
        table["split"] = table["case_id"].map(split_of)
        extra |= {"split_source": files, "fold": fold}
    else:
        plan = SeededSplit(fractions or DEFAULT_FRACTIONS, seed, "label")
        table["split"] = plan.apply(table).to_numpy()
        extra["split_source"] = f"assign_splits(seed={seed}, stratify=label)"
        extra[SEEDED_SPLIT_KEY] = plan.record()
    if len(mask_columns) > 1:
        extra["lesion_mask_union"] = mask_columns
    meta = ManifestMeta(
        classes={"label": list(CLASSES)},
        description="BUSI breast ultrasound: benign / malignant / normal with lesion masks",
        extra=extra,
    )
    return table, meta
