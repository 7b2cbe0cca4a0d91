"""MedPix 2.0: CT/MR images with per-image captions and per-case reports.

One row per image, because captions (the image-text pairs) and the zero-shot targets
(modality, plane, body region) are per image; ``patient_id`` is the clinical case (``MPX####``)
so that any patient-level split keeps a case's images together, as the release's own split does.
The case report (findings, diagnosis, history, ...) is repeated on every image of its case as
``attr:`` columns: a report task can pick ``attr:findings`` as its target without re-joining the
JSON, and the single ``text`` column stays the caption.

Release layout (Siragusa et al. 2025)::

    Descriptions.json            per image: U_id, image, Type, Location, Location Category,
                                 Description{Caption, Modality, Plane, Age, Sex, ...}
    Case_topic.json              per case: U_id, TAC, MRI, Case{Findings, Case Diagnosis, ...}, Topic{...}
    images/<image>.png           (this pack: .jpg; looked up by stem, both accepted)
    splitted_dataset/descriptions_{train,dev,test}.jsonl   case-disjoint split (dev -> val)
    splitted_dataset/data_{train,dev,test}.jsonl           the same split per case
    splitted_dataset/descriptions_train_{1,2}.jsonl        halves of train -> attr:subsplit
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from medalign.data.groups import SeededSplit
from medalign.data.importers.common import DEFAULT_FRACTIONS
from medalign.data.importers.registry import SEEDED_SPLIT_KEY, DatasetImportError, register_importer
from medalign.data.jsonio import read_json, read_jsonl
from medalign.data.manifest import ManifestMeta, new_table, relative_ref
from medalign.progress import progress

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")  # release format first: it names missing files
SPLIT_NAMES: dict[str, str] = {"train": "train", "dev": "val", "val": "val", "test": "test"}
SUBSPLITS: tuple[str, ...] = ("train_1", "train_2")
LABELS: dict[str, tuple[str, ...]] = {
    # column -> path into a Descriptions.json entry
    "label:modality": ("Type",),
    "label:plane": ("Description", "Plane"),
    "label:region": ("Location Category",),
}
IMAGE_ATTRS: dict[str, tuple[str, ...]] = {
    "attr:location": ("Location",),
    "attr:modality_detail": ("Description", "Modality"),
    "attr:age": ("Description", "Age"),
    "attr:sex": ("Description", "Sex"),
    "attr:acr_codes": ("Description", "ACR Codes"),
    "attr:figure_part": ("Description", "Figure Part"),
}
# Short names for the case fields that tasks ask for by name; other keys are snake-cased.
CASE_FIELD_NAMES: dict[str, str] = {"Case Diagnosis": "diagnosis", "Title": "title"}


@register_importer(
    "medpix",
    "MedPix 2.0 (Descriptions.json + Case_topic.json + splitted_dataset/): CT/MR image-caption pairs",
    {
        "images_dir": "folder of the images, relative to SRC",
        "seed": "seed of the 0.7/0.1/0.2 split, used only without splitted_dataset/",
    },
)
def import_medpix(
    src: Path,
    *,
    images_dir: str = "images",
    seed: int = 0,
) -> tuple[pd.DataFrame, ManifestMeta]:
    """Import MedPix 2.0 in its release layout.

    ``seed`` is used only when ``splitted_dataset/`` is absent (then cases are split 0.7/0.1/0.2
    with :func:`assign_splits`); with the release split present the split is the authors' one,
    so results stay comparable with theirs.
    """
    src = Path(src)
    descriptions = _read_json_list(src / "Descriptions.json")
    cases = _read_json_list(src / "Case_topic.json")
    case_by_id = _index_cases(cases, src / "Case_topic.json")
    image_dir = src / images_dir
    if not image_dir.is_dir():
        raise DatasetImportError(
            f"image folder '{image_dir}' does not exist (expected MedPix's images/ folder)"
        )
    on_disk = _images_by_stem(image_dir)
    split_dir = src / "splitted_dataset"
    image_split, case_split, subsplit = _read_splits(split_dir) if split_dir.is_dir() else ({}, {}, {})

    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    extra: dict[str, Any] = {}
    unsplit: list[str] = []
    without_report: list[str] = []
    missing_labels: dict[str, list[str]] = {}
    for position, entry in enumerate(descriptions):
        where = f"'{src / 'Descriptions.json'}' entry {position}"
        if not isinstance(entry, dict):
            raise DatasetImportError(f"{where}: expected an object, got {type(entry).__name__}")
        stem, case = _text(entry.get("image")), _text(entry.get("U_id"))
        if not stem or not case:
            raise DatasetImportError(
                f"{where}: missing 'image' or 'U_id' (got image={stem!r}, U_id={case!r})"
            )
        stem = _stem(stem)
        if stem in seen:
            raise DatasetImportError(
                f"{where}: image {stem!r} is described twice (first at entry {seen[stem]})"
            )
        seen[stem] = position
        path = on_disk.get(stem, image_dir / f"{stem}{IMAGE_SUFFIXES[0]}")
        split = image_split.get(stem) or case_split.get(case, "")
        if split_dir.is_dir() and not split:
            unsplit.append(stem)
            split = "train"
        row: dict[str, Any] = {
            "case_id": stem,
            "patient_id": case,
            "split": split,
            "image": relative_ref(path, src),
            "text": _text(_get(entry, ("Description", "Caption"))),
        }
        for column, keys in LABELS.items():
            row[column] = _text(_get(entry, keys))
            if not row[column]:
                missing_labels.setdefault(column, []).append(stem)
        row.update({column: _text(_get(entry, keys)) for column, keys in IMAGE_ATTRS.items()})
        row["attr:subsplit"] = subsplit.get(stem, "")
        if case in case_by_id:
            row.update(_case_attrs(case_by_id[case]))
        else:
            without_report.append(stem)
        rows.append(row)

    if not rows:
        raise DatasetImportError(f"'{src / 'Descriptions.json'}' lists no images")
    rows.sort(key=lambda r: r["case_id"])
    table = new_table(rows, columns=_column_order(rows))
    if not split_dir.is_dir():
        plan = SeededSplit(dict(DEFAULT_FRACTIONS), seed)
        table["split"] = plan.apply(table).tolist()
        extra[SEEDED_SPLIT_KEY] = plan.record()
        extra["split_source"] = f"no splitted_dataset/ folder: cases split 0.7/0.1/0.2 with seed {seed}"
    else:
        extra["split_source"] = "splitted_dataset/descriptions_{train,dev,test}.jsonl (dev -> val)"
    if unsplit:
        extra["unsplit_images_assigned_train"] = sorted(unsplit)
    if without_report:
        extra["images_without_case_report"] = sorted(without_report)
    if missing_labels:
        extra["missing_labels"] = {k: sorted(v) for k, v in sorted(missing_labels.items())}
    undescribed = sorted(set(on_disk) - set(seen))
    if undescribed:
        extra["images_without_description"] = [relative_ref(on_disk[s], src) for s in undescribed]
    listed = {_stem(_text(i)) for c in cases for key in ("TAC", "MRI") for i in (c.get(key) or [])}
    case_only = sorted(listed - set(seen) - {""})
    if case_only:
        extra["case_images_without_description"] = case_only
    classes = {column: sorted(v for v in table[column].unique() if v) for column in LABELS}
    meta = ManifestMeta(
        classes=classes,
        description=(
            "MedPix 2.0: one row per CT/MR image; text = image caption; label:modality (Type), "
            "label:plane, label:region (Location Category); case report fields as attr:* "
            "(attr:findings, attr:diagnosis, ...); patient_id = clinical case (MPX id)"
        ),
        extra=extra,
    )
    return table, meta


def _read_json_list(path: Path) -> list[Any]:
    data = read_json(path, error=DatasetImportError, hint=" (MedPix 2.0 release file)")
    if not isinstance(data, list):
        raise DatasetImportError(f"'{path}': expected a JSON list of entries, got {type(data).__name__}")
    return data


def _index_cases(cases: list[Any], path: Path) -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] = {}
    for position, case in enumerate(cases):
        uid = _text(case.get("U_id")) if isinstance(case, dict) else ""
        if not uid:
            raise DatasetImportError(f"'{path}' entry {position}: missing 'U_id'")
        if uid in index:
            raise DatasetImportError(f"'{path}' entry {position}: case {uid!r} appears twice")
        index[uid] = case
    return index


def _images_by_stem(folder: Path) -> dict[str, Path]:
    """Stem -> file; when a stem exists in several formats the release's (PNG) wins."""
    found: dict[str, Path] = {}
    rank = {suffix: i for i, suffix in enumerate(IMAGE_SUFFIXES)}
    for path in progress(sorted(folder.iterdir()), desc=f"scan {folder.name}", unit="file"):
        suffix = path.suffix.lower()
        if not path.is_file() or suffix not in rank:
            continue
        current = found.get(path.stem)
        if current is None or rank[suffix] < rank[current.suffix.lower()]:
            found[path.stem] = path
    return found


