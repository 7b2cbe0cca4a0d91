"""The phantom: a built-in, deterministic multi-modal dataset with known ground truth.

Every task (image-text alignment, text-guided segmentation, fusion, diagnosis, survival, report
generation) can be trained and tested on it without downloading anything, and because the
generative model below is fully specified, what a model *should* be able to learn is known.

Generative model (one patient per case; ``np.random.default_rng([seed, index])`` drives case
``index``, so any case can be regenerated on its own and the dataset is byte-identical for a
given :class:`PhantomConfig`). Sizes are quoted for 128 px images and scale with ``size``.

Anatomy
    A dark background (intensity 0.05 in modality ``a``, 0.08 in ``b``) holding one organ: an
    axis-aligned ellipse with a soft edge, semi-axes 0.40 x 0.44 of the image side times a
    per-case scale in [0.96, 1.04], centred within +-3 px of the image centre (random shift).
    Inside, the organ has a base intensity (0.55 in ``a``, 0.40 in ``b``), a smooth
    low-frequency texture (five Gaussian blobs, sigma 10-22% of the image side, the same blobs
    in both modalities with independent N(0, 1) weights scaled by 0.045 in ``a`` and 0.035 in
    ``b``) and
    independent Gaussian pixel noise per modality (sigma 0.03 in ``a``, 0.035 in ``b``).
    Intensities are clipped to [0, 1] and written as 8-bit PNGs.

Cells
    The organ is divided into 2 sides x 3 zones = 6 cells. "left"/"right" are *image* left
    and right (the viewer's left, columns below/above the organ's vertical midline; it is not
    the patient's anatomical side). Zones "upper"/"middle"/"lower" are the top/middle/bottom
    thirds of the organ's vertical extent. Lesions keep a margin of >= 2 px from the zone
    boundaries, >= 4 px from the organ edge and >= 5 px (the largest organ shift + 2 px) from
    the organ midline, so each lesion lies wholly inside one cell and wholly on its side of
    the image midline as well: organ midline and image midline give the same side.

Lesions
    The count k is drawn with P(0) = 0.15, P(1) = 0.30 and the remaining 0.55 spread evenly
    over 2..max_lesions (so with the default max_lesions=3, 55% of cases have >= 2 lesions).
    The k lesions occupy k distinct cells drawn without replacement, so a (side, zone) pair
    names at most one lesion of a case. Type is uniform over ``TYPES``; size is "small"
    (radius 4-6 px) or "large" (radius 8-11 px) with equal probability (disjoint ranges). The
    shape is an ellipse with semi-axes r(1+e) and r/(1+e), e in [0, 0.12], random angle (in
    the rare case that a lesion does not fit its cell, r shrinks within its size range); its
    appearance has a soft edge (logistic, width 0.6 px); the mask is the hard ellipse (bool).
    Lesion ``center`` is (x, y) = (column, row) in pixels; ``radius`` is r in pixels.
    Lesions are numbered 1..k in cell order (left upper, left middle, left lower, right
    upper, right middle, right lower).

Two co-registered modalities ("a" and "b", manifest columns ``image:a`` and ``image:b``)
    A lesion adds a contrast c ~ U(0.20, 0.32) (drawn per lesion and modality) times its soft
    profile, with a sign that depends on its type:

    ============== ============ ============
    type           modality a   modality b
    ============== ============ ============
    cyst           dark (-c)    bright (+c)
    solid          dark (-c)    iso (0)
    inflammatory   iso (0)      bright (+c)
    ============== ============ ============

    "iso" means identical to the local background, i.e. invisible. So ``a`` alone cannot tell
    cyst from solid and cannot see inflammatory lesions; ``b`` alone cannot see solid lesions
    and cannot tell cyst from inflammatory; only the two together identify every type.

Diagnosis
    "normal" if k = 0, "malignant" if any lesion is solid, else "benign".

Survival (months)
    hazard = h0 * exp(0.9 * n_solid + 0.35 * n_large + 0.2 * k) with h0 = 0.009 (median true
    time about 24 months over the population); true time ~ Exponential(hazard); censoring
    time ~ Uniform(0, 60); ``event`` = true time <= censoring time; ``time`` = the smaller one.

Report
    Rendered from the lesions with varied phrasing: an optional preamble, an optional count
    sentence (count as a word), one sentence per lesion in shuffled order (several templates,
    synonyms for type, size and location), or a "no focal lesion" variant when k = 0, and a
    final impression naming the diagnosis in varied words. :func:`parse_report` inverts every
    phrasing exactly (returns (type, side, zone, size) per lesion in cell order) and
    :func:`parse_diagnosis` reads the impression back.

Referring prompts
    One per lesion, naming its side and zone only (never its type or size), e.g. "the lesion
    in the right lower zone". The image alone cannot tell which lesion of a multi-lesion case
    is meant; image + prompt identify it exactly. :func:`parse_prompt` reads (side, zone) back.

Files written by :func:`generate_phantom` under ``out``
    ``images/<case>_a.png``, ``images/<case>_b.png`` (8-bit grey), ``masks/<case>.png`` (union
    of the case's lesions, 0/255), ``masks/<case>_lesion<k>.png`` (one lesion, 0/255),
    ``lesions.jsonl`` (one record per lesion: case_id, lesion_id (= its prompts.csv case_id),
    all :class:`Lesion` fields, prompt, mask path, split),
    ``manifest.csv`` (one row per case: ``case_id`` "ph0000", ``patient_id`` = case_id,
    ``split`` (patient-level, stratified by label), ``image:a``, ``image:b``, ``mask``,
    ``text`` = report, ``attr:count``, ``attr:side`` (none/left/right/bilateral),
    ``attr:zone`` (sorted unique zones joined by ";" or "none"), ``attr:size`` (largest
    lesion: none/small/large), ``attr:type`` (sorted unique types joined by ";" or "none"),
    ``label`` = diagnosis, ``time``, ``event``) and ``prompts.csv`` (one row per lesion:
    ``case_id`` "ph0000_l1", ``patient_id`` = the case id, the case's ``split``, ``image:a``,
    ``image:b``, ``mask`` = that lesion's mask, ``text`` = referring prompt, ``attr:side``,
    ``attr:zone``, ``attr:type``, ``attr:size``), each with its ``.meta.json`` sidecar.
"""

