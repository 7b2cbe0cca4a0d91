"""Helpers shared by the importers of image-folder releases (folders, BUSI, Kvasir, LViT, MMEndoCL, NextGen-UIA).

They live in one module so that every importer agrees on what counts as an image (suffixes
:func:`medalign.data.readers.read_image` understands, ``.nii.gz`` as one suffix) and as a mask
(``<stem>_mask[_k]`` siblings, JPEG masks thresholded), on how ``case_id`` values are made safe for
file names, on natural sort order, and on the split-folder names and default split fractions.
This module registers no importer, so it is not listed in ``_builtin``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from medalign.data.importers.registry import DatasetImportError
from medalign.data.readers import SUPPORTED_SUFFIXES
from medalign.progress import progress

IMAGE_SUFFIXES: tuple[str, ...] = SUPPORTED_SUFFIXES
JPEG_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg")
JPEG_MASK_THRESHOLD = 127.0
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.1, "test": 0.2}
MASK_STEM = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<index>\d+))?$")
_ID_UNSAFE = re.compile(r"[^0-9A-Za-z._-]+")
_DIGITS = re.compile(r"(\d+)")


def split_suffix(name: str) -> tuple[str, str]:
    """``("x", ".nii.gz")`` for ``x.nii.gz``: a plain ``Path.suffix`` would leave ``x.nii`` as the stem."""
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return name[: -len(".nii.gz")], ".nii.gz"
    path = Path(name)
    return path.stem, path.suffix.lower()


def is_image(path: Path) -> bool:
    return split_suffix(path.name)[1] in IMAGE_SUFFIXES


def strip_image_suffix(name: str) -> str:
    """``x.png`` -> ``x`` but ``1.2.840`` stays: split lists mix stems and file names, and stems may hold dots."""
    stem, suffix = split_suffix(name)
    return stem if suffix in IMAGE_SUFFIXES else name


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort ``x (2)`` before ``x (10)``, as release listings and humans do."""
    return tuple((0, int(part)) if part.isdigit() else (1, part.lower()) for part in _DIGITS.split(text))


def sanitize_id(text: str) -> str:
    return _ID_UNSAFE.sub("_", text).strip("_")


def is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_files(folder: Path, root: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) below ``folder``, in natural order of their path under ``root``."""
    images, others = [], []
    paths = sorted(folder.rglob("*"), key=lambda p: natural_key(p.relative_to(root).as_posix()))
    for path in progress(paths, desc=f"scan {folder.name}", unit="file"):
        if not path.is_file():
            continue
        (images if is_image(path) and not is_hidden(path, root) else others).append(path)
    return images, others


def mask_column(index: str | None) -> str:
    return "mask" if index is None else f"mask:{int(index)}"


def pair_masks(files: Iterable[Path]) -> list[tuple[Path, dict[str, Path]]]:
    """Group image files with their ``<stem>_mask[_k]`` siblings: ``[(image, {column: mask})]``.

    Raises on a mask without its image and on two files that claim the same slot (``x.png`` and
    ``x.jpg``; ``x_mask.png`` and ``x_mask.jpg``), because either way a row would have to guess.
    """
    images: dict[tuple[Path, str], Path] = {}
    masks: list[tuple[tuple[Path, str], str, Path]] = []
    for path in files:
        stem, _ = split_suffix(path.name)
        match = MASK_STEM.match(stem)
        if match:
            masks.append(((path.parent, match["stem"]), mask_column(match["index"]), path))
            continue
        key = (path.parent, stem)
        if key in images:
            raise DatasetImportError(f"two images with the same name stem: '{images[key]}' and '{path}'")
        images[key] = path
    paired: dict[tuple[Path, str], dict[str, Path]] = {key: {} for key in images}
    for key, column, path in masks:
        if key not in images:
            raise DatasetImportError(f"mask '{path}' has no image '{key[1]}.<ext>' next to it")
        if column in paired[key]:
            raise DatasetImportError(f"two masks for the same image: '{paired[key][column]}' and '{path}'")
        paired[key][column] = path
    return [(images[key], paired[key]) for key in images]


def sorted_mask_columns(columns: Iterable[str]) -> list[str]:
    """``mask`` first, then ``mask:1``, ``mask:2``, ... so extra masks never precede the main one."""
    return sorted(set(columns), key=lambda c: (c != "mask", natural_key(c)))


def mask_threshold_for(masks: Iterable[Path]) -> float | None:
    """JPEG masks carry compression noise around 0/255, so they need a threshold; PNG masks do not."""
    return JPEG_MASK_THRESHOLD if any(split_suffix(m.name)[1] in JPEG_SUFFIXES for m in masks) else None


def check_unique_ids(rows: list[dict[str, str]], what: str = "image", source: str = "") -> None:
    """``source`` names the listing the rows came from (a CSV), when the refs alone do not say it."""
    seen: dict[str, str] = {}
    for row in rows:
        case_id, ref = row["case_id"], row.get(what, "")
        if case_id in seen:
            where = f"{source}: " if source else ""
            raise DatasetImportError(
                f"{where}'{seen[case_id]}' and '{ref}' map to the same case_id {case_id!r}; rename one of them"
            )
        seen[case_id] = ref
