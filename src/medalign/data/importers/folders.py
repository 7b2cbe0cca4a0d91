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

An image folder and its mask folder are not two classes. When two class folders share most of
their file stems and one of them holds masks (gray images with nearly every pixel black or
white, see :func:`medalign.data.validation.looks_like_mask`), the import is refused with the
``images`` importer command that reads them as images and masks; ``force=true`` imports them as
classes anyway. Without this check the import exits 0 with a wrong manifest: the masks become
images of a class, and a classifier learns "is this a mask".

Nothing is dropped silently: files that are not images (and anything under a hidden folder such as
``.ipynb_checkpoints``, which holds stale copies) are listed in ``meta.extra["ignored_files"]``.
``case_id`` is the path below ``src`` without its suffix, with every run of characters other than
letters, digits, ``.``, ``_`` and ``-`` replaced by ``_`` (``benign/benign (1).png`` ->
``benign_benign_1``), because ids end up in file names of predictions and reports.

Suffix handling, mask pairing, ids and natural sort come from :mod:`medalign.data.importers.common`,
shared with the other image-folder importers so that they agree on what counts as an image and a mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from pathlib import Path

import pandas as pd

from medalign.data.groups import SeededSplit
from medalign.data.importers.common import (
    DEFAULT_FRACTIONS,
    IMAGE_SUFFIXES,
    MASK_STEM,
    SPLIT_ALIASES,
    check_unique_ids,
    list_files,
    mask_threshold_for,
    natural_key,
    pair_masks,
    sanitize_id,
    sorted_mask_columns,
    split_suffix,
)
from medalign.data.importers.options import seeded_split_help
from medalign.data.importers.registry import SEEDED_SPLIT_KEY, DatasetImportError, register_importer
from medalign.data.manifest import ManifestMeta, new_table, relative_ref
from medalign.data.readers import ImageReadError, read_image
from medalign.data.validation import looks_like_mask

SHARED_STEM_SHARE = 0.5  # of the smaller folder: folders that share this many stems may be image + mask
SAMPLED_FILES = 5


@register_importer(
    "folders",
    "one folder per class (optionally inside train/val/test folders); <stem>_mask files are masks",
    {
        **seeded_split_help(when="when the folders carry no split"),
        "force": "import class folders even when two of them look like an image folder and its mask folder",
    },
)
def import_folders(
    src: Path,
    *,
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
    force: bool = False,
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
            _refuse_a_mask_folder(class_dir, images, class_dirs, src)
            pairs = pair_masks(images)
            if not pairs:
                empty.append(relative_ref(class_dir, src))
            found += [(split, class_dir.name, image, masks) for image, masks in pairs]
        if not force:
            _refuse_image_and_mask_folders(
                {d: [image for s, c, image, _ in found if s == split and c == d.name] for d in class_dirs}, src
            )
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
    seeded: dict[str, object] = {}
    if not presplit:
        plan = SeededSplit(fractions or DEFAULT_FRACTIONS, seed, "label")
        table["split"] = plan.apply(table).to_numpy()
        seeded[SEEDED_SPLIT_KEY] = plan.record()
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
            **seeded,
        },
    )
    return table, meta


def _mask_like(files: list[Path]) -> bool:
    """Whether sampled files of a folder all look like masks (an unreadable one says no)."""
    try:
        return all(looks_like_mask(read_image(path).array) for path in files[:SAMPLED_FILES])
    except ImageReadError:
        return False


def _mask_stems(files: list[Path]) -> set[str]:
    """Image stems that the ``<stem>_mask`` files among ``files`` name."""
    found = (MASK_STEM.match(split_suffix(p.name)[0]) for p in files)
    return {match["stem"] for match in found if match}


def _refuse_a_mask_folder(folder: Path, files: list[Path], class_dirs: list[Path], src: Path) -> None:
    """Refuse a "class" folder that holds only ``<stem>_mask`` files: it is the mask folder of another.

    Its masks have no images beside them, so ``folders`` could not pair them anyway; the message
    gives the ``images`` command, with the sibling folder holding most of their stems as images.
    """
    if not files or any(MASK_STEM.match(split_suffix(p.name)[0]) is None for p in files):
        return
    stems = _mask_stems(files)
    siblings = {d: len(stems & {split_suffix(p.name)[0] for p in d.iterdir()}) for d in class_dirs if d != folder}
    best = max(siblings, key=lambda d: siblings[d], default=None)
    images = relative_ref(best, src) if best is not None and siblings[best] else "IMAGE_FOLDER"
    raise DatasetImportError(
        f"class folder '{relative_ref(folder, src)}' holds only <stem>_mask files: it is a mask folder, not a "
        f"class. Import images and masks with: medalign data import images '{src}' -o MANIFEST "
        f"-O 'images={images}' -O 'masks={relative_ref(folder, src)}' -O mask_suffix=_mask"
    )


def _refuse_image_and_mask_folders(class_images: Mapping[Path, list[Path]], src: Path) -> None:
    """Refuse two "class" folders that are an image folder and its mask folder (matching stems)."""
    stems = {folder: {split_suffix(p.name)[0]: p for p in files} for folder, files in class_images.items()}
    for first, second in combinations(stems, 2):
        shared = sorted(set(stems[first]) & set(stems[second]), key=natural_key)
        smaller = min(len(stems[first]), len(stems[second]))
        if not shared or len(shared) < SHARED_STEM_SHARE * smaller:
            continue
        masks_first = _mask_like([stems[first][s] for s in shared])
        masks_second = _mask_like([stems[second][s] for s in shared])
        if masks_first == masks_second:
            continue
        images, masks = (second, first) if masks_first else (first, second)
        raise DatasetImportError(
            f"class folders '{relative_ref(images, src)}' and '{relative_ref(masks, src)}' share {len(shared)} "
            f"file stems and '{masks.name}' holds masks: they look like an image folder and its mask folder, "
            f"not two classes. Import them with: medalign data import images '{src}' -o MANIFEST "
            f"-O 'images={relative_ref(images, src)}' -O 'masks={relative_ref(masks, src)}' (or pass "
            "-O force=true to import the folders as classes anyway)"
        )
