"""The phantom is a controlled benchmark: its claims are checked numerically on the written pixels.

(a) a referring prompt cannot be answered from the image alone, but image + prompt determine it;
(b) modality fusion identifies lesion types (and the diagnosis) that neither modality can alone;
(c) image-report pairing is learnable: an image-only detector retrieves the matching report.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medalign.data.manifest import read_manifest
from medalign.data.phantom import (
    CELLS,
    DIAGNOSES,
    SIDES,
    SIZES,
    TYPES,
    ZONES,
    Lesion,
    PhantomConfig,
    diagnose,
    finding,
    generate_case,
    generate_phantom,
    parse_diagnosis,
    parse_prompt,
    parse_report,
    referring_prompt,
    render_report,
)

CONFIG = PhantomConfig(n=120, size=128, seed=0)
PX = CONFIG.size / 128
CONTRAST_THRESHOLD = 0.07  # |inside - ring| above this: the lesion is visible in that modality

Cell = tuple[str, str]
Geometry = tuple[float, float, float, float]  # organ centre x, centre y, semi-axis x, semi-axis y


# ----------------------------------------------------------------------------- fixtures


class Phantom:
    """The generated dataset, read back from disk (pixels as floats in [0, 1])."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest = read_manifest(root / "manifest.csv")
        self.cases = self.manifest.table
        self.prompts = read_manifest(root / "prompts.csv").table
        lines = (root / "lesions.jsonl").read_text(encoding="utf-8").splitlines()
        self.lesions = pd.DataFrame([json.loads(line) for line in lines])
        self._cache: dict[str, np.ndarray] = {}

    def image(self, ref: str) -> np.ndarray:
        if ref not in self._cache:
            self._cache[ref] = np.asarray(Image.open(self.root / ref), dtype=np.float64) / 255
        return self._cache[ref]

    def mask(self, ref: str) -> np.ndarray:
        return self.image(ref) > 0.5

    def lesions_of(self, case_id: str) -> pd.DataFrame:
        return self.lesions[self.lesions["case_id"] == case_id]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    root = tmp_path_factory.mktemp("phantom")
    assert generate_phantom(root, CONFIG) == root / "manifest.csv"
    return Phantom(root)


# ----------------------------------------------------------------------------- image helpers


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disc (numpy shifts)."""
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask (breadth-first search over its pixels)."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        pixels, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        component = np.zeros_like(mask)
        component[tuple(np.array(pixels).T)] = True
        found.append(component)
    return found


def box_mean(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window, zero padded (integral image)."""
    k = 2 * radius + 1
    padded = np.pad(image, ((radius + 1, radius), (radius + 1, radius)))
    integral = padded.cumsum(0).cumsum(1)
    window = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]
    return window / k**2


def organ_geometry(a: np.ndarray, b: np.ndarray) -> Geometry:
    """Organ ellipse from the images: threshold, fill each row (the organ is convex), moments."""
    inside = box_mean((a + b) / 2, 1) > 0.27
    filled = np.zeros_like(inside)
    for row in np.nonzero(inside.any(axis=1))[0]:
        cols = np.nonzero(inside[row])[0]
        filled[row, cols[0] : cols[-1] + 1] = True
    yy, xx = np.nonzero(filled)
    return float(xx.mean()), float(yy.mean()), 2 * float(xx.std()), 2 * float(yy.std())


def organ_mask(geometry: Geometry, shape: tuple[int, int], shrink: float = 0.0) -> np.ndarray:
    cx, cy, ax, ay = geometry
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((xx - cx) / (ax - shrink)) ** 2 + ((yy - cy) / (ay - shrink)) ** 2 <= 1


