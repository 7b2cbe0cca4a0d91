"""One folder per class (torchvision ``ImageFolder`` style), optionally already split.

Accepted layouts (``src`` is the dataset folder)::

    src/<class>/**/<image>               no release split: assign_splits, stratified by class
    src/<split>/<class>/**/<image>       when every top-level folder is a split name
                                         (train / val / test; also training, valid, validation, testing)

Images are the files whose suffix :func:`medalign.data.readers.read_image` understands (PNG, JPEG,
TIFF, BMP, DICOM, NIfTI, npy, npz), found recursively inside each class folder, so nested
per-patient sub-folders work. ``label`` is the class folder's name; classes are sorted.

Masks: ``<stem>_mask.<ext>`` next to ``<stem>.<ext>`` is that image's ``mask``, and
``<stem>_mask_<k>.<ext>`` its ``mask:<k>`` (BUSI ships extra lesion masks that way, so pointing this
importer at ``Dataset_BUSI_with_GT`` works). Class folders need not have masks, so an image without
one gets an empty mask cell; a mask without its image is an error because no row could hold it.

Nothing is dropped silently: files that are not images (and anything under a hidden folder such as
``.ipynb_checkpoints``, which holds stale copies) are listed in ``meta.extra["ignored_files"]``.
``case_id`` is the path below ``src`` without its suffix, with every run of characters other than
letters, digits, ``.``, ``_`` and ``-`` replaced by ``_`` (``benign/benign (1).png`` ->
``benign_benign_1``), because ids end up in file names of predictions and reports.

The helpers here (suffix handling, mask pairing, ids, natural sort) are shared by the BUSI and
NextGen-UIA importers so that the three agree on what counts as an image and a mask.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from medalign.data.importers.registry import DatasetImportError, register_importer
from medalign.data.manifest import ManifestMeta, assign_splits, new_table, relative_ref
from medalign.data.readers import SUPPORTED_SUFFIXES

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
    for path in sorted(folder.rglob("*"), key=lambda p: natural_key(p.relative_to(root).as_posix())):
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


def check_unique_ids(rows: list[dict[str, str]], what: str = "image") -> None:
    seen: dict[str, str] = {}
    for row in rows:
        case_id, ref = row["case_id"], row.get(what, "")
        if case_id in seen:
            raise DatasetImportError(
                f"'{seen[case_id]}' and '{ref}' map to the same case_id {case_id!r}; rename one of them"
            )
        seen[case_id] = ref


@register_importer(
    "folders", "one folder per class (optionally inside train/val/test folders); <stem>_mask files are masks"
)
def import_folders(
    src: Path,
    *,
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
) -> tuple[pd.DataFrame, ManifestMeta]:
    """``fractions`` (default 0.7/0.1/0.2) and ``seed`` only apply when the folders carry no split."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetImportError(f"'{src}' is not a folder; expected <src>/<class>/<images>")
    top = [d for d in sorted(src.iterdir(), key=lambda p: natural_key(p.name)) if d.is_dir()]
    visible = [d for d in top if not d.name.startswith(".")]
    if not visible:
        raise DatasetImportError(f"'{src}' has no class folders; expected <src>/<class>/<images>")
    ignored: list[Path] = [p for p in src.iterdir() if p.is_file()]
    ignored += [p for d in top if d.name.startswith(".") for p in d.rglob("*") if p.is_file()]
    presplit = all(d.name.lower() in SPLIT_ALIASES for d in visible)
    groups = [(SPLIT_ALIASES[d.name.lower()], d) for d in visible] if presplit else [("", src)]

    found: list[tuple[str, str, Path, dict[str, Path]]] = []
    empty: list[str] = []
    for split, base in groups:
        class_dirs = [d for d in sorted(base.iterdir(), key=lambda p: natural_key(p.name)) if d.is_dir()]
        if base != src:
            ignored += [p for p in base.iterdir() if p.is_file()]
        for class_dir in class_dirs:
            if class_dir.name.startswith("."):
                ignored += [p for p in class_dir.rglob("*") if p.is_file()]
                continue
            images, others = list_files(class_dir, src)
            ignored += others
            pairs = pair_masks(images)
            if not pairs:
                empty.append(relative_ref(class_dir, src))
            found += [(split, class_dir.name, image, masks) for image, masks in pairs]
    if not found:
        raise DatasetImportError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) found in the class folders of '{src}'"
        )

    mask_columns = sorted_mask_columns(c for *_, masks in found for c in masks)
    rows = []
    for split, label, image, masks in found:
        stem, _ = split_suffix(image.name)
        case_id = sanitize_id(relative_ref(image.parent / stem, src))
        row = {"case_id": case_id, "patient_id": case_id, "split": split, "image": relative_ref(image, src)}
        row |= {c: relative_ref(masks[c], src) if c in masks else "" for c in mask_columns}
        row["label"] = label
        rows.append(row)
    check_unique_ids(rows)
    table = new_table(rows)
    if not presplit:
        table["split"] = assign_splits(
            table, fractions or DEFAULT_FRACTIONS, seed=seed, stratify="label"
        ).values
    classes = sorted({label for _, label, _, _ in found}, key=natural_key)
    all_masks = [m for *_, masks in found for m in masks.values()]
    meta = ManifestMeta(
        classes={"label": classes},
        mask_threshold=mask_threshold_for(all_masks),
        description=f"class folders of '{src.name}' ({len(classes)} classes)",
        extra={
            "split_source": "folders" if presplit else f"assign_splits(seed={seed})",
            "ignored_files": sorted({relative_ref(p, src) for p in ignored}, key=natural_key),
            "empty_folders": empty,
        },
    )
    return table, meta