# Why one module: every image, mask, report, label and survival time of a synthetic case is
# drawn from one random state in one place, so the phantom stays consistent and reproducible.

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from medalign.data.manifest import ManifestMeta, assign_splits, new_table, relative_ref, write_manifest

TYPES: tuple[str, ...] = ("cyst", "solid", "inflammatory")
SIDES: tuple[str, ...] = ("left", "right")
ZONES: tuple[str, ...] = ("upper", "middle", "lower")
SIZES: tuple[str, ...] = ("small", "large")
DIAGNOSES: tuple[str, ...] = ("normal", "benign", "malignant")
CELLS: tuple[tuple[str, str], ...] = tuple((side, zone) for side in SIDES for zone in ZONES)
MODALITIES: tuple[str, ...] = ("a", "b")

BASE_SIZE = 128  # pixel quantities below are for this image size and scale with it
RADIUS: dict[str, tuple[float, float]] = {"small": (4.0, 6.0), "large": (8.0, 11.0)}
MAX_ELONGATION = 0.12
EDGE_WIDTH = 0.6
ORGAN_AXES = (0.40, 0.44)  # semi-axes (x, y) as a fraction of the image side
ORGAN_SCALE = (0.96, 1.04)
ORGAN_SHIFT = 3.0
ORGAN_MARGIN = 4.0  # lesion to organ edge
CELL_MARGIN = 2.0  # lesion to zone boundary
MIDLINE_MARGIN = ORGAN_SHIFT + 2.0  # lesion to organ midline: also clear of the image midline
BACKGROUND = {"a": 0.05, "b": 0.08}
ORGAN_LEVEL = {"a": 0.55, "b": 0.40}
TEXTURE = {"a": 0.045, "b": 0.035}
NOISE = {"a": 0.03, "b": 0.035}
CONTRAST = (0.20, 0.32)
SIGN: dict[str, tuple[int, int]] = {"cyst": (-1, 1), "solid": (-1, 0), "inflammatory": (0, 1)}
H0 = 0.009
CENSOR_MONTHS = 60.0


