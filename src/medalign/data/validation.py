"""Manifest validation: every problem of every row, reported at once.

Users fix a dataset in one pass only if they see all of its problems together, so nothing
here stops at the first error. Image checks decode every referenced file (a truncated
JPEG has a valid header) in a thread pool, once per unique path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medalign.data.groups import file_stem, format_near_duplicates, near_duplicate_stems
from medalign.data.manifest import PLAIN_COLUMNS, SPLITS, Manifest, write_manifest
from medalign.data.readers import ImageReadError, read_image
from medalign.progress import progress

BINARY_MASK_VALUES = frozenset({0, 1, 255})
# A picture whose pixels sit at its two extremes (JPEG noise aside) is a mask, not a scan.
MASK_LIKE_SHARE = 0.98
MASK_LIKE_MARGIN = 0.1  # of the value range: "at an extreme" means within this of the min or max
MASK_LIKE_CHANNEL_DIFF = 8.0  # colour files of masks are gray: channels differ by at most this (mean)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one cell (or row, when ``column`` is empty)."""

    row: int  # 0-based position in the table; shown 1-based as in a spreadsheet body
    case_id: str
    column: str
    reason: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"row {self.row + 1}" if self.row >= 0 else "table"
        if self.case_id:
            where += f" (case_id={self.case_id})"
        if self.column:
            where += f", column '{self.column}'"
        return f"{self.severity}: {where}: {self.reason}"


@dataclass(frozen=True)
class _ImageInfo:
    spatial_shape: tuple[int, ...] | None
    mask_values: tuple[int, ...] | None
    error: str | None
    constant: float | None = None  # the single value of an image whose pixels are all equal
    orientation: str | None = None  # NIfTI axis codes (e.g. "RAS"); None for other formats
    mask_like: bool = False  # an image (not a mask cell) that looks like a mask: see looks_like_mask


def validate_manifest(
    manifest: Manifest,
    *,
    check_images: bool = True,
    text_only: bool | None = None,
    workers: int | None = None,
) -> list[Problem]:
    """All problems of a manifest, sorted by row. Errors make it unusable; warnings do not."""
    table = manifest.table
    text_only = manifest.meta.text_only if text_only is None else text_only
    problems: list[Problem] = []
    problems += _check_schema(manifest, text_only)
    if "case_id" not in table.columns:
        return problems
    problems += _check_ids(table)
    problems += _check_splits(table)
    problems += _check_labels(manifest)
    problems += _check_survival(table)
    problems += _check_required_cells(manifest, text_only)
    problems += _check_paths(manifest)
    problems += _check_near_duplicates(table)
    if check_images and not text_only:
        problems += _check_files(manifest, workers)
    return sorted(problems, key=lambda p: (p.row, p.column, p.reason))


def _check_schema(manifest: Manifest, text_only: bool) -> list[Problem]:
    table = manifest.table
    problems = []
    if "case_id" not in table.columns:
        problems.append(Problem(-1, "", "case_id", "required column 'case_id' is missing"))
    if not manifest.image_columns and not text_only:
        problems.append(
            Problem(
                -1,
                "",
                "",
                "no image column ('image' or 'image:<modality>'); declare the manifest text-only if intended",
            )
        )
    if text_only and "text" not in table.columns:
        problems.append(Problem(-1, "", "text", "a text-only manifest needs a 'text' column"))
    known = set(PLAIN_COLUMNS) | set(manifest.image_columns) | set(manifest.mask_columns)
    known |= set(manifest.label_columns) | set(manifest.attr_columns)
    for column in table.columns:
        if column not in known and not column.startswith("meta:"):
            problems.append(
                Problem(
                    -1,
                    "",
                    column,
                    "unknown column (not in the data contract; prefix it 'meta:' to keep it)",
                    "warning",
                )
            )
    for column in manifest.meta.classes:
        if column not in table.columns:
            problems.append(
                Problem(
                    -1, "", column, "classes are declared for a column the table does not have", "warning"
                )
            )
    return problems


def _case(table: pd.DataFrame, row: int) -> str:
    return str(table.at[row, "case_id"])


def _check_ids(table: pd.DataFrame) -> list[Problem]:
    problems = []
    first_row: dict[str, int] = {}
    for row, case_id in enumerate(table["case_id"]):
        if case_id == "":
            problems.append(Problem(row, "", "case_id", "empty case_id"))
        elif case_id in first_row:
            problems.append(
                Problem(
                    row, case_id, "case_id", f"duplicate case_id (first seen in row {first_row[case_id] + 1})"
                )
            )
        else:
            first_row[case_id] = row
    return problems