def cell_of(mask: np.ndarray, geometry: Geometry) -> Cell:
    """(side, zone) of a region's centroid: image left/right of the organ midline, organ thirds."""
    cx, cy, _, ay = geometry
    yy, xx = np.nonzero(mask)
    side = "left" if xx.mean() < cx else "right"
    third = int(np.clip((yy.mean() - (cy - ay)) // (2 * ay / 3), 0, 2))
    return side, ZONES[third]


def ring_contrast(image: np.ndarray, mask: np.ndarray, union: np.ndarray, organ: np.ndarray) -> float:
    """mean(inside the lesion) - mean(ring 2..4 px around it, off other lesions, inside the organ)."""
    near, far = max(2, round(2 * PX)), max(3, round(4 * PX))
    ring = dilate(mask, far) & ~dilate(union, near) & organ
    return float(image[mask].mean() - image[ring].mean())


def fused_type(contrast_a: float, contrast_b: float) -> str | None:
    """The 2D sign rule: dark in a and bright in b = cyst; dark a only = solid; bright b only = inflammatory."""
    dark, bright = contrast_a < -CONTRAST_THRESHOLD, contrast_b > CONTRAST_THRESHOLD
    if dark and bright:
        return "cyst"
    if dark:
        return "solid"
    return "inflammatory" if bright else None


def best_interval_accuracy(values: np.ndarray, labels: list[str], intervals: int = 3) -> float:
    """Best accuracy of any rule that cuts the 1D feature into ``intervals`` intervals, one class each."""
    order = np.argsort(values)
    ordered = np.asarray(labels)[order]
    classes = sorted(set(labels))
    counts = np.stack([np.concatenate([[0], np.cumsum(ordered == c)]) for c in classes])  # classes x (n+1)
    n = len(values)
    best = counts.max(axis=0).astype(float)  # best[j]: most correct among the first j, one interval
    for _ in range(intervals - 1):
        best = np.array(
            [max(best[i] + (counts[:, j] - counts[:, i]).max() for i in range(j + 1)) for j in range(n + 1)]
        )
    return float(best[n] / n)


def best_discrete_accuracy(features: list, labels: list[str]) -> float:
    """Bayes-optimal accuracy of predicting the label from a discrete feature (majority per value)."""
    table = Counter(zip(features, labels, strict=True))
    per_value: dict = {}
    for (value, _), count in table.items():
        per_value[value] = max(per_value.get(value, 0), count)
    return sum(per_value.values()) / len(labels)


def residual(image: np.ndarray, organ: np.ndarray) -> np.ndarray:
    """image - smoothed organ background (normalised box filter that skips lesion-like outliers)."""
    radius = round(16 * PX)
    weights = organ.astype(float)
    for _ in range(2):
        background = box_mean(image * weights, radius) / np.maximum(box_mean(weights, radius), 1e-6)
        res = box_mean(image - background, 1)
        weights = (organ & ~dilate(np.abs(res) > 0.06, round(2 * PX))).astype(float)
    return res


def image_signature(a: np.ndarray, b: np.ndarray) -> dict[Cell, tuple[str, str]]:
    """Per cell: (type, size) of the lesion an image-only detector sees there (no ground truth used)."""
    geometry = organ_geometry(a, b)
    organ = organ_mask(geometry, a.shape, shrink=3 * PX)
    res_a, res_b = residual(a, organ), residual(b, organ)
    candidates = ((res_a < -0.1) | (res_b > 0.1)) & organ
    signature: dict[Cell, tuple[str, str, int]] = {}
    for region in components(candidates):
        area = int(region.sum())
        kind = fused_type(res_a[region].mean(), res_b[region].mean())
        if area < 0.5 * np.pi * (4 * PX) ** 2 or kind is None:
            continue
        size = "large" if area > np.pi * (7.25 * PX) ** 2 else "small"
        cell = cell_of(region, geometry)
        if cell not in signature or signature[cell][2] < area:
            signature[cell] = (kind, size, area)
    return {cell: value[:2] for cell, value in signature.items()}


def report_signature(text: str) -> dict[Cell, tuple[str, str]]:
    return {(side, zone): (kind, size) for kind, side, zone, size in parse_report(text)}


def signature_match(x: dict[Cell, tuple[str, str]], y: dict[Cell, tuple[str, str]]) -> int:
    return sum(x.get(cell) == y.get(cell) for cell in CELLS)


# ----------------------------------------------------------------------------- contract


MANIFEST_COLUMNS = [
    "case_id",
    "patient_id",
    "split",
    "image:a",
    "image:b",
    "mask",
    "text",
    "attr:count",
    "attr:side",
    "attr:zone",
    "attr:size",
    "attr:type",
    "label",
    "time",
    "event",
]
PROMPT_COLUMNS = [
    "case_id",
    "patient_id",
    "split",
    "image:a",
    "image:b",
    "mask",
    "text",
    "attr:side",
    "attr:zone",
    "attr:type",
    "attr:size",
]


def test_manifest_columns_counts_and_meta(phantom: Phantom) -> None:
    cases, prompts = phantom.cases, phantom.prompts
    assert list(cases.columns) == MANIFEST_COLUMNS
    assert list(prompts.columns) == PROMPT_COLUMNS
    assert list(cases["case_id"]) == [f"ph{i:04d}" for i in range(CONFIG.n)]
    assert (cases["patient_id"] == cases["case_id"]).all()
    assert phantom.manifest.meta.classes == {"label": list(DIAGNOSES)}
    assert phantom.manifest.meta.source == "phantom"
    assert set(cases["label"]) <= set(DIAGNOSES)
    assert len(prompts) == len(phantom.lesions) == cases["attr:count"].astype(int).sum()
    for column in ("image:a", "image:b", "mask"):
        for ref in pd.concat([cases[column], prompts[column]]):
            assert not Path(ref).is_absolute() and "\\" not in ref and (phantom.root / ref).is_file()
    for _, row in cases.iterrows():
        lesions = phantom.lesions_of(row["case_id"])
        assert int(row["attr:count"]) == len(lesions)
        assert row["label"] == diagnose([Lesion(**_lesion_fields(r)) for _, r in lesions.iterrows()])
        expected_type = ";".join(sorted(set(lesions["type"]))) or "none"
        assert row["attr:type"] == expected_type
        sides = set(lesions["side"])
        assert row["attr:side"] == ("none" if not sides else "bilateral" if len(sides) == 2 else sides.pop())
        assert row["attr:zone"] == (";".join(sorted(set(lesions["zone"]))) or "none")
        assert row["attr:size"] == (
            "large" if "large" in set(lesions["size"]) else "small" if len(lesions) else "none"
        )
        assert parse_report(row["text"]) == [
            tuple(r) for r in lesions[["type", "side", "zone", "size"]].values
        ]
        assert parse_diagnosis(row["text"]) == row["label"]


def _lesion_fields(record: pd.Series) -> dict:
    fields = {
        k: record[k] for k in ("index", "type", "side", "zone", "size", "radius", "elongation", "angle")
    }
    return fields | {"center": tuple(record["center"])}


def test_lesion_count_distribution(phantom: Phantom) -> None:
    counts = phantom.cases["attr:count"].astype(int)
    assert counts.max() <= CONFIG.max_lesions
    assert 0.05 <= (counts == 0).mean() <= 0.3
    assert (counts >= 2).mean() >= 0.45


def test_splits_are_patient_level_and_cover_all_cases(phantom: Phantom) -> None:
    cases, prompts = phantom.cases, phantom.prompts
    assert set(cases["split"]) == {"train", "val", "test"}
    sizes = cases["split"].value_counts(normalize=True)
    for name, fraction in zip(("train", "val", "test"), CONFIG.fractions, strict=True):
        assert abs(sizes[name] - fraction) < 0.05
    split_of = dict(zip(cases["case_id"], cases["split"], strict=True))
    assert all(split_of[p] == s for p, s in zip(prompts["patient_id"], prompts["split"], strict=True))
    assert all(
        split_of[c] == s for c, s in zip(phantom.lesions["case_id"], phantom.lesions["split"], strict=True)
    )
    assert cases.groupby("label")["split"].nunique().min() == 3  # stratified: every label in every split


def test_masks_are_binary_disjoint_and_match_the_union(phantom: Phantom) -> None:
    for _, row in phantom.cases.iterrows():
        union = np.asarray(Image.open(phantom.root / row["mask"]))
        assert union.shape == (CONFIG.size, CONFIG.size) and set(np.unique(union)) <= {0, 255}
        for ref in ("image:a", "image:b"):
            assert np.asarray(Image.open(phantom.root / row[ref])).shape == union.shape
        lesion_masks = [phantom.mask(ref) for ref in phantom.lesions_of(row["case_id"])["mask"]]
        total = np.zeros(union.shape, dtype=int)
        for mask in lesion_masks:
            assert mask.any()
            total += mask
        assert total.max() <= 1
        assert np.array_equal(total > 0, union > 127)


def test_no_two_lesions_share_a_cell(phantom: Phantom) -> None:
    for case_id, lesions in phantom.lesions.groupby("case_id"):
        cells = list(zip(lesions["side"], lesions["zone"], strict=True))
        assert len(cells) == len(set(cells)), case_id
        assert list(lesions["index"]) == list(range(1, len(lesions) + 1))
        assert cells == sorted(cells, key=CELLS.index)
        for side, ref in zip(lesions["side"], lesions["mask"], strict=True):
            columns = np.nonzero(phantom.mask(ref))[1]  # wholly on its side of the image midline
            midline = (CONFIG.size - 1) / 2
            assert (columns < midline).all() if side == "left" else (columns > midline).all()


def test_generation_is_deterministic(tmp_path: Path) -> None:
    config = PhantomConfig(n=16, size=96, seed=3)

    def digest(root: Path) -> dict[str, str]:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    generate_phantom(tmp_path / "one", config)
    generate_phantom(tmp_path / "two", config)
    first, second = digest(tmp_path / "one"), digest(tmp_path / "two")
    assert first == second and len(first) > 3 * config.n
    case = generate_case(5, config)
    written = np.asarray(Image.open(tmp_path / "one" / "images" / "ph0005_a.png"))
    assert np.array_equal(written, np.round(case.image_a * 255).astype(np.uint8))
    assert case.image_a.dtype == np.float32 and case.image_a.min() >= 0 and case.image_a.max() <= 1
    assert not np.array_equal(generate_case(5, PhantomConfig(n=16, size=96, seed=4)).image_a, case.image_a)


def test_report_round_trip_on_random_lesion_sets() -> None:
    rng = np.random.default_rng(123)
    for _ in range(500):
        k = int(rng.integers(0, len(CELLS) + 1))
        cells = sorted(rng.choice(len(CELLS), size=k, replace=False).tolist())
        lesions = [
            Lesion(i + 1, TYPES[rng.integers(3)], *CELLS[c], SIZES[rng.integers(2)], (0.0, 0.0), 1.0)
            for i, c in enumerate(cells)
        ]
        text = render_report(lesions, rng)
        assert parse_report(text) == [finding(lesion) for lesion in lesions], text
        assert parse_diagnosis(text) == diagnose(lesions), text
        for lesion in lesions:
            prompt = referring_prompt(lesion, rng)
            assert parse_prompt(prompt) == (lesion.side, lesion.zone)
            assert parse_report(prompt) == []  # names neither type nor size


def test_reports_are_varied(phantom: Phantom) -> None:
    texts = phantom.cases["text"]
    assert texts.nunique() >= 0.9 * len(texts)
    assert phantom.prompts["text"].nunique() >= 20
    for side in SIDES:
        assert any(side in t for t in texts)


# ----------------------------------------------------------------------------- (a) referring prompts


def referring_metrics(phantom: Phantom) -> dict[str, float]:
    counts = dict(zip(phantom.cases["case_id"], phantom.cases["attr:count"].astype(int), strict=True))
    unions = dict(zip(phantom.cases["case_id"], phantom.cases["mask"], strict=True))
    multi = phantom.prompts["patient_id"].map(counts) >= 2
    union_dice, recovered = [], []
    for is_multi, (_, row) in zip(multi, phantom.prompts.iterrows(), strict=True):
        target, union = phantom.mask(row["mask"]), phantom.mask(unions[row["patient_id"]])
        if is_multi:
            union_dice.append(dice(union, target))
        geometry = organ_geometry(phantom.image(row["image:a"]), phantom.image(row["image:b"]))
        named = parse_prompt(row["text"])
        chosen = [c for c in components(union) if cell_of(c, geometry) == named]
        recovered.append(len(chosen) == 1 and dice(chosen[0], target) >= 0.99)
    return {
        "multi_fraction": float(multi.mean()),
        "union_dice": float(np.mean(union_dice)),
        "recovered": float(np.mean(recovered)),
    }


def test_a_prompt_needs_the_text_and_the_text_suffices(phantom: Phantom) -> None:
    metrics = referring_metrics(phantom)
    assert metrics["multi_fraction"] >= 0.45, metrics
    assert metrics["union_dice"] <= 0.75, metrics  # best image-only answer on multi-lesion cases
    assert metrics["recovered"] >= 0.99, metrics  # image + (side, zone) named in the prompt


# ----------------------------------------------------------------------------- (b) fusion


def lesion_contrasts(phantom: Phantom) -> pd.DataFrame:
    """Per lesion: ring contrast in a and in b on the written pixels, plus its true type/case."""
    rows = []
    for _, case in phantom.cases.iterrows():
        a, b = phantom.image(case["image:a"]), phantom.image(case["image:b"])
        organ = organ_mask(organ_geometry(a, b), a.shape, shrink=1.5 * PX)
        union = phantom.mask(case["mask"])
        for _, lesion in phantom.lesions_of(case["case_id"]).iterrows():
            mask = phantom.mask(lesion["mask"])
            rows.append(
                {
                    "case_id": case["case_id"],
                    "type": lesion["type"],
                    "a": ring_contrast(a, mask, union, organ),
                    "b": ring_contrast(b, mask, union, organ),
                }
            )
    return pd.DataFrame(rows)


def fusion_metrics(phantom: Phantom) -> dict[str, float]:
    contrasts = lesion_contrasts(phantom)
    labels = list(contrasts["type"])
    fused = [fused_type(a, b) for a, b in zip(contrasts["a"], contrasts["b"], strict=True)]
    contrasts["fused"] = fused
    predicted = {
        cid: diagnose([_Typed(t) for t in group["fused"]]) for cid, group in contrasts.groupby("case_id")
    }
    cases = phantom.cases
    fused_diagnosis = [predicted.get(cid, "normal") for cid in cases["case_id"]]
    dark_in_a = (contrasts["a"] < -CONTRAST_THRESHOLD).groupby(contrasts["case_id"]).sum()
    n_dark = [int(dark_in_a.get(cid, 0)) for cid in cases["case_id"]]
    return {
        "type_a": best_interval_accuracy(contrasts["a"].to_numpy(), labels),
        "type_b": best_interval_accuracy(contrasts["b"].to_numpy(), labels),
        "type_fused": float(np.mean([f == t for f, t in zip(fused, labels, strict=True)])),
        "diagnosis_fused": float(np.mean(np.array(fused_diagnosis) == cases["label"].to_numpy())),
        "diagnosis_a": best_discrete_accuracy(n_dark, list(cases["label"])),
    }


class _Typed:
    def __init__(self, kind: str | None) -> None:
        self.type = kind


def test_b_fusion_identifies_types_neither_modality_can(phantom: Phantom) -> None:
    metrics = fusion_metrics(phantom)
    assert metrics["type_fused"] >= 0.95, metrics
    assert metrics["type_a"] <= 0.75, metrics
    assert metrics["type_b"] <= 0.75, metrics
    assert metrics["diagnosis_fused"] == 1.0, metrics
    assert metrics["diagnosis_a"] <= 0.85, metrics


# ----------------------------------------------------------------------------- (c) retrieval


def retrieval_metrics(phantom: Phantom, split: str = "test") -> dict[str, float]:
    cases = phantom.cases[phantom.cases["split"] == split]
    images = [
        image_signature(phantom.image(a), phantom.image(b))
        for a, b in zip(cases["image:a"], cases["image:b"], strict=True)
    ]
    reports = [report_signature(text) for text in cases["text"]]
    hits = []
    for i, signature in enumerate(images):
        scores = np.array([signature_match(signature, report) for report in reports])
        best = np.flatnonzero(scores == scores.max())
        hits.append(1 / len(best) if i in best else 0.0)  # expected top-1 with random tie-breaking
    exact = np.mean([s == r for s, r in zip(images, reports, strict=True)])
    return {"n": len(cases), "top1": float(np.mean(hits)), "chance": 1 / len(cases), "exact": float(exact)}


def test_c_image_report_pairing_is_learnable(phantom: Phantom) -> None:
    metrics = retrieval_metrics(phantom)
    assert metrics["top1"] >= 0.6, metrics
    assert metrics["top1"] >= 5 * metrics["chance"], metrics


# ----------------------------------------------------------------------------- survival


def test_survival_depends_on_solid_lesions(phantom: Phantom) -> None:
    cases = phantom.cases
    time, event = cases["time"].astype(float), cases["event"].astype(int)
    assert set(event) == {0, 1} and 0.3 <= event.mean() <= 0.9
    assert (time > 0).all() and (time <= 60).all()
    assert time[cases["label"] == "malignant"].mean() < time[cases["label"] == "benign"].mean()
    n_solid = [int((phantom.lesions_of(c)["type"] == "solid").sum()) for c in cases["case_id"]]
    assert np.corrcoef(n_solid, time)[0, 1] < 0