@dataclass(frozen=True)
class PhantomConfig:
    """What to generate: ``n`` cases of ``size`` x ``size`` pixels; splits are patient-level."""

    n: int = 240
    size: int = 128
    seed: int = 0
    max_lesions: int = 3
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)

    def __post_init__(self) -> None:
        if self.n < 1 or self.size < 64:
            raise ValueError(f"need n >= 1 and size >= 64, got n={self.n}, size={self.size}")
        if not 0 <= self.max_lesions <= len(CELLS):
            raise ValueError(f"max_lesions must be in 0..{len(CELLS)}, got {self.max_lesions}")


@dataclass(frozen=True)
class Lesion:
    """One lesion; ``center`` is (x, y) = (column, row) in pixels, ``radius`` in pixels."""

    index: int
    type: str
    side: str
    zone: str
    size: str
    center: tuple[float, float]
    radius: float
    elongation: float = 0.0
    angle: float = 0.0


@dataclass
class PhantomCase:
    """One generated case: images are float32 in [0, 1], masks are bool, one per lesion."""

    case_id: str
    lesions: list[Lesion]
    image_a: np.ndarray
    image_b: np.ndarray
    masks: list[np.ndarray]
    report: str
    diagnosis: str
    time: float
    event: int
    prompts: list[str] = field(default_factory=list)


class _Finding(Protocol):
    type: str
    side: str
    zone: str
    size: str


@dataclass(frozen=True)
class _Organ:
    cx: float
    cy: float
    ax: float
    ay: float

    def zone_range(self, zone: str) -> tuple[float, float]:
        third = 2 * self.ay / 3
        top = self.cy - self.ay + ZONES.index(zone) * third
        return top, top + third

    def contains_disc(self, x: float, y: float, radius: float) -> bool:
        angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        px, py = x + radius * np.cos(angles), y + radius * np.sin(angles)
        return bool(np.all(((px - self.cx) / self.ax) ** 2 + ((py - self.cy) / self.ay) ** 2 <= 1))


# ----------------------------------------------------------------------------- sampling


def lesion_count_probabilities(max_lesions: int) -> np.ndarray:
    """P(k) for k = 0..max_lesions: 0.15 for none, 0.30 for one, the rest spread over 2..max."""
    if max_lesions == 0:
        return np.ones(1)
    if max_lesions == 1:
        return np.array([0.15, 0.85])
    return np.array([0.15, 0.30] + [0.55 / (max_lesions - 1)] * (max_lesions - 1))


def _sample_organ(rng: np.random.Generator, size: int) -> _Organ:
    scale = rng.uniform(*ORGAN_SCALE)
    shift = rng.uniform(-ORGAN_SHIFT, ORGAN_SHIFT, size=2) * size / BASE_SIZE
    centre = (size - 1) / 2
    return _Organ(
        cx=centre + shift[0],
        cy=centre + shift[1],
        ax=ORGAN_AXES[0] * size * scale,
        ay=ORGAN_AXES[1] * size * scale,
    )


def _place(
    rng: np.random.Generator, organ: _Organ, cell: tuple[str, str], extent: float, px: float
) -> tuple[float, float] | None:
    """A centre for a disc of radius ``extent`` wholly inside ``cell`` with margins, or None."""
    side, zone = cell
    top, bottom = organ.zone_range(zone)
    gap, mid = extent + CELL_MARGIN * px, extent + MIDLINE_MARGIN * px
    y0, y1 = top + gap, bottom - gap
    x0, x1 = (
        (organ.cx - organ.ax, organ.cx - mid) if side == "left" else (organ.cx + mid, organ.cx + organ.ax)
    )
    for _ in range(200):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if organ.contains_disc(x, y, extent + ORGAN_MARGIN * px):
            return float(x), float(y)
    return None


def _fit(
    rng: np.random.Generator,
    organ: _Organ,
    cell: tuple[str, str],
    shape: tuple[float, float],
    floor: float,
    px: float,
) -> tuple[tuple[float, float], float, float]:
    """Centre, radius and elongation of a lesion placed in its cell, shrunk (never below floor) to fit."""
    radius, elongation = shape
    for _ in range(20):
        centre = _place(rng, organ, cell, radius * (1 + elongation), px)
        if centre is not None:
            return centre, radius, elongation
        radius, elongation = max(floor, radius - 0.5 * px), elongation / 2
    raise RuntimeError(f"cannot fit a lesion of radius {radius:.1f} px in cell {cell}")