def _check_splits(table: pd.DataFrame) -> list[Problem]:
    if "split" not in table.columns:
        return []
    return [
        Problem(row, _case(table, row), "split", f"split {value!r} is not one of {', '.join(SPLITS)}")
        for row, value in enumerate(table["split"])
        if value not in SPLITS
    ]


def _check_labels(manifest: Manifest) -> list[Problem]:
    problems = _missing_label_warnings(manifest)
    table = manifest.table
    for column, classes in manifest.meta.classes.items():
        if column not in table.columns:
            continue
        allowed = set(classes)
        missing = manifest.missing_labels(column)
        for row, (value, absent) in enumerate(zip(table[column], missing, strict=True)):
            if not absent and value not in allowed:
                problems.append(
                    Problem(
                        row,
                        _case(table, row),
                        column,
                        f"label {value!r} is not in the class list {list(classes)}",
                    )
                )
    return problems


def _missing_label_warnings(manifest: Manifest) -> list[Problem]:
    """One warning per label column where some (not all) rows have no label: losses and metrics skip them."""
    problems = []
    for column in manifest.label_columns:
        missing = manifest.missing_labels(column)
        count = int(missing.sum())
        if 0 < count < len(missing):
            ids = manifest.table.loc[missing, "case_id"].tolist()
            words = sorted({v for v in manifest.table.loc[missing, column] if v})
            spelled = f"; written as {', '.join(map(repr, words))}" if words else ""
            shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
            problems.append(
                Problem(
                    -1,
                    "",
                    column,
                    f"{count} of {len(missing)} rows have no label (case_id {shown}){spelled}; they are left "
                    "out of this column's losses and metrics",
                    "warning",
                )
            )
    return problems


def _check_near_duplicates(table: pd.DataFrame) -> list[Problem]:
    """Frames or slices of one sequence in different splits: a split that leaks."""
    found = near_duplicate_stems(table)
    return [Problem(-1, "", "split", format_near_duplicates(found), "warning")] if found else []


def _check_survival(table: pd.DataFrame) -> list[Problem]:
    has_time, has_event = "time" in table.columns, "event" in table.columns
    if has_time != has_event:
        present, missing = ("time", "event") if has_time else ("event", "time")
        return [
            Problem(-1, "", missing, f"survival needs both 'time' and 'event'; only '{present}' is present")
        ]
    if not has_time:
        return []
    problems = []
    for row, (time, event) in enumerate(zip(table["time"], table["event"], strict=True)):
        if time == "" and event == "":
            continue
        try:
            value = float(time)
            if not math.isfinite(value) or value < 0:
                raise ValueError
        except ValueError:
            problems.append(
                Problem(row, _case(table, row), "time", f"time {time!r} is not a finite number >= 0")
            )
        if event not in ("0", "1"):
            problems.append(Problem(row, _case(table, row), "event", f"event {event!r} must be 0 or 1"))
    return problems


def _check_required_cells(manifest: Manifest, text_only: bool) -> list[Problem]:
    table, problems = manifest.table, []
    if text_only:
        problems += (
            [
                Problem(row, _case(table, row), "text", "empty text in a text-only manifest")
                for row, value in enumerate(table["text"])
                if value == ""
            ]
            if "text" in table.columns
            else []
        )
        return problems
    images = manifest.image_columns
    for row in range(len(table)):
        if images and all(table.at[row, c] == "" for c in images):
            problems.append(
                Problem(row, _case(table, row), ",".join(images), "no image in any modality column")
            )
    if "text" in table.columns and (table["text"] != "").any():
        problems += [
            Problem(row, _case(table, row), "text", "empty text (other rows have text)", "warning")
            for row, value in enumerate(table["text"])
            if value == ""
        ]
    return problems


def _check_paths(manifest: Manifest) -> list[Problem]:
    """Path cells that leave the root are errors unless the sidecar allows it (see Manifest.resolve)."""
    return [
        Problem(
            row,
            _case(manifest.table, row),
            column,
            f"path {cell!r} points outside the manifest root '{manifest.root}'; set "
            '"allow_outside_root": true in the sidecar if the data really lives there',
        )
        for row, column, cell in manifest.rows_outside_root()
    ]


