"""Kvasir-SEG colonoscopy polyps (Jha et al. 2020) in its release layout.

Accepted layout (``src`` is the ``Kvasir-SEG`` folder)::

    images/<id>.jpg          colonoscopy frame
    masks/<id>.jpg           polyp mask, same id (JPEG: values spread around 0 and 255)
    kavsir_bboxes.json       optional: {id: {"height", "width", "bbox": [{"label", "xmin", ...}]}}

Every release image has a mask, so an image without one is an error. A mask or a bounding-box
entry without its image keeps its row, pointing at the missing ``images/<id>.jpg``, so that
``validate`` reports it instead of the case vanishing. The release masks are JPEG, hence
``mask_threshold = 127`` (PNG masks of a re-encoded copy need none and get none).

From the bounding-box file: ``attr:n_polyps`` (number of boxes) and ``attr:bbox``, a JSON list of
``[xmin, ymin, xmax, ymax]`` divided by the width and height recorded next to them. Boxes are
stored normalised because the recorded size is that of the original frame, and redistributed
copies are often resized (the copy in the shared data folder has a longer side of 384 px).

Splits: the PraNet protocol (900 train / 100 test) uses a list that is not part of the release,
so a seeded :func:`assign_splits` is used instead, default 0.8 / 0.1 / 0.1 (each image is its own
patient: Kvasir-SEG publishes no patient ids). Numbers are therefore comparable to PraNet's only
in spirit, not split-for-split.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medalign.data.groups import SeededSplit
from medalign.data.importers.common import (
    check_unique_ids,
    list_files,
    mask_threshold_for,
    natural_key,
    sanitize_id,
    split_suffix,
)
from medalign.data.importers.options import seeded_split_help
from medalign.data.importers.registry import SEEDED_SPLIT_KEY, DatasetImportError, register_importer
from medalign.data.manifest import ManifestMeta, new_table, relative_ref

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
BBOX_FILE = "kavsir_bboxes.json"  # sic: the release's spelling


def _by_stem(files: list[Path], folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        stem = split_suffix(path.name)[0]
        if stem in found:
            raise DatasetImportError(f"two files for id {stem!r} in '{folder}': '{found[stem]}' and '{path}'")
        found[stem] = path
    return found


def _boxes(entry: Any, where: str) -> tuple[int, str]:
    """(number of boxes, normalised boxes as JSON) for one bounding-box entry."""
    try:
        width, height = float(entry["width"]), float(entry["height"])
        boxes = [
            [box["xmin"] / width, box["ymin"] / height, box["xmax"] / width, box["ymax"] / height]
            for box in entry["bbox"]
        ]
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise DatasetImportError(
            f"{where}: expected {{'height', 'width', 'bbox': [{{'xmin', 'ymin', 'xmax', 'ymax'}}]}} ({err!r})"
        ) from err
    return len(boxes), json.dumps([[round(v, 4) for v in box] for box in boxes])


@register_importer(
    "kvasir",
    "Kvasir-SEG polyps: images/*.jpg + masks/*.jpg (+ kavsir_bboxes.json)",
    seeded_split_help(default="0.8,0.1,0.1"),
)
def import_kvasir(
    src: Path,
    *,
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
) -> tuple[pd.DataFrame, ManifestMeta]:
    """``fractions`` defaults to 0.8/0.1/0.1 (see the module docstring for why not PraNet's split)."""
    src = Path(src)
    images_dir, masks_dir = src / "images", src / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DatasetImportError(f"'{folder}' does not exist; expected Kvasir-SEG's images/ and masks/")
    image_files, ignored = list_files(images_dir, src)
    mask_files, ignored_masks = list_files(masks_dir, src)
    images, masks = _by_stem(image_files, images_dir), _by_stem(mask_files, masks_dir)
    without_mask = [relative_ref(images[s], src) for s in images if s not in masks]
    if without_mask:
        raise DatasetImportError(
            f"{len(without_mask)} image(s) without a mask in '{masks_dir}', e.g. {without_mask[:5]}"
        )
    boxes: dict[str, Any] | None = None
    bbox_path = src / BBOX_FILE
    if bbox_path.is_file():
        try:
            boxes = json.loads(bbox_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetImportError(f"cannot parse '{bbox_path}': {err}") from err
        if not isinstance(boxes, dict):
            raise DatasetImportError(
                f"'{bbox_path}' must map image ids to entries, got {type(boxes).__name__}"
            )

    ids = sorted(set(images) | set(masks) | set(boxes or {}), key=natural_key)
    rows = []
    for stem in ids:
        row = {
            "case_id": sanitize_id(stem),
            "patient_id": sanitize_id(stem),
            "split": "",
            "image": relative_ref(images.get(stem, images_dir / f"{stem}.jpg"), src),
            "mask": relative_ref(masks.get(stem, masks_dir / f"{stem}.jpg"), src),
        }
        if boxes is not None:
            if stem in boxes:
                count, normalised = _boxes(boxes[stem], f"'{bbox_path}' entry {stem!r}")
                row |= {"attr:n_polyps": str(count), "attr:bbox": normalised}
            else:
                row |= {"attr:n_polyps": "", "attr:bbox": ""}
        rows.append(row)
    if not rows:
        raise DatasetImportError(f"no images found in '{images_dir}'")
    check_unique_ids(rows)
    table = new_table(rows)
    plan = SeededSplit(fractions or DEFAULT_FRACTIONS, seed)
    table["split"] = plan.apply(table).to_numpy()
    meta = ManifestMeta(
        mask_threshold=mask_threshold_for(masks.values()),
        description=f"Kvasir-SEG layout (images/ + masks/): {len(images)} images, {len(masks)} masks",
        extra={
            "split_source": f"assign_splits(seed={seed})",
            SEEDED_SPLIT_KEY: plan.record(),
            "images_missing": [s for s in ids if s not in images],
            "without_bbox": [s for s in ids if boxes is not None and s not in boxes],
            "ignored_files": sorted({relative_ref(p, src) for p in ignored + ignored_masks}, key=natural_key),
        },
    )
    return table, meta