def _sample_lesions(rng: np.random.Generator, organ: _Organ, config: PhantomConfig) -> list[Lesion]:
    px = config.size / BASE_SIZE
    k = int(rng.choice(config.max_lesions + 1, p=lesion_count_probabilities(config.max_lesions)))
    cells = sorted(rng.choice(len(CELLS), size=k, replace=False).tolist())
    lesions = []
    for index, cell in enumerate(cells, start=1):
        kind = TYPES[int(rng.integers(len(TYPES)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        radius = rng.uniform(*RADIUS[size]) * px
        elongation, angle = rng.uniform(0, MAX_ELONGATION), rng.uniform(0, np.pi)
        centre, radius, elongation = _fit(
            rng, organ, CELLS[cell], (radius, elongation), RADIUS[size][0] * px, px
        )
        lesions.append(
            Lesion(
                index=index,
                type=kind,
                side=CELLS[cell][0],
                zone=CELLS[cell][1],
                size=size,
                center=(round(centre[0], 3), round(centre[1], 3)),
                radius=round(float(radius), 3),
                elongation=round(float(elongation), 4),
                angle=round(float(angle), 4),
            )
        )
    return lesions


# ----------------------------------------------------------------------------- rendering


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    return yy.astype(np.float64), xx.astype(np.float64)


def _lesion_shape(lesion: Lesion, yy: np.ndarray, xx: np.ndarray, px: float) -> tuple[np.ndarray, np.ndarray]:
    """(hard mask, soft profile in [0, 1]) of one lesion."""
    cos, sin = math.cos(lesion.angle), math.sin(lesion.angle)
    u = (xx - lesion.center[0]) * cos + (yy - lesion.center[1]) * sin
    v = -(xx - lesion.center[0]) * sin + (yy - lesion.center[1]) * cos
    stretch = 1 + lesion.elongation
    q = np.sqrt((u / (lesion.radius * stretch)) ** 2 + (v * stretch / lesion.radius) ** 2)
    profile = 1 / (1 + np.exp(-np.clip((1 - q) * lesion.radius / (EDGE_WIDTH * px), -30, 30)))
    return q <= 1, profile


def _organ_profile(organ: _Organ, yy: np.ndarray, xx: np.ndarray, px: float) -> np.ndarray:
    rho = np.sqrt(((xx - organ.cx) / organ.ax) ** 2 + ((yy - organ.cy) / organ.ay) ** 2)
    return 1 / (1 + np.exp(-np.clip((1 - rho) * min(organ.ax, organ.ay) / (1.2 * px), -30, 30)))


def _texture(rng: np.random.Generator, organ: _Organ, yy: np.ndarray, xx: np.ndarray, size: int):
    """Low-frequency texture per modality: shared Gaussian blobs, independent weights."""
    n_blobs = 5
    cx = rng.uniform(organ.cx - organ.ax, organ.cx + organ.ax, n_blobs)
    cy = rng.uniform(organ.cy - organ.ay, organ.cy + organ.ay, n_blobs)
    sigma = rng.uniform(0.10, 0.22, n_blobs) * size
    weights = {m: rng.normal(0, 1, n_blobs) for m in MODALITIES}
    blobs = [
        np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s**2)) for x, y, s in zip(cx, cy, sigma, strict=True)
    ]
    return {m: TEXTURE[m] * sum(w * b for w, b in zip(weights[m], blobs, strict=True)) for m in MODALITIES}


def _render(
    rng: np.random.Generator, organ: _Organ, lesions: Sequence[Lesion], size: int
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    px = size / BASE_SIZE
    yy, xx = _grid(size)
    body = _organ_profile(organ, yy, xx, px)
    texture = _texture(rng, organ, yy, xx, size)
    images = {m: BACKGROUND[m] + (ORGAN_LEVEL[m] - BACKGROUND[m] + texture[m]) * body for m in MODALITIES}
    masks = []
    for lesion in lesions:
        mask, profile = _lesion_shape(lesion, yy, xx, px)
        masks.append(mask)
        for m, sign in zip(MODALITIES, SIGN[lesion.type], strict=True):
            contrast = rng.uniform(*CONTRAST)
            images[m] = images[m] + sign * contrast * profile
    for m in MODALITIES:
        noisy = images[m] + rng.normal(0, NOISE[m], size=(size, size))
        images[m] = np.clip(noisy, 0, 1).astype(np.float32)
    return images, masks


# ----------------------------------------------------------------------------- labels


def diagnose(lesions: Sequence[_Finding]) -> str:
    """normal without lesions, malignant with any solid lesion, otherwise benign."""
    if not lesions:
        return "normal"
    return "malignant" if any(lesion.type == "solid" for lesion in lesions) else "benign"


def _survival(rng: np.random.Generator, lesions: Sequence[Lesion]) -> tuple[float, int]:
    n_solid = sum(lesion.type == "solid" for lesion in lesions)
    n_large = sum(lesion.size == "large" for lesion in lesions)
    hazard = H0 * math.exp(0.9 * n_solid + 0.35 * n_large + 0.2 * len(lesions))
    true_time = rng.exponential(1 / hazard)
    censor = rng.uniform(0, CENSOR_MONTHS)
    return round(float(min(true_time, censor)), 2), int(true_time <= censor)


# ----------------------------------------------------------------------------- text

_TYPE_PHRASES: dict[str, tuple[str, ...]] = {
    "cyst": ("cystic lesion", "fluid-filled cyst", "simple cyst", "cyst"),
    "solid": ("solid mass", "solid nodule", "solid lesion", "soft-tissue mass"),
    "inflammatory": (
        "inflammatory focus",
        "inflammatory lesion",
        "area of inflammation",
        "inflammatory change",
    ),
}
_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "diminutive"),
    "large": ("large", "sizeable", "bulky"),
}
_LOCATIONS = (
    "in the {side} {zone} zone",
    "in the {side} {zone} region",
    "in the {zone} zone on the {side}",
    "in the {zone} {side} region",
    "within the {zone} third of the {side} side",
)
_SENTENCES = (
    "There is a {desc} {loc}.",
    "A {desc} is seen {loc}.",
    "{Loc}, there is a {desc}.",
    "Note is made of a {desc} {loc}.",
    "A {desc} is present {loc}.",
)
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six")
_COUNT_SENTENCES = (
    "{Count} focal {lesions} {are} identified.",
    "There {are} {count} {lesions}.",
    "{Count} {abnormalities} {are} seen in the organ.",
)
_NORMAL_SENTENCES = (
    "No focal lesion.",
    "No focal lesion is identified.",
    "The organ is unremarkable without focal abnormality.",
    "No lesion is seen on either side of the organ.",
)
_PREAMBLES = ("", "Paired dual-contrast images were reviewed. ", "Comparison: none. ")
_IMPRESSION_LEADS = ("Impression: {}.", "Conclusion: {}.", "Overall, {}.")
_DIAGNOSIS_PHRASES: dict[str, tuple[str, ...]] = {
    "normal": ("normal study", "no abnormality detected", "unremarkable examination"),
    "benign": (
        "benign appearance",
        "findings most consistent with a benign process",
        "likely benign disease",
    ),
    "malignant": (
        "suspicious for malignancy",
        "appearance concerning for a malignant process",
        "findings compatible with malignant disease",
    ),
}
_PROMPTS = (
    "the lesion in the {side} {zone} zone",
    "segment the {side} {zone} zone finding",
    "the abnormality in the {zone} zone on the {side}",
    "outline the finding in the {zone} {side} region",
    "segment the lesion located in the {side} {zone} region",
    "{side} {zone} lesion",
)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _words(options: Sequence[str]) -> re.Pattern[str]:
    alternatives = sorted(options, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(o) for o in alternatives) + r")\b")