def _check_files(manifest: Manifest, workers: int | None) -> list[Problem]:
    table = manifest.table
    images, masks = manifest.image_columns, manifest.mask_columns

    def readable(cell: str) -> bool:  # cells outside the root are reported by _check_paths, never read
        return cell != "" and not manifest.outside_root(cell)

    refs = {manifest.resolve(v) for c in images + masks for v in table[c] if readable(v)}
    mask_refs = {manifest.resolve(v) for c in masks for v in table[c] if readable(v)}
    infos = _inspect_all(sorted(refs), mask_refs, workers)
    check_values = manifest.meta.mask_threshold is None
    problems: list[Problem] = []
    for row in range(len(table)):
        case_id = _case(table, row)
        image_shapes: dict[str, tuple[int, ...]] = {}
        for column in images + masks:
            cell = table.at[row, column]
            if not readable(cell):
                continue
            info = infos[manifest.resolve(cell)]
            if info.error:
                problems.append(Problem(row, case_id, column, info.error))
                continue
            assert info.spatial_shape is not None
            if column in images:
                image_shapes[column] = info.spatial_shape
                problems += _image_warnings(row, case_id, column, cell, info)
                continue
            problems += _mask_problems(row, case_id, column, cell, info, image_shapes, check_values)
        if len(set(image_shapes.values())) > 1:
            sizes = ", ".join(f"{c}={'x'.join(map(str, s))}" for c, s in image_shapes.items())
            problems.append(Problem(row, case_id, "", f"modalities differ in size ({sizes})", "warning"))
    return problems + _orientation_warnings(manifest, infos) + _masks_among_images(manifest, infos)


def _image_warnings(row: int, case_id: str, column: str, cell: str, info: _ImageInfo) -> list[Problem]:
    """A blank (constant) scan usually means a failed export; it trains as noise, so say which row."""
    if info.constant is None:
        return []
    return [
        Problem(
            row,
            case_id,
            column,
            f"image '{cell}' is blank: every pixel is {info.constant:g} (a failed export?)",
            "warning",
        )
    ]


def _masks_among_images(manifest: Manifest, infos: dict[str, _ImageInfo]) -> list[Problem]:
    """Image cells that hold masks: mask-like files sharing their file stem with a real image.

    The trace of a mask folder imported as a class (``folders`` on ``images/`` + ``masks/``) or
    as a modality column; one warning per column, naming the first pairs.
    """
    table = manifest.table
    cells = []
    for column in manifest.image_columns:
        for row, cell in enumerate(table[column]):
            info = infos.get(manifest.resolve(cell)) if cell and not manifest.outside_root(cell) else None
            if info is not None and info.error is None:
                cells.append((row, column, cell, info.mask_like))
    pictures: dict[str, str] = {}
    for _, _, cell, mask_like in cells:
        if not mask_like:
            pictures.setdefault(file_stem(cell), cell)
    flagged: dict[str, list[tuple[str, str]]] = {}
    for _, column, cell, mask_like in cells:
        partner = pictures.get(file_stem(cell))
        if mask_like and partner is not None and partner != cell:
            flagged.setdefault(column, []).append((cell, partner))
    return [
        Problem(
            -1,
            "",
            column,
            f"{len(pairs)} image(s) look like masks (gray, nearly every pixel black or white) and share their "
            f"file stem with another image, e.g. "
            + ", ".join(f"'{mask}' ~ '{image}'" for mask, image in pairs[:3])
            + ": masks imported as images? Import an image folder with its mask folder with "
            "`medalign data import images SRC -o MANIFEST -O images=DIR -O masks=DIR`",
            "warning",
        )
        for column, pairs in flagged.items()
    ]


def _orientation_warnings(manifest: Manifest, infos: dict[str, _ImageInfo]) -> list[Problem]:
    """NIfTI volumes are read as stored, so volumes stored in another orientation than most show mirrored anatomy."""
    table, cells = manifest.table, []
    for column in manifest.image_columns + manifest.mask_columns:
        for row, cell in enumerate(table[column]):
            info = infos.get(manifest.resolve(cell)) if cell and not manifest.outside_root(cell) else None
            if info is not None and info.orientation:
                cells.append((row, column, cell, info.orientation))
    counts: dict[str, int] = {}
    for *_, orientation in cells:
        counts[orientation] = counts.get(orientation, 0) + 1
    if len(counts) < 2:
        return []
    usual = max(sorted(counts), key=lambda o: counts[o])
    return [
        Problem(
            row,
            _case(table, row),
            column,
            f"volume '{cell}' is stored {orientation} while {counts[usual]} other volume(s) are {usual}; "
            "volumes are read as stored, so its anatomy appears flipped/permuted relative to them",
            "warning",
        )
        for row, column, cell, orientation in cells
        if orientation != usual
    ]


