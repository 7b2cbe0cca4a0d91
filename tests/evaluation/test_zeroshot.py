"""Prompt files, prompt expansion and the prompt-ensemble zero-shot classifier (fake text encoder)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medalign.evaluation.zeroshot import (
    ZeroShotClassifier,
    available_templates,
    build_class_prompts,
    load_templates,
    resolve_classes,
    zero_shot_scores,
    zero_shot_weights,
)

SHIPPED_CLASSES = {
    "busi": ["benign", "malignant", "normal"],
    "medpix_modality": ["CT", "MR"],
    "medpix_plane": [
        "3D Reconstruction",
        "AP",
        "Axial",
        "Coronal",
        "Drawing",
        "Frontal",
        "Gross Pathology",
        "Lateral",
        "Multiple or Montage",
        "NOS - Not specified",
        "Other View (see caption)",
        "PA",
        "Photograph",
        "Sagittal",
        "Transverse",
    ],
    "medpix_region": ["Abdomen", "Head", "Reproductive and Urinary System", "Spine and Muscles", "Thorax"],
    "phantom_diagnosis": ["normal", "benign", "malignant"],
}

VECTORS = {
    "a cat.": [2.0, 0.0, 0.0],
    "the cat.": [0.0, 3.0, 0.0],
    "a dog.": [0.0, 0.0, 1.0],
    "a puppy.": [0.0, 0.0, 5.0],
    "the dog.": [4.0, 0.0, 4.0],
    "the puppy.": [0.0, 0.0, 2.0],
}


class FakeEncoder:
    """encode_text from a fixed dictionary, recording batch sizes."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(len(texts))
        return torch.tensor([VECTORS[t] for t in texts])


# ----------------------------------------------------------------------------- shipped files


def test_every_expected_file_is_shipped() -> None:
    assert set(SHIPPED_CLASSES) <= set(available_templates())


@pytest.mark.parametrize("name", sorted(SHIPPED_CLASSES))
def test_shipped_file_loads_with_prompts_for_every_class(name: str) -> None:
    spec = load_templates(name)
    assert len(spec["templates"]) >= 3
    assert all(t.count("{}") == 1 for t in spec["templates"])
    assert list(spec["classes"]) == SHIPPED_CLASSES[name]
    prompts = build_class_prompts(spec["templates"], spec["classes"])
    assert len(prompts) == len(SHIPPED_CLASSES[name])
    for synonyms, class_prompts in zip(spec["classes"].values(), prompts, strict=True):
        assert len(class_prompts) == len(spec["templates"]) * len(synonyms) >= 1
        assert all("{}" not in p and p.strip() for p in class_prompts)


def test_shipped_classes_match_the_code_that_makes_the_labels() -> None:
    from medalign.data.importers.busi import CLASSES
    from medalign.data.phantom import DIAGNOSES

    assert SHIPPED_CLASSES["busi"] == list(CLASSES)
    assert SHIPPED_CLASSES["phantom_diagnosis"] == list(DIAGNOSES)


@pytest.mark.realdata
def test_medpix_files_match_the_imported_classes(real_dataset) -> None:
    from medalign.data.importers import load_dataset

    classes = load_dataset("medpix", real_dataset("medpix-2")).meta.classes
    for column, name in (
        ("modality", "medpix_modality"),
        ("plane", "medpix_plane"),
        ("region", "medpix_region"),
    ):
        assert classes[f"label:{column}"] == SHIPPED_CLASSES[name]


# ----------------------------------------------------------------------------- loading and expansion