_TYPE_RE = {kind: _words(phrases) for kind, phrases in _TYPE_PHRASES.items()}
_SIZE_RE = {size: _words(words) for size, words in _SIZE_WORDS.items()}
_SIDE_RE = {side: _words([side]) for side in SIDES}
_ZONE_RE = {zone: _words([zone]) for zone in ZONES}
_DIAGNOSIS_RE = {diagnosis: _words(phrases) for diagnosis, phrases in _DIAGNOSIS_PHRASES.items()}


def _only(patterns: dict[str, re.Pattern[str]], text: str) -> str | None:
    """The single key whose pattern occurs in ``text`` (once), else None."""
    hits = [key for key, pattern in patterns.items() for _ in pattern.finditer(text)]
    return hits[0] if len(hits) == 1 else None


def finding(lesion: _Finding) -> tuple[str, str, str, str]:
    """(type, side, zone, size): what a report states about a lesion."""
    return (lesion.type, lesion.side, lesion.zone, lesion.size)


def _cell_order(item: tuple[str, str, str, str]) -> int:
    return CELLS.index((item[1], item[2]))


def _lesion_sentence(lesion: _Finding, rng: np.random.Generator) -> str:
    loc = _pick(rng, _LOCATIONS).format(side=lesion.side, zone=lesion.zone)
    desc = f"{_pick(rng, _SIZE_WORDS[lesion.size])} {_pick(rng, _TYPE_PHRASES[lesion.type])}"
    return _pick(rng, _SENTENCES).format(desc=desc, loc=loc, Loc=loc[0].upper() + loc[1:])


