"""R2Gen-style ``annotation.json`` for radiology report generation (IU X-ray, MIMIC-CXR).

The file is ``{"train": [...], "val": [...], "test": [...]}`` of studies with ``id``,
``report`` and ``image_path`` (a list). Two variants are in circulation and both are read:

* R2Gen (Chen et al. 2020): ``id = "CXR2384_IM-0942"``, ``image_path = ["CXR2384_IM-0942/0.png",
  "CXR2384_IM-0942/1.png"]`` (frontal, lateral), each entry repeats its ``split``;
* derived releases (e.g. this pack's IU X-ray): ``id = "2384"``, ``image_path`` = bare file
  names such as ``CXR2384_IM-0942-1001.png``, one to five per study, no ``split`` field.

R2Gen feeds ``image_path[0]`` and ``image_path[1]`` to its two-view encoder, so those become
``image:frontal`` and ``image:lateral``; further views are kept in ``attr:extra_images`` rather
than invented modalities. The patient is the ``CXR####`` number (IU has one study per number)
or MIMIC-CXR's ``subject_id``, so that patient-level re-splits stay leak-free.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from medalign.data.importers.registry import DatasetImportError, register_importer
from medalign.data.jsonio import read_json
from medalign.data.manifest import SPLITS, ManifestMeta, new_table, relative_ref

VIEWS: tuple[str, ...] = ("frontal", "lateral")
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
PATIENT_PATTERN = re.compile(r"(CXR\d+)")


@register_importer(
    "r2gen",
    "R2Gen annotation.json (IU X-ray / MIMIC-CXR reports): frontal + lateral views, report text",
    {
        "annotation": "the annotation file in SRC",
        "images_dir": "folder the image paths resolve under, relative to SRC (as in R2Gen)",
        "text_only": "declare the manifest text-only (the images are not present)",
    },
)
def import_r2gen(
    src: Path,
    *,
    annotation: str = "annotation.json",
    images_dir: str = "images",
    text_only: bool = False,
) -> tuple[pd.DataFrame, ManifestMeta]:
    """Import an R2Gen annotation file; image paths resolve under ``src/images_dir`` as in R2Gen.

    ``text_only=True`` is for report corpora shipped without their images (tokenizer and
    report-metric work): the paths are still written, but validation does not require the files.
    """
    src = Path(src)
    path = src / annotation
    data = _read(path)
    unknown = sorted(set(data) - set(SPLIT_ALIASES))
    if unknown:
        raise DatasetImportError(f"'{path}': unknown split key(s) {unknown}; expected {list(SPLITS)}")
    image_root = src / images_dir
    rows: list[dict[str, Any]] = []
    first_seen: dict[str, str] = {}
    empty_reports: list[str] = []
    without_images: list[str] = []
    for key in sorted(data, key=lambda k: SPLITS.index(SPLIT_ALIASES[k])):
        split = SPLIT_ALIASES[key]
        entries = data[key]
        if not isinstance(entries, list):
            raise DatasetImportError(
                f"'{path}': [{key!r}] should be a list of studies, got {type(entries).__name__}"
            )
        for position, entry in enumerate(entries):
            where = f"'{path}' [{key!r}][{position}]"
            if not isinstance(entry, dict) or "id" not in entry:
                raise DatasetImportError(f"{where}: expected an object with 'id', 'report' and 'image_path'")
            case_id = str(entry["id"]).strip()
            if not case_id:
                raise DatasetImportError(f"{where}: empty 'id'")
            if case_id in first_seen:
                raise DatasetImportError(f"{where}: id {case_id!r} already used at {first_seen[case_id]}")
            first_seen[case_id] = f"[{key!r}][{position}]"
            stated = str(entry.get("split", "")).strip()
            if stated and SPLIT_ALIASES.get(stated) != split:
                raise DatasetImportError(f"{where}: entry says split {stated!r} but is listed under {key!r}")
            images = entry.get("image_path", [])
            images = [images] if isinstance(images, str) else images
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise DatasetImportError(f"{where}: 'image_path' must be a list of paths, got {images!r}")
            report = entry.get("report", "")
            if not isinstance(report, str):
                raise DatasetImportError(f"{where}: 'report' must be a string, got {type(report).__name__}")
            refs = [relative_ref(image_root / image, src) for image in images]
            row: dict[str, Any] = {
                "case_id": case_id,
                "patient_id": _patient(entry, case_id, images),
                "split": split,
            }
            row.update({f"image:{view}": ref for view, ref in zip(VIEWS, refs, strict=False)})
            row["text"] = report
            row["attr:extra_images"] = ";".join(refs[len(VIEWS) :])
            row["attr:n_images"] = len(refs)
            if "study_id" in entry:  # MIMIC-CXR: several images (rows) per study
                row["attr:study_id"] = str(entry["study_id"])
            rows.append(row)
            if not report.strip():
                empty_reports.append(case_id)
            if not refs:
                without_images.append(case_id)
    if not rows:
        raise DatasetImportError(f"'{path}' contains no studies")
    columns = ["case_id", "patient_id", "split", *(f"image:{v}" for v in VIEWS), "text"]
    columns += ["attr:extra_images", "attr:n_images"]
    columns += ["attr:study_id"] if any("attr:study_id" in row for row in rows) else []
    table = new_table(rows, columns=columns)
    extra: dict[str, Any] = {"annotation": annotation, "images_dir": images_dir}
    if empty_reports:
        extra["empty_reports"] = sorted(empty_reports)
    if without_images:
        extra["studies_without_images"] = sorted(without_images)
    meta = ManifestMeta(
        text_only=text_only,
        description=(
            "R2Gen annotation.json: one row per study; text = report; image:frontal / image:lateral = "
            "image_path[0] / [1] (R2Gen's two views), further views in attr:extra_images"
        ),
        extra=extra,
    )
    return table, meta


def _read(path: Path) -> dict[str, Any]:
    data = read_json(path, error=DatasetImportError, hint=" (R2Gen layout: <src>/annotation.json)")
    if not isinstance(data, dict):
        raise DatasetImportError(f'\'{path}\': expected {{"train": [...], "val": [...], "test": [...]}}')
    return data


def _patient(entry: dict[str, Any], case_id: str, images: list[str]) -> str:
    """MIMIC-CXR's ``subject_id``; else IU's ``CXR####`` from the id or the first image name; else the id."""
    subject = str(entry.get("subject_id", "")).strip()
    if subject:
        return subject
    for candidate in (case_id, *(Path(i).name for i in images[:1])):
        match = PATIENT_PATTERN.search(candidate)
        if match:
            return match.group(1)
    return case_id
