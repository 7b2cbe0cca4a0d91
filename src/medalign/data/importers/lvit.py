"""LViT / C2FVL text-guided segmentation layout (MoNuSeg-text, QaTa-COV19-text).

Accepted layout (``src`` is the dataset folder, e.g. ``MoNuSeg`` or ``QaTa-COV19``)::

    {Train,Val,Test}_Folder/img/<image>            any subset of the three split folders
    {Train,Val,Test}_Folder/labelcol/<mask>.png    mask of the image with the same stem
    {Train,Val,Test}_Folder/{Train,Val,Test}_text.xlsx   columns Image, Description (+ extra columns)

The split is the folder's (Train -> train, Val -> val, Test -> test). Images, masks and xlsx rows
are matched on the file stem, ignoring a ``mask_`` prefix, because the releases disagree on
names: LViT looks text up by the *mask* file name (``<stem>.png``), MoNuSeg's test images are
``.tif`` while their masks and xlsx rows say ``.png``, and QaTa-COV19 names masks
``mask_<image>``. ``text`` is the Description; any other xlsx column (C2FVL's structured findings
such as lesion count, side and zone) becomes ``attr:<lower-cased name>``, except pandas'
``Unnamed: N`` index columns, which are listed in ``meta.extra["ignored_columns"]``.

Every image needs its mask (this is a segmentation layout), so one without is an error. An xlsx
row whose image is missing keeps its row, pointing at ``img/<Image>``, so ``validate`` reports
it (``meta.extra["text_without_image"]``); an image without an xlsx row keeps its row with empty
text (``meta.extra["images_without_text"]``); a mask with neither image nor xlsx row is listed in
``meta.extra["masks_without_image"]``. ``case_id`` is the image stem, unique across splits.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medalign.data.importers.common import (
    check_unique_ids,
    list_files,
    mask_threshold_for,
    natural_key,
    sanitize_id,
    split_suffix,
    strip_image_suffix,
)
from medalign.data.importers.registry import DatasetImportError, register_importer
from medalign.data.manifest import ManifestMeta, new_table, relative_ref

SPLIT_FOLDERS: dict[str, str] = {"Train": "train", "Val": "val", "Test": "test"}
IMAGE_COLUMN = "Image"
MASK_PREFIX = "mask_"


def _key(stem: str) -> str:
    return stem[len(MASK_PREFIX) :] if stem.startswith(MASK_PREFIX) else stem


def _index(files: list[Path], folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        key = _key(split_suffix(path.name)[0])
        if key in found:
            raise DatasetImportError(f"'{found[key]}' and '{path}' in '{folder}' have the same name stem")
        found[key] = path
    return found


def _read_text(path: Path, text_column: str) -> tuple[dict[str, dict[str, str]], dict[str, str], list[str]]:
    """({key: {"text", "attr:...", "_name", "_row"}}, {xlsx column: attr column}, ignored columns)."""
    try:
        frame = pd.read_excel(path, dtype=str)
    except Exception as err:  # openpyxl/zipfile/zlib/lxml each raise their own types on a damaged xlsx
        raise DatasetImportError(f"cannot read '{path}': {type(err).__name__}: {err}") from err
    frame = frame.fillna("")
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in (IMAGE_COLUMN, text_column) if c not in frame.columns]
    if missing:
        raise DatasetImportError(f"'{path}' lacks column(s) {missing}; it has {list(frame.columns)}")
    ignored = [c for c in frame.columns if c.startswith("Unnamed:")]
    attrs = {
        c: "attr:" + "_".join(c.lower().split())
        for c in frame.columns
        if c not in (IMAGE_COLUMN, text_column, *ignored)
    }
    rows: dict[str, dict[str, str]] = {}
    for index, record in enumerate(frame.to_dict("records")):
        excel_row = index + 2  # spreadsheet numbering: header is row 1
        name = str(record[IMAGE_COLUMN]).strip()
        if not name:
            raise DatasetImportError(f"'{path}' row {excel_row}: empty '{IMAGE_COLUMN}' cell")
        key = _key(strip_image_suffix(name))
        if key in rows:
            raise DatasetImportError(
                f"'{path}' row {excel_row}: {name!r} repeats the image of row {rows[key]['_row']}"
            )
        rows[key] = {"text": str(record[text_column]).strip(), "_name": name, "_row": str(excel_row)}
        rows[key] |= {column: str(record[c]).strip() for c, column in attrs.items()}
    return rows, attrs, ignored


@register_importer(
    "lvit",
    "LViT/C2FVL layout: {Train,Val,Test}_Folder/{img,labelcol}/ + <Split>_text.xlsx",
    {"text_column": "the xlsx column that becomes text (LViT: Description)"},
)
def import_lvit(src: Path, *, text_column: str = "Description") -> tuple[pd.DataFrame, ManifestMeta]:
    """``text_column`` names the xlsx column that becomes ``text`` (LViT: Description)."""
    src = Path(src)
    folders = [(name, src / f"{name}_Folder") for name in SPLIT_FOLDERS if (src / f"{name}_Folder").is_dir()]
    if not folders:
        raise DatasetImportError(f"'{src}' has none of Train_Folder, Val_Folder, Test_Folder (LViT layout)")
    rows: list[dict[str, str]] = []
    attr_columns: dict[str, None] = {}
    ignored_columns: list[str] = []
    ignored_files: list[Path] = []
    without_text: list[str] = []
    text_without_image: list[str] = []
    orphan_masks: list[str] = []
    masks_used: list[Path] = []
    for name, folder in folders:
        split = SPLIT_FOLDERS[name]
        img_dir, mask_dir, xlsx = folder / "img", folder / "labelcol", folder / f"{name}_text.xlsx"
        for required in (img_dir, mask_dir):
            if not required.is_dir():
                raise DatasetImportError(
                    f"'{required}' does not exist (LViT layout needs img/ and labelcol/)"
                )
        if not xlsx.is_file():
            raise DatasetImportError(f"'{xlsx}' does not exist (LViT layout: one text xlsx per split folder)")
        image_files, other = list_files(img_dir, src)
        mask_files, other_masks = list_files(mask_dir, src)
        ignored_files += other + other_masks + [p for p in folder.iterdir() if p.is_file() and p != xlsx]
        images, masks = _index(image_files, img_dir), _index(mask_files, mask_dir)
        texts, attrs, ignored = _read_text(xlsx, text_column)
        attr_columns |= dict.fromkeys(attrs.values())
        ignored_columns += [f"{relative_ref(xlsx, src)}:{c}" for c in ignored]
        no_mask = [relative_ref(images[k], src) for k in images if k not in masks]
        if no_mask:
            raise DatasetImportError(f"image(s) without a mask in '{mask_dir}': {no_mask[:5]}")
        for key in sorted(set(images) | set(texts), key=natural_key):
            text = texts.get(key, {})
            if key in images:
                image_ref = relative_ref(images[key], src)
                if not text:
                    without_text.append(image_ref)
            else:
                image_ref = relative_ref(img_dir / text["_name"].removeprefix(MASK_PREFIX), src)
                text_without_image.append(f"{relative_ref(xlsx, src)} row {text['_row']}")
            mask = masks.get(key, mask_dir / text.get("_name", ""))
            masks_used += [mask] if key in masks else []
            row = {
                "case_id": sanitize_id(key),
                "patient_id": sanitize_id(key),
                "split": split,
                "image": image_ref,
                "mask": relative_ref(mask, src),
                "text": text.get("text", ""),
            }
            row |= {c: v for c, v in text.items() if c.startswith("attr:")}
            rows.append(row)
        orphan_masks += [relative_ref(masks[k], src) for k in masks if k not in images and k not in texts]
    check_unique_ids(rows)
    for row in rows:
        row |= {c: row.get(c, "") for c in attr_columns}
    meta = ManifestMeta(
        mask_threshold=mask_threshold_for(masks_used),
        description=f"LViT-style text-guided segmentation from '{src.name}'",
        extra={
            "split_source": "folders",
            "images_without_text": without_text,
            "text_without_image": text_without_image,
            "masks_without_image": orphan_masks,
            "ignored_columns": ignored_columns,
            "ignored_files": sorted({relative_ref(p, src) for p in ignored_files}, key=natural_key),
        },
    )
    return new_table(rows), meta