def test_load_from_path_with_list_classes_and_default_synonyms(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text('templates: ["a {} image."]\nclasses: [cyst, mass]\n')
    assert load_templates(path)["classes"] == {"cyst": ["cyst"], "mass": ["mass"]}
    path.write_text('templates: ["a {} image."]\nclasses: {cyst: null, mass: ["solid mass"]}\n')
    spec = load_templates(str(path))
    assert spec["classes"] == {"cyst": ["cyst"], "mass": ["solid mass"]}
    assert spec["description"] is None


def test_load_without_classes_then_resolve_by_name(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text('templates: ["a {} image.", "{}"]\n')
    spec = load_templates(path)
    assert spec["classes"] is None
    assert resolve_classes(spec, ["b", "a"]) == {"b": ["b"], "a": ["a"]}
    with pytest.raises(ValueError, match="pass class_names"):
        resolve_classes(spec)


def test_resolve_follows_caller_order_and_rejects_unknown_names() -> None:
    spec = load_templates("busi")
    assert list(resolve_classes(spec, ["normal", "benign"])) == ["normal", "benign"]
    with pytest.raises(ValueError, match="Benign"):
        resolve_classes(spec, ["Benign"])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('templates: ["no placeholder"]\n', "placeholder"),
        ('templates: ["{} and {}"]\n', "placeholder"),
        ("templates: []\n", "non-empty"),
        ('templates: ["{}"]\nclases: [a]\n', "unknown keys"),
    ],
)
def test_bad_files_fail_on_load(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_templates(path)


def test_missing_name_lists_shipped_names() -> None:
    with pytest.raises(FileNotFoundError, match="busi"):
        load_templates("no_such_prompts")


def test_build_class_prompts_template_major_every_synonym() -> None:
    prompts = build_class_prompts(["a {}.", "the {}."], {"cat": ["cat"], "dog": ["dog", "puppy"]})
    assert prompts == [["a cat.", "the cat."], ["a dog.", "a puppy.", "the dog.", "the puppy."]]
    assert build_class_prompts(["x {} y"], ["{odd}"]) == [["x {odd} y"]]  # braces in names stay literal


# ----------------------------------------------------------------------------- ensemble and scores


def test_weights_average_normalised_prompts_then_renormalise() -> None:
    prompts = build_class_prompts(["a {}.", "the {}."], {"cat": ["cat"], "dog": ["dog", "puppy"]})
    w = zero_shot_weights(FakeEncoder(), prompts)
    # cat: mean of (1,0,0) and (0,1,0) -> (1,1,0)/sqrt2 (raw mean (1,1.5,0) would tilt towards "the cat.")
    r = 1 / math.sqrt(2)
    assert w[0].tolist() == pytest.approx([r, r, 0.0])
    # dog: (0,0,1), (0,0,1), (r,0,r), (0,0,1) -> mean (r/4, 0, (3+r)/4), then unit length
    mean = np.array([r / 4, 0.0, (3 + r) / 4])
    assert w[1].tolist() == pytest.approx((mean / np.linalg.norm(mean)).tolist(), abs=1e-6)
    assert torch.linalg.vector_norm(w, dim=1).tolist() == pytest.approx([1.0, 1.0])
    assert w.dtype == torch.float32


def test_weights_are_independent_of_batching() -> None:
    prompts = build_class_prompts(["a {}.", "the {}."], {"cat": ["cat"], "dog": ["dog", "puppy"]})
    enc = FakeEncoder()
    small = zero_shot_weights(enc, prompts, batch_size=4)
    assert enc.calls == [4, 2]
    assert torch.allclose(small, zero_shot_weights(FakeEncoder(), prompts))
    with pytest.raises(ValueError, match="no prompts"):
        zero_shot_weights(FakeEncoder(), [["a cat."], []])


def test_scores_are_softmax_of_scaled_cosine() -> None:
    weights = torch.eye(2)
    image = np.array([[3.0, 4.0]])  # cosines 0.6, 0.8 after normalisation
    p = zero_shot_scores(image, weights, logit_scale=10.0)
    e2 = math.exp(2.0)
    assert p[0].tolist() == pytest.approx([1 / (1 + e2), e2 / (1 + e2)])
    assert zero_shot_scores(image, weights)[0, 1] > 0.99999  # default scale 100 is sharp


def test_classifier_predicts_from_prompts() -> None:
    clf = ZeroShotClassifier.from_prompts(
        FakeEncoder(), ["a {}.", "the {}."], {"cat": ["cat"], "dog": ["dog", "puppy"]}, logit_scale=50.0
    )
    assert clf.class_names == ["cat", "dog"]
    images = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.1, 0.0, 1.0]])
    proba = clf.predict_proba(images)
    assert isinstance(proba, np.ndarray) and proba.shape == (3, 2)
    assert proba.sum(axis=1) == pytest.approx(np.ones(3))
    assert clf.predict(images).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="class names"):
        ZeroShotClassifier(["one"], torch.zeros(2, 3))