def _count_sentence(k: int, rng: np.random.Generator) -> str:
    plural = k > 1
    sentence = _pick(rng, _COUNT_SENTENCES).format(
        count=_NUMBERS[k],
        Count=_NUMBERS[k].capitalize(),
        lesions="lesions" if plural else "lesion",
        abnormalities="abnormalities" if plural else "abnormality",
        are="are" if plural else "is",
    )
    return "A single lesion is seen." if k == 1 and rng.random() < 0.25 else sentence


def render_report(lesions: Sequence[_Finding], rng: np.random.Generator) -> str:
    """A free-text report stating every lesion's type, side, zone and size, plus an impression."""
    parts = [_pick(rng, _PREAMBLES).strip()]
    if not lesions:
        parts.append(_pick(rng, _NORMAL_SENTENCES))
    else:
        if rng.random() < 0.8:
            parts.append(_count_sentence(len(lesions), rng))
        order = rng.permutation(len(lesions))
        parts.extend(_lesion_sentence(lesions[i], rng) for i in order)
    parts.append(_pick(rng, _IMPRESSION_LEADS).format(_pick(rng, _DIAGNOSIS_PHRASES[diagnose(lesions)])))
    return " ".join(p for p in parts if p)


def parse_report(text: str) -> list[tuple[str, str, str, str]]:
    """(type, side, zone, size) of every lesion sentence, in cell order; inverse of render_report.

    Lenient for generated text: a sentence counts as a finding only when it names exactly one
    type, size, side and zone; other sentences are ignored; a cell is reported once (first wins).
    """
    found: dict[tuple[str, str], tuple[str, str, str, str]] = {}
    for sentence in text.lower().split("."):
        kind = _only(_TYPE_RE, sentence)
        if kind is None:
            continue
        size, side, zone = _only(_SIZE_RE, sentence), _only(_SIDE_RE, sentence), _only(_ZONE_RE, sentence)
        if size is None or side is None or zone is None:
            continue
        found.setdefault((side, zone), (kind, side, zone, size))
    return sorted(found.values(), key=_cell_order)


def parse_diagnosis(text: str) -> str | None:
    """The diagnosis named by a report's impression, or None when none (or several) is named."""
    return _only(_DIAGNOSIS_RE, text.lower())


def referring_prompt(lesion: _Finding, rng: np.random.Generator) -> str:
    """A segmentation prompt naming the lesion's side and zone only (never its type or size)."""
    return _pick(rng, _PROMPTS).format(side=lesion.side, zone=lesion.zone)


def parse_prompt(text: str) -> tuple[str, str] | None:
    """(side, zone) named by a referring prompt, or None."""
    text = text.lower()
    side, zone = _only(_SIDE_RE, text), _only(_ZONE_RE, text)
    return None if side is None or zone is None else (side, zone)


# ----------------------------------------------------------------------------- cases


def case_name(index: int) -> str:
    return f"ph{index:04d}"


def generate_case(index: int, config: PhantomConfig) -> PhantomCase:
    """Case ``index`` of the phantom; depends only on (config.seed, index) and size/max_lesions."""
    rng = np.random.default_rng([config.seed, index])
    organ = _sample_organ(rng, config.size)
    lesions = _sample_lesions(rng, organ, config)
    images, masks = _render(rng, organ, lesions, config.size)
    report = render_report(lesions, rng)
    prompts = [referring_prompt(lesion, rng) for lesion in lesions]
    time, event = _survival(rng, lesions)
    return PhantomCase(
        case_id=case_name(index),
        lesions=lesions,
        image_a=images["a"],
        image_b=images["b"],
        masks=masks,
        report=report,
        diagnosis=diagnose(lesions),
        time=time,
        event=event,
        prompts=prompts,
    )


