"""LLaVA / LLaVA-Med instruction data: ``[{"id", "image", "conversations": [...]}, ...]``.

One row per record. ``text`` is the first assistant answer, which is what image-text
alignment and captioning use; the whole conversation is kept as JSON in
``attr:conversation`` so that an instruction-tuning task can rebuild every turn. The first
question (without the ``<image>`` placeholder) is ``attr:question`` for VQA-style use.

``src`` must be a folder (manifest paths resolve against it); the annotation file inside it is
named by ``annotation`` or found as the only ``*.json`` / ``*.jsonl`` there. Images resolve
under ``src/image_folder`` like LLaVA's ``--image_folder``. Text-only records (LLaVA mixes
ShareGPT conversations in) are kept with an empty image cell and listed in
``meta.extra["text_only_records"]``, so validation names them instead of a silent drop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from medalign.data.groups import SeededSplit
from medalign.data.importers.common import DEFAULT_FRACTIONS
from medalign.data.importers.registry import SEEDED_SPLIT_KEY, DatasetImportError, register_importer
from medalign.data.jsonio import read_json, read_jsonl
from medalign.data.manifest import SPLITS, ManifestMeta, new_table, relative_ref

HUMAN_ROLES = frozenset({"human", "user"})
ANSWER_ROLES = frozenset({"gpt", "assistant"})
IMAGE_TOKEN = "<image>"


@register_importer(
    "llava",
    "LLaVA / LLaVA-Med conversation JSON: image + first answer as text, full conversation kept",
    {
        "annotation": "the conversation file (.json or .jsonl) in SRC (default: the only one there)",
        "image_folder": "folder the records' image paths resolve under, relative to SRC (LLaVA's --image_folder)",
        "split": "put every record in this split (train, val or test); default: a seeded 0.7/0.1/0.2 split",
        "seed": "seed of the record-level split (without split)",
    },
)
def import_llava(
    src: Path,
    *,
    annotation: str = "",
    image_folder: str = ".",
    split: str = "",
    seed: int = 0,
) -> tuple[pd.DataFrame, ManifestMeta]:
    """Import a LLaVA conversation file.

    LLaVA files carry no split: ``split="train"`` (etc.) puts every record in that split (one
    file per split, as LLaVA-Med ships its eval set); the default splits records 0.7/0.1/0.2
    with ``seed``, one record per patient since the format identifies no patients.
    """
    src = Path(src)
    if split and split not in SPLITS:
        raise DatasetImportError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    path = _annotation_path(src, annotation)
    records = _read_records(path)
    image_root = src / image_folder
    seen: dict[str, int] = {}
    parsed: list[tuple[str, list[str], list[dict[str, Any]]]] = []
    for position, record in enumerate(records):
        where = f"'{path}' record {position}"
        if not isinstance(record, dict):
            raise DatasetImportError(f"{where}: expected an object, got {type(record).__name__}")
        if "id" not in record or str(record["id"]).strip() == "":
            raise DatasetImportError(f"{where}: missing 'id'")
        case_id = str(record["id"]).strip()
        if case_id in seen:
            raise DatasetImportError(f"{where}: duplicate id {case_id!r} (first at record {seen[case_id]})")
        seen[case_id] = position
        parsed.append(
            (case_id, _images(record.get("image"), where), _conversation(record.get("conversations"), where))
        )

    if not parsed:
        raise DatasetImportError(f"'{path}' contains no records")
    most = max(len(images) for _, images, _ in parsed)
    columns = ["image"] if most <= 1 else [f"image:{i}" for i in range(most)]
    rows: list[dict[str, Any]] = []
    text_only: list[str] = []
    without_answer: list[str] = []
    for case_id, images, turns in parsed:
        row: dict[str, Any] = {"case_id": case_id, "patient_id": case_id}
        row.update({column: "" for column in columns})
        row.update(
            {
                column: relative_ref(image_root / image, src)
                for column, image in zip(columns, images, strict=False)
            }
        )
        answer = next((t["value"] for t in turns if t["from"] in ANSWER_ROLES), "")
        question = next((t["value"] for t in turns if t["from"] in HUMAN_ROLES), "")
        row["text"] = answer
        row["attr:question"] = question.replace(IMAGE_TOKEN, "").strip()
        row["attr:conversation"] = json.dumps(turns, ensure_ascii=False)
        rows.append(row)
        if not images:
            text_only.append(case_id)
        if not answer.strip():
            without_answer.append(case_id)
    table = new_table(
        rows, columns=["case_id", "patient_id", *columns, "text", "attr:question", "attr:conversation"]
    )
    table.insert(2, "split", split or "")
    seeded: dict[str, Any] = {}
    if not split:
        plan = SeededSplit(dict(DEFAULT_FRACTIONS), seed)
        table["split"] = plan.apply(table).tolist()
        seeded[SEEDED_SPLIT_KEY] = plan.record()
    extra: dict[str, Any] = {
        **seeded,
        "annotation": relative_ref(path, src),
        "image_folder": image_folder,
        "split_source": f"all records in {split!r}"
        if split
        else f"assign_splits 0.7/0.1/0.2 by record, seed {seed}",
    }
    if text_only:
        extra["text_only_records"] = sorted(text_only)
    if without_answer:
        extra["records_without_answer"] = sorted(without_answer)
    meta = ManifestMeta(
        description=(
            "LLaVA conversation data: one row per record; text = first assistant answer; "
            "attr:question = first human turn without <image>; attr:conversation = all turns as JSON"
        ),
        extra=extra,
    )
    return table, meta


def _annotation_path(src: Path, annotation: str) -> Path:
    if src.is_file():
        raise DatasetImportError(
            f"'{src}' is a file; pass the folder that holds it and annotation='{src.name}' "
            "(image paths are written relative to that folder)"
        )
    if annotation:
        path = src / annotation
        if not path.is_file():
            raise DatasetImportError(f"annotation file '{path}' does not exist")
        return path
    candidates = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise DatasetImportError(
            f"'{src}': cannot tell which file is the LLaVA annotation (found *.json/*.jsonl: {found}); "
            "name it with annotation=..."
        )
    return candidates[0]


def _read_records(path: Path) -> list[Any]:
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path, error=DatasetImportError)
    data = read_json(path, error=DatasetImportError)
    if not isinstance(data, list):
        raise DatasetImportError(f"'{path}': expected a JSON list of records, got {type(data).__name__}")
    return data


def _images(value: Any, where: str) -> list[str]:
    if value is None or value == "":
        return []
    images = [value] if isinstance(value, str) else value
    if not isinstance(images, list) or not all(isinstance(i, str) and i.strip() for i in images):
        raise DatasetImportError(f"{where}: 'image' must be a path or a list of paths, got {value!r}")
    return [i.strip() for i in images]


def _conversation(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DatasetImportError(f"{where}: 'conversations' must be a non-empty list of turns")
    for turn_index, turn in enumerate(value):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise DatasetImportError(
                f"{where}, turn {turn_index}: each turn needs string 'from' and 'value', got {turn!r}"
            )
    return value