def _read_splits(folder: Path) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Image -> split, case -> split (fallback for images absent from the per-image files), image -> subsplit.

    A name in two splits would leak test data into training, so it is an error, not a choice.
    """
    image_split: dict[str, str] = {}
    case_split: dict[str, str] = {}
    origin: dict[tuple[str, str], str] = {}

    def put(index: dict[str, str], kind: str, key: str, split: str, path: Path) -> None:
        if key in index and index[key] != split:
            raise DatasetImportError(
                f"'{path}': {kind} {key!r} is in split {split!r} but also in {index[key]!r} "
                f"('{origin[kind, key]}'); the splits must be disjoint"
            )
        index[key] = split
        origin[kind, key] = str(path)

    for name, split in SPLIT_NAMES.items():
        described = folder / f"descriptions_{name}.jsonl"
        if described.is_file():
            for record in read_jsonl(described, error=DatasetImportError):
                put(image_split, "image", _stem(_text(record.get("image"))), split, described)
        per_case = folder / f"data_{name}.jsonl"
        if per_case.is_file():
            for record in read_jsonl(per_case, error=DatasetImportError):
                put(case_split, "case", _text(record.get("U_id")), split, per_case)
    subsplit: dict[str, str] = {}
    for name in SUBSPLITS:
        path = folder / f"descriptions_{name}.jsonl"
        if path.is_file():
            for record in read_jsonl(path, error=DatasetImportError):
                subsplit[_stem(_text(record.get("image")))] = name
    image_split.pop("", None)
    case_split.pop("", None)
    if not image_split and not case_split:
        raise DatasetImportError(
            f"'{folder}' has no descriptions_{{train,dev,test}}.jsonl or data_{{train,dev,test}}.jsonl split files"
        )
    return image_split, case_split, subsplit


def _case_attrs(case: dict[str, Any]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for key, value in sorted((case.get("Case") or {}).items()):
        attrs[f"attr:{CASE_FIELD_NAMES.get(key) or _snake(key)}"] = _text(value)
    for key, value in sorted((case.get("Topic") or {}).items()):
        attrs[f"attr:topic_{_snake(key)}"] = _text(value)
    return attrs


def _column_order(rows: list[dict[str, Any]]) -> list[str]:
    """Fixed columns first, then the case-report attributes sorted (their keys vary by case)."""
    fixed = ["case_id", "patient_id", "split", "image", "text", *LABELS, *IMAGE_ATTRS, "attr:subsplit"]
    others = sorted({key for row in rows for key in row} - set(fixed))
    return fixed + others


def _get(entry: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = entry
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value).strip()


def _stem(name: str) -> str:
    """Image names are stems in the release; tolerate ones written with their suffix."""
    return Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


def _snake(key: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", key.lower()).strip("_")