def _save_png(array: np.ndarray, path: Path) -> str:
    if array.dtype == bool:
        pixels = array.astype(np.uint8) * 255
    else:
        pixels = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return path.as_posix()


def _joined(values: Sequence[str]) -> str:
    return ";".join(sorted(set(values))) or "none"


def _summary(lesions: Sequence[Lesion]) -> dict[str, str | int]:
    sides = {lesion.side for lesion in lesions}
    sizes = {lesion.size for lesion in lesions}
    return {
        "attr:count": len(lesions),
        "attr:side": "none" if not sides else ("bilateral" if len(sides) == 2 else sides.pop()),
        "attr:zone": _joined([lesion.zone for lesion in lesions]),
        "attr:size": "large" if "large" in sizes else ("small" if sizes else "none"),
        "attr:type": _joined([lesion.type for lesion in lesions]),
    }


def _write_case(case: PhantomCase, out: Path) -> tuple[dict, list[dict], list[dict]]:
    """Write one case's PNGs; return its manifest row, prompt rows and lesion records (no split)."""
    name = case.case_id
    image_a = relative_ref(_save_png(case.image_a, out / "images" / f"{name}_a.png"), out)
    image_b = relative_ref(_save_png(case.image_b, out / "images" / f"{name}_b.png"), out)
    union = np.zeros_like(case.image_a, dtype=bool)
    for mask in case.masks:
        union |= mask
    mask_ref = relative_ref(_save_png(union, out / "masks" / f"{name}.png"), out)
    row = {"case_id": name, "patient_id": name, "image:a": image_a, "image:b": image_b, "mask": mask_ref}
    row |= {"text": case.report, **_summary(case.lesions), "label": case.diagnosis}
    row |= {"time": f"{case.time:.2f}", "event": case.event}
    prompt_rows, records = [], []
    for lesion, mask, prompt in zip(case.lesions, case.masks, case.prompts, strict=True):
        lesion_ref = relative_ref(_save_png(mask, out / "masks" / f"{name}_lesion{lesion.index}.png"), out)
        prompt_rows.append(
            {"case_id": f"{name}_l{lesion.index}", "patient_id": name, "image:a": image_a, "image:b": image_b}
            | {"mask": lesion_ref, "text": prompt, "attr:side": lesion.side, "attr:zone": lesion.zone}
            | {"attr:type": lesion.type, "attr:size": lesion.size}
        )
        records.append(
            {"case_id": name, "lesion_id": f"{name}_l{lesion.index}", **asdict(lesion)}
            | {"mask": lesion_ref, "prompt": prompt}
        )
    return row, prompt_rows, records


def generate_phantom(out: Path, config: PhantomConfig = PhantomConfig()) -> Path:
    """Write the phantom dataset under ``out``; returns the path of ``manifest.csv``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows, prompt_rows, records = [], [], []
    for index in range(config.n):
        row, prompts, lesions = _write_case(generate_case(index, config), out)
        rows.append(row)
        prompt_rows.extend(prompts)
        records.extend(lesions)
    table = new_table(rows)
    fractions = dict(zip(("train", "val", "test"), config.fractions, strict=True))
    table["split"] = assign_splits(table, fractions, seed=config.seed, stratify="label").tolist()
    table = new_table(table.to_dict("records"))
    split_of = dict(zip(table["case_id"], table["split"], strict=True))
    prompts_table = new_table([{**r, "split": split_of[r["patient_id"]]} for r in prompt_rows])
    with (out / "lesions.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps({**record, "split": split_of[record["case_id"]]}, sort_keys=True) + "\n")
    description = _describe(config)
    prompts_meta = ManifestMeta(source="phantom", description=description + " One row per lesion prompt.")
    write_manifest(prompts_table, out / "prompts.csv", meta=prompts_meta)
    meta = ManifestMeta(classes={"label": list(DIAGNOSES)}, source="phantom", description=description)
    return write_manifest(table, out / "manifest.csv", meta=meta)


def _describe(config: PhantomConfig) -> str:
    return (
        f"medalign phantom: {config.n} synthetic two-modality cases (a, b) of {config.size} px, seed "
        f"{config.seed}, up to {config.max_lesions} lesions (cyst: dark a/bright b; solid: dark a/iso b; "
        "inflammatory: iso a/bright b) in 2 sides x 3 zones; label normal/benign/malignant; survival in months."
    )
