"""LGG brain MRI segmentation (Buda et al. 2019; Kaggle ``lgg-mri-segmentation``).

Each slice file stores three co-registered sequences as colour channels (R = pre-contrast,
G = FLAIR, B = post-contrast), so the manifest names each one as its own modality through a
channel selector (``file#channel=1``) instead of writing three new files: the data stays in
place and the fusion tasks see three modalities. Where a sequence was missing the release
repeats FLAIR in that channel; nothing in the files says which cases those are, so they are
imported as they are.

Layout::

    <patient folder>/<patient folder>_<slice>.tif        (this pack: .jpg)
    <patient folder>/<patient folder>_<slice>_mask.tif   (this pack: .png)
    data.csv                                              one row per patient (``Patient`` = TCGA_XX_NNNN)

Patient folders carry the scan date (``TCGA_CS_4941_19960909``); the patient is the first
three parts, which is what ``data.csv`` uses and what the split groups by.

LGG has no radiology reports. ``record_text=True`` writes a ``text`` column for image-text
alignment (the curriculum's Stage II, ``configs/curriculum/lgg.yaml``): the patient's data.csv
record as a sentence (histological type, tumour site, location and laterality, the molecular
cluster assignments; the release's numeric codes as they are), never the two label columns, so
the same aligned encoder can be tuned for either target without having seen it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medalign.data.groups import SeededSplit
from medalign.data.importers.common import DEFAULT_FRACTIONS
from medalign.data.importers.options import seeded_split_help
from medalign.data.importers.registry import SEEDED_SPLIT_KEY, DatasetImportError, register_importer
from medalign.data.manifest import ManifestMeta, new_table, read_csv_text, relative_ref
from medalign.progress import progress

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")  # lossless first
CHANNELS: dict[str, int] = {"pre": 0, "flair": 1, "post": 2}
LABEL_SOURCES: dict[str, str] = {"label:death": "death01", "label:grade": "neoplasm_histologic_grade"}
RECORD_PHRASES: tuple[tuple[str, str], ...] = (  # data.csv column -> its words in the record text
    ("histological_type", "histological type"),
    ("tumor_tissue_site", "tumour site"),
    ("tumor_location", "location"),
    ("laterality", "laterality"),
    ("RNASeqCluster", "RNA-seq cluster"),
    ("MethylationCluster", "methylation cluster"),
    ("miRNACluster", "miRNA cluster"),
    ("CNCluster", "copy-number cluster"),
    ("RPPACluster", "RPPA cluster"),
    ("OncosignCluster", "oncosign cluster"),
    ("COCCluster", "cluster of clusters"),
)
PATIENT_COLUMN = "Patient"
IGNORED_FILES = frozenset({".DS_Store", "Thumbs.db"})


@register_importer(
    "lgg",
    "LGG brain MRI (Buda et al.): pre/FLAIR/post channels as modalities, FLAIR masks, data.csv labels",
    {
        "clinical": 'per-patient clinical CSV in SRC ("" imports images and masks without labels)',
        "record_text": "true: a text column with the patient's data.csv record (never death or grade) for alignment",
        **seeded_split_help(),
    },
)
def import_lgg(
    src: Path,
    *,
    clinical: str = "data.csv",
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    record_text: bool = False,
) -> tuple[pd.DataFrame, ManifestMeta]:
    """Import the LGG release; ``clinical=""`` imports the images and masks without labels.

    The split is by patient (slices of one brain are strongly correlated, so a slice-level split
    would leak); ``fractions`` defaults to train 0.7 / val 0.1 / test 0.2. ``record_text`` adds
    the ``text`` column described in the module docstring.
    """
    src = Path(src)
    if record_text and not clinical:
        raise DatasetImportError("record_text needs the clinical table (data.csv): it is written from it")
    clinical_rows = _read_clinical(src / clinical) if clinical else {}
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    unrecognised: list[str] = []
    orphan_masks: list[str] = []
    empty_folders: list[str] = []
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in progress(folders, desc="scan patients", unit="folder"):
        slices, masks, other = _scan_folder(folder)
        if not slices and not masks:
            empty_folders.append(relative_ref(folder, src))
            continue
        patient = "_".join(folder.name.split("_")[:3])
        for number, image in sorted(slices.items()):
            mask = masks.pop(number, None) or _expected_mask(image)
            row: dict[str, Any] = {"case_id": image.stem, "patient_id": patient}
            for name, channel in CHANNELS.items():
                row[f"image:{name}"] = f"{relative_ref(image, src)}#channel={channel}"
            row["mask"] = relative_ref(mask, src)
            row["attr:slice"] = number
            if clinical:
                row.update(_patient_cells(clinical_rows.get(patient)))
            if record_text:
                row["text"] = record_sentence(clinical_rows.get(patient))
            rows.append(row)
        orphan_masks += [relative_ref(m, src) for _, m in sorted(masks.items())]
        unrecognised += [relative_ref(p, src) for p in sorted(other)]

    if not rows:
        raise DatasetImportError(
            f"'{src}' has no patient folders with slices named '<folder>_<slice>.tif|.jpg' (LGG release "
            "layout); for the Kaggle archive pass its inner folder (kaggle_3m/)"
        )
    rows.sort(key=lambda r: (r["patient_id"], r["case_id"].rsplit("_", 1)[0], r["attr:slice"]))
    table = new_table(rows)
    plan = SeededSplit(fractions or DEFAULT_FRACTIONS, seed)
    table["split"] = plan.apply(table).tolist()
    extra[SEEDED_SPLIT_KEY] = plan.record()
    table = new_table(table.to_dict("records"))  # contract column order, split after patient_id

    patients = set(table["patient_id"])
    if clinical:
        missing = sorted(patients - set(clinical_rows))
        if missing:
            extra["patients_missing_from_clinical"] = missing
        unmatched = sorted(set(clinical_rows) - patients)
        if unmatched:
            extra["clinical_patients_without_images"] = unmatched
        empty = {
            column: sorted(p for p in patients & set(clinical_rows) if not clinical_rows[p].get(source, ""))
            for column, source in LABEL_SOURCES.items()
        }
        empty = {k: v for k, v in empty.items() if v}
        if empty:
            extra["patients_with_empty_labels"] = empty
    for key, values in (
        ("masks_without_image", orphan_masks),
        ("unused_files", unrecognised),
        ("folders_without_slices", empty_folders),
    ):
        if values:
            extra[key] = values
    extra["channels"] = {f"image:{name}": channel for name, channel in CHANNELS.items()}
    extra["split_source"] = f"assign_splits by patient, seed {seed}"
    classes = {"label:death": ["0", "1"]} if clinical else {}
    if clinical:
        classes["label:grade"] = sorted(v for v in table["label:grade"].unique() if v)
    meta = ManifestMeta(
        classes=classes,
        description=(
            "LGG brain MRI (TCGA, Buda et al.): one row per slice; image:pre/flair/post are the R/G/B "
            "channels of the slice file; mask = FLAIR abnormality; label:death (death01), label:grade "
            "(neoplasm_histologic_grade, data.csv codes); other data.csv columns as attr:*; split by patient"
        ),
        extra=extra,
    )
    return table, meta


def _read_clinical(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise DatasetImportError(
            f"clinical table '{path}' does not exist; pass clinical=\"\" to import the images without labels"
        )
    try:
        frame = read_csv_text(path, DatasetImportError)
    except DatasetImportError:
        raise
    except (ValueError, pd.errors.ParserError) as err:
        raise DatasetImportError(f"cannot parse clinical table '{path}': {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    required = [PATIENT_COLUMN, *LABEL_SOURCES.values()]
    absent = [c for c in required if c not in frame.columns]
    if absent:
        raise DatasetImportError(f"'{path}' lacks column(s) {absent}; found {list(frame.columns)}")
    rows: dict[str, dict[str, str]] = {}
    for position, record in enumerate(frame.to_dict("records")):
        line = position + 2  # 1-based, after the header
        patient = record[PATIENT_COLUMN].strip()
        if not patient:
            raise DatasetImportError(f"'{path}' line {line}: empty '{PATIENT_COLUMN}'")
        if patient in rows:
            raise DatasetImportError(f"'{path}' line {line}: patient {patient!r} appears more than once")
        rows[patient] = {k: _code(v) for k, v in record.items() if k != PATIENT_COLUMN}
    return rows


def _code(value: str) -> str:
    """``"2.0"`` -> ``"2"``: a table re-saved by pandas must not create a second class for the same code."""
    value = value.strip()
    return value[:-2] if re.fullmatch(r"-?\d+\.0", value) else value


def _patient_cells(record: dict[str, str] | None) -> dict[str, str]:
    if record is None:
        return {column: "" for column in LABEL_SOURCES}
    cells = {column: record.get(source, "") for column, source in LABEL_SOURCES.items()}
    cells.update(
        {f"attr:{key.lower()}": value for key, value in record.items() if key not in LABEL_SOURCES.values()}
    )
    return cells


def record_sentence(record: dict[str, str] | None) -> str:
    """A patient's data.csv record as one sentence, fields in ``RECORD_PHRASES`` order, empty ones left out.

    ``"Glioma record: histological type 1, tumour site 1, location 2, ..."``; a patient missing
    from data.csv (or with every field empty) gets an empty text, which the alignment data
    loading reports like any other empty text.
    """
    fields = [f"{words} {record[column]}" for column, words in RECORD_PHRASES if (record or {}).get(column)]
    return f"Glioma record: {', '.join(fields)}." if fields else ""


def _scan_folder(folder: Path) -> tuple[dict[int, Path], dict[int, Path], list[Path]]:
    """Slice number -> image, slice number -> mask, and the files not used (other names, second formats)."""
    pattern = re.compile(rf"{re.escape(folder.name)}_(\d+)(_mask)?")
    slices: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    other: list[Path] = []
    rank = {suffix: i for i, suffix in enumerate(IMAGE_SUFFIXES)}
    for path in sorted(folder.iterdir()):
        if path.name in IGNORED_FILES:
            continue
        match = pattern.fullmatch(path.stem)
        suffix = path.suffix.lower()
        if not path.is_file() or match is None or suffix not in rank:
            other.append(path)
            continue
        index = masks if match.group(2) else slices
        number = int(match.group(1))
        # the same slice in two formats (release TIFF next to a JPEG copy): keep the lossless one
        if number not in index:
            index[number] = path
        elif rank[suffix] < rank[index[number].suffix.lower()]:
            other.append(index[number])
            index[number] = path
        else:
            other.append(path)
    return slices, masks, other


def _expected_mask(image: Path) -> Path:
    """Where the mask should be; kept in the manifest when absent so that validation names it."""
    suffix = ".png" if image.suffix.lower() in (".jpg", ".jpeg") else image.suffix
    return image.with_name(f"{image.stem}_mask{suffix}")
