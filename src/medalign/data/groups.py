"""Patients (groups) of cases, and the checks that keep one patient out of two splits.

A random split over frames leaks: near-identical frames of one patient or video sequence land
in train and test, and test scores measure memory, not generalisation. The manifest's answer
is ``patient_id``: :func:`medalign.data.manifest.assign_splits` keeps each patient in one
split. This module fills it in from what a dataset has, a column (``--group-by``; ``-O
group_by=`` on importers) or a pattern in the file name (``--group-regex``; ``-O group_regex=``),
and reports what still looks leaky: near-duplicate file stems (``seq1_frame003`` / ``seq1_frame004``) that sit in different splits
(:func:`near_duplicate_stems`) and groups that a release split spreads over several splits
(:func:`groups_across_splits`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import pandas as pd

from medalign.data.manifest import ATTR_PREFIX, SPLITS, assign_splits
from medalign.data.readers import ImageReadError, parse_image_ref

GROUP_NAME = "group"  # the named regex group that holds the patient/sequence id
_LAST_DIGITS = re.compile(r"(\d+)(?!.*\d)")
# A near-duplicate key without digits of its own ("benign (#)") is a class prefix, not a
# sequence, unless its group is small: above this share of the rows it is not reported.
GENERIC_KEY_SHARE = 0.1


class GroupingError(ValueError):
    """A grouping option cannot be applied (unknown column, bad regex); one line for the user."""


def resolve_column(table: pd.DataFrame, name: str) -> str:
    """The column ``name`` means: itself, or the ``attr:``/``meta:``/``label:`` column importers made of it
    (``3`` is ``attr:column3``, the third column of a header-less label table)."""
    if name in table.columns:
        return name
    candidates = [f"{ATTR_PREFIX}{'_'.join(name.lower().split())}", f"meta:{name}", f"label:{name}"]
    if name.isdigit():  # a column of a header-less label table, by position (the images importer)
        candidates.append(f"{ATTR_PREFIX}column{name}")
    for candidate in candidates:
        if candidate in table.columns:
            return candidate
    close = difflib.get_close_matches(name, list(table.columns), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise GroupingError(f"no column {name!r} to group by{hint}; columns: {', '.join(table.columns)}")


def file_stem(ref: str) -> str:
    """``images/seq1_f03.png#frame=2`` -> ``seq1_f03`` (``.nii.gz`` counts as one suffix)."""
    try:
        path = parse_image_ref(ref)[0].as_posix()
    except ImageReadError:  # a doubled selector key: validation reports it, the name is still usable
        path = ref
    name = PurePosixPath(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else PurePosixPath(name).stem


def first_image_column(table: pd.DataFrame) -> str | None:
    columns = [c for c in table.columns if c == "image" or c.startswith("image:")]
    return columns[0] if columns else None


@dataclass(frozen=True)
class Grouping:
    """Group id per row, plus the rows that had none (they stay groups of their own)."""

    groups: pd.Series
    ungrouped: list[str]  # case_ids
    source: str  # what the groups came from, for the sidecar


def group_ids(
    table: pd.DataFrame, *, group_by: str | None = None, group_regex: str | None = None
) -> Grouping:
    """Group (patient) of every row from a column or a regex over the first image's file name.

    ``group_regex`` is searched in the file name (without folders and suffix); its named group
    ``group``, else its first group, else the whole match is the group id. A row without a value
    (empty cell, no match) is its own group and is listed in ``ungrouped``, never dropped.
    """
    if (group_by is None) == (group_regex is None):
        raise GroupingError("give exactly one of group_by (a column) and group_regex (a file-name pattern)")
    ids = table["case_id"]
    if group_by is not None:
        column = resolve_column(table, group_by)
        values = table[column]
        source = f"column {column!r}"
    else:
        assert group_regex is not None
        try:
            pattern = re.compile(group_regex)
        except re.error as err:
            raise GroupingError(
                f"group regex '{group_regex}' is not a valid regular expression: {err}"
            ) from err
        image = first_image_column(table)
        if image is None:
            raise GroupingError("group_regex reads image file names, but the manifest has no image column")
        values = pd.Series(
            [_match(pattern, file_stem(ref)) if ref else "" for ref in table[image]], index=table.index
        )
        source = f"regex '{group_regex}' on the file names of {image!r}"
    ungrouped = [str(case) for case, value in zip(ids, values, strict=True) if value == ""]
    if len(ungrouped) == len(table) and len(table):
        raise GroupingError(f"the {source} gives no group for any row (e.g. case_id {ids.iloc[0]!r})")
    return Grouping(values.where(values != "", ids).rename("patient_id"), ungrouped, source)


def _match(pattern: re.Pattern[str], stem: str) -> str:
    found = pattern.search(stem)
    if found is None:
        return ""
    if GROUP_NAME in pattern.groupindex:
        return found[GROUP_NAME] or ""
    return (found[1] if pattern.groups else found[0]) or ""


@dataclass(frozen=True)
class SeededSplit:
    """The seeded patient-level split an importer used, kept so that grouping can redo it."""

    fractions: Mapping[str, float]
    seed: int = 0
    stratify: str | None = None

    def apply(self, table: pd.DataFrame, groups: pd.Series | None = None) -> pd.Series:
        stratify = self.stratify if self.stratify in table.columns else None
        return assign_splits(table, dict(self.fractions), seed=self.seed, stratify=stratify, groups=groups)

    def record(self) -> dict[str, object]:
        return {"fractions": dict(self.fractions), "seed": self.seed, "stratify": self.stratify}

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> SeededSplit:
        fractions = record["fractions"]
        seed = record.get("seed", 0)
        stratify = record.get("stratify")
        assert isinstance(fractions, Mapping) and isinstance(seed, int)
        return cls(dict(fractions), seed, stratify if isinstance(stratify, str) else None)


@dataclass(frozen=True)
class NearDuplicates:
    """File stems that differ only in their last number and sit in more than one split."""

    key: str  # the stem with its last number replaced by '#'
    by_split: dict[str, list[str]]

    def __str__(self) -> str:
        parts = ", ".join(
            f"{split} {len(stems)} ({', '.join(stems[:2])}{', ...' if len(stems) > 2 else ''})"
            for split, stems in self.by_split.items()
        )
        return f"'{self.key}': {parts}"


def near_duplicate_stems(table: pd.DataFrame, column: str | None = None) -> list[NearDuplicates]:
    """Groups of file stems equal up to their last number (frames, slices) that span splits.

    Stems are compared with their last run of digits replaced by ``#`` (``seq1_frame003`` ->
    ``seq1_frame#``). A key with no other digit (``benign (#)``) names a class or a running
    number rather than a sequence, so it is reported only when its group is small (at most
    :data:`GENERIC_KEY_SHARE` of the rows). Rows of one patient are never a finding: they are
    in one split by construction.
    """
    column = column or first_image_column(table)
    if column is None or "split" not in table.columns or len(table) == 0:
        return []
    patients = _patients(table)
    members: dict[str, list[tuple[str, str, str]]] = {}
    for ref, split, patient in zip(table[column], table["split"], patients, strict=True):
        if not ref:
            continue
        stem = file_stem(ref)
        key = _LAST_DIGITS.sub("#", stem, count=1)
        if key != stem:
            members.setdefault(key, []).append((stem, split, patient))
    found = []
    for key, rows in sorted(members.items()):
        if len({split for _, split, _ in rows}) < 2 or len({patient for *_, patient in rows}) < 2:
            continue
        if not any(ch.isdigit() for ch in key) and len(rows) > max(2, GENERIC_KEY_SHARE * len(table)):
            continue
        by_split = {
            split: sorted(stem for stem, s, _ in rows if s == split)
            for split in [*SPLITS, *sorted({s for _, s, _ in rows} - set(SPLITS))]
            if any(s == split for _, s, _ in rows)
        }
        found.append(NearDuplicates(key, by_split))
    return found


def _patients(table: pd.DataFrame) -> pd.Series:
    if "patient_id" not in table.columns:
        return table["case_id"]
    return table["patient_id"].where(table["patient_id"] != "", table["case_id"])


def groups_across_splits(table: pd.DataFrame, groups: pd.Series) -> dict[str, list[str]]:
    """``{group: splits}`` for every group whose rows a (release) split put in several splits."""
    spread = pd.DataFrame({"group": groups.to_numpy(), "split": table["split"].to_numpy()})
    spread = spread.groupby("group")["split"].agg(lambda s: sorted(set(s)))
    return {str(group): splits for group, splits in spread.items() if len(splits) > 1}


def format_ungrouped(source: str, cases: Sequence[str], limit: int = 5) -> str:
    """One line for the cases a grouping gave no group: each stays a patient of its own.

    A pattern that matches only some file names is the usual cause, and it would leave those
    cases free to land next to their own frames in another split, so it is a warning.
    """
    shown = ", ".join(cases[:limit]) + (", ..." if len(cases) > limit else "")
    return f"the {source} gives no group for {len(cases)} case(s); each stays a patient of its own: {shown}"


def format_near_duplicates(found: Sequence[NearDuplicates | str], limit: int = 5) -> str:
    """One line: how many groups, the first few, and what to do about it."""
    shown = "; ".join(map(str, found[:limit])) + (
        f"; and {len(found) - limit} more" if len(found) > limit else ""
    )
    return (
        f"{len(found)} group(s) of near-duplicate file stems lie in more than one split: {shown}. "
        "If they are frames or slices of one patient or sequence, split by group with "
        "`medalign data split --group-regex PATTERN` or `--group-by COLUMN` (every importer takes them as "
        "-O group_regex=PATTERN / -O group_by=COLUMN)"
    )