def _mask_problems(
    row: int,
    case_id: str,
    column: str,
    cell: str,
    info: _ImageInfo,
    image_shapes: dict[str, tuple[int, ...]],
    check_values: bool,
) -> list[Problem]:
    problems = []
    if image_shapes:
        image_column, image_shape = next(iter(image_shapes.items()))
        if info.spatial_shape != image_shape:
            problems.append(
                Problem(
                    row,
                    case_id,
                    column,
                    f"mask '{cell}' is {'x'.join(map(str, info.spatial_shape or ()))} but {image_column} is "
                    f"{'x'.join(map(str, image_shape))}",
                )
            )
    if check_values and info.mask_values is not None:
        odd = sorted(set(info.mask_values) - BINARY_MASK_VALUES)
        if odd:
            shown = ", ".join(map(str, odd[:8])) + (" ..." if len(odd) > 8 else "")
            problems.append(
                Problem(
                    row,
                    case_id,
                    column,
                    f"mask '{cell}' has values other than 0/1/255 ({shown}); set mask_threshold in the manifest "
                    "metadata if it is a thresholded (e.g. JPEG) mask",
                )
            )
    return problems


def _inspect_all(refs: list[str], mask_refs: set[str], workers: int | None) -> dict[str, _ImageInfo]:
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos = pool.map(lambda ref: _inspect(ref, ref in mask_refs), refs)
        return dict(zip(refs, progress(infos, desc="validate", unit="file", total=len(refs)), strict=True))


def _inspect(ref: str, is_mask: bool) -> _ImageInfo:
    try:
        image = read_image(ref)
    except ImageReadError as err:
        return _ImageInfo(None, None, str(err))
    except Exception as err:  # an unexpected decoder failure is still a per-file problem, not a crash
        return _ImageInfo(None, None, f"cannot read '{ref}': {type(err).__name__}: {err}")
    array = image.array
    orientation = image.meta.get("orientation")
    if not is_mask:
        constant = float(array.flat[0]) if array.size and array.min() == array.max() else None
        mask_like = not image.is_3d and looks_like_mask(array)
        return _ImageInfo(tuple(image.spatial_shape), None, None, constant, orientation, mask_like)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
        values: tuple[int, ...] = (-1,)
    else:
        values = tuple(int(v) for v in np.unique(array)[:64])
    return _ImageInfo(tuple(image.spatial_shape), values, None, orientation=orientation)


def looks_like_mask(array: np.ndarray) -> bool:
    """Whether an image is really a mask: gray, and nearly every pixel at its minimum or maximum.

    Used to tell an image folder from its mask folder (``folders`` refuses to make classes of
    them, ``validate`` warns when a column of images holds masks). A blank black image counts as
    a mask (a normal case's empty mask); JPEG masks pass, their noise stays near the extremes.
    """
    pixels = np.asarray(array)
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        color = pixels[..., :3].astype(np.float32)
        if float(np.abs(color - color.mean(axis=-1, keepdims=True)).mean()) > MASK_LIKE_CHANNEL_DIFF:
            return False
        pixels = color.mean(axis=-1)
    if pixels.ndim != 2 or pixels.size == 0:
        return False
    pixels = pixels[:: max(1, pixels.shape[0] // 128), :: max(1, pixels.shape[1] // 128)].astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    if high == low:
        return low == 0.0
    margin = MASK_LIKE_MARGIN * (high - low)
    extreme = (pixels <= low + margin) | (pixels >= high - margin)
    return float(extreme.mean()) >= MASK_LIKE_SHARE


def errors(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def drop_invalid(
    manifest: Manifest, problems: list[Problem], out: str | os.PathLike, log: str | os.PathLike | None = None
) -> tuple[Path, Path, int]:
    """Write a manifest without the rows that have errors, and a CSV log of what was dropped and why.

    Table-level errors (row -1, e.g. a missing column) cannot be fixed by dropping rows, so they
    raise instead of producing an empty or still-invalid manifest.
    """
    table_level = [p for p in errors(problems) if p.row < 0]
    if table_level:
        raise ValueError("cannot drop rows to fix table-level problems: " + "; ".join(map(str, table_level)))
    bad_rows = sorted({p.row for p in errors(problems)})
    out = Path(out)
    log = Path(log) if log else out.with_name(out.name + ".dropped.csv")
    kept = manifest.subset(~manifest.table.index.isin(bad_rows))
    write_manifest(kept, out, root=manifest.root)
    records = [
        {"row": p.row + 1, "case_id": p.case_id, "column": p.column, "reason": p.reason}
        for p in errors(problems)
    ]
    pd.DataFrame(records, columns=["row", "case_id", "column", "reason"]).to_csv(log, index=False)
    return out, log, len(bad_rows)
