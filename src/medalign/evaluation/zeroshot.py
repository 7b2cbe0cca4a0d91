"""Prompt ensembles and the zero-shot classifier, independent of any model class.

A model enters only as ``encode_text(list[str]) -> Tensor [n, D]``, so the same code serves
every dual encoder, a frozen baseline, or a fake dictionary encoder in tests.

Template files (YAML, shipped ones under ``medalign/prompts/``)::

    description: optional free text
    templates: ["a {} image.", "an image showing {}."]   # each with exactly one "{}"
    classes:                                              # optional
      benign: ["benign lesion", "benign tumour"]          # synonyms; empty/null -> the name itself
      malignant: [...]

``classes`` may also be a plain list of names. When a file has no classes, or the caller
wants the manifest's class order (labels are indices into it), pass names to
:func:`resolve_classes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

PLACEHOLDER = "{}"

EncodeText = Callable[[list[str]], torch.Tensor]


def _shipped_dir() -> Path:
    return Path(str(resources.files("medalign"))) / "prompts"


def available_templates() -> list[str]:
    """Names accepted by :func:`load_templates` besides file paths (the shipped YAML stems)."""
    folder = _shipped_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _check_templates(templates: Any, source: str) -> list[str]:
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
        raise ValueError(f"{source}: 'templates' must be a non-empty list of strings")
    bad = [t for t in templates if not isinstance(t, str) or t.count(PLACEHOLDER) != 1]
    if bad:
        raise ValueError(f"{source}: every template needs exactly one {PLACEHOLDER!r} placeholder: {bad}")
    return list(templates)


def _check_classes(classes: Any, source: str) -> dict[str, list[str]] | None:
    if classes is None:
        return None
    if isinstance(classes, Mapping):
        out: dict[str, list[str]] = {}
        for name, synonyms in classes.items():
            if synonyms is None or (
                isinstance(synonyms, Sequence) and not isinstance(synonyms, str) and not synonyms
            ):
                out[str(name)] = [str(name)]
            elif isinstance(synonyms, str):
                out[str(name)] = [synonyms]
            elif all(isinstance(s, str) and s.strip() for s in synonyms):
                out[str(name)] = list(synonyms)
            else:
                raise ValueError(f"{source}: synonyms of class {name!r} must be non-empty strings")
        return out
    if isinstance(classes, Sequence) and not isinstance(classes, str):
        names = [str(c) for c in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"{source}: duplicate class names in {names}")
        return {name: [name] for name in names}
    raise ValueError(f"{source}: 'classes' must be a mapping of name -> synonyms or a list of names")


def load_templates(path_or_name: str | Path) -> dict[str, Any]:
    """Read a template file, by path or by shipped name (``"busi"`` -> ``prompts/busi.yaml``).

    Returns ``{"templates": list[str], "classes": dict[str, list[str]] | None,
    "description": str | None}`` with class synonyms filled in (a class without synonyms
    is prompted by its own name). Everything is validated on load, so a bad file fails when it
    is read rather than halfway through an evaluation.
    """
    path = Path(path_or_name)
    if not path.is_file():
        shipped = _shipped_dir() / f"{path_or_name}.yaml"
        if not shipped.is_file():
            raise FileNotFoundError(
                f"no template file {str(path_or_name)!r}; shipped names: {available_templates()}"
            )
        path = shipped
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    source = str(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a mapping with 'templates' (and optionally 'classes')")
    unknown = set(data) - {"templates", "classes", "description"}
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}")
    description = data.get("description")
    return {
        "templates": _check_templates(data.get("templates"), source),
        "classes": _check_classes(data.get("classes"), source),
        "description": None if description is None else str(description),
    }


def resolve_classes(
    spec: Mapping[str, Any], class_names: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Class -> synonyms in the order the labels use.

    With ``class_names`` (the manifest's class list) the order is theirs and synonyms come from
    the file; a name the file does not know raises when the file lists classes, because a
    near-miss ("Benign" vs "benign") would otherwise silently prompt with the bare name.
    """
    file_classes = spec.get("classes")
    if class_names is None:
        if not file_classes:
            raise ValueError("the template file lists no classes; pass class_names")
        return {name: list(syn) for name, syn in file_classes.items()}
    if not file_classes:
        return {str(name): [str(name)] for name in class_names}
    missing = [name for name in class_names if name not in file_classes]
    if missing:
        raise ValueError(f"classes {missing} not in the template file (it has {list(file_classes)})")
    return {name: list(file_classes[name]) for name in class_names}


def build_class_prompts(
    templates: Sequence[str], classes: Sequence[str] | Mapping[str, Sequence[str]]
) -> list[list[str]]:
    """Per class, every template filled with every synonym (template-major order).

    ``classes`` is a list of names (each its own only synonym) or a mapping name -> synonyms.
    The placeholder is replaced literally rather than with ``str.format``, so braces elsewhere
    in a synonym can never be misread as fields.
    """
    templates = _check_templates(templates, "templates")
    mapping = _check_classes(classes, "classes") or {}
    if not mapping:
        raise ValueError("no classes given")
    return [[t.replace(PLACEHOLDER, s) for t in templates for s in synonyms] for synonyms in mapping.values()]


def zero_shot_weights(
    encode_text: EncodeText, class_prompts: Sequence[Sequence[str]], batch_size: int = 256
) -> torch.Tensor:
    """[K, D] classifier: per class the mean of L2-normalised prompt embeddings, renormalised.

    Normalising before averaging keeps a prompt whose embedding happens to be long from
    dominating the ensemble; renormalising after makes every class weight a unit vector, so
    cosine logits stay comparable across classes with different prompt counts (CLIP's recipe).
    Prompts of all classes are encoded together in batches of ``batch_size``. Gradient mode is
    the caller's choice (wrap in ``torch.no_grad()`` for evaluation); the result is float32.
    """
    counts = [len(p) for p in class_prompts]
    if not counts:
        raise ValueError("no classes given")
    empty = [i for i, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(f"classes {empty} have no prompts")
    flat = [str(p) for prompts in class_prompts for p in prompts]
    chunks = [encode_text(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)]
    emb = torch.cat([torch.as_tensor(c) for c in chunks]).float()
    if emb.ndim != 2 or emb.shape[0] != len(flat):
        raise ValueError(f"encode_text returned shape {tuple(emb.shape)} for {len(flat)} prompts")
    emb = F.normalize(emb, dim=-1)
    means = torch.stack([part.mean(dim=0) for part in torch.split(emb, counts)])
    return F.normalize(means, dim=-1)


def zero_shot_scores(
    image_embeds: torch.Tensor | np.ndarray, weights: torch.Tensor | np.ndarray, logit_scale: float = 100.0
) -> torch.Tensor:
    """[N, K] probabilities: softmax of ``logit_scale`` x cosine(image, class weight).

    Both sides are normalised here so raw encoder outputs can be passed. The scale is CLIP's
    trained temperature (about 100); it does not change the argmax but it does change the
    probabilities and therefore the per-class AUC, so use the model's own scale when known.
    The result is float32 on the image embeddings' device.
    """
    img = F.normalize(torch.as_tensor(image_embeds).float(), dim=-1)
    w = F.normalize(torch.as_tensor(weights).float().to(img.device), dim=-1)
    if img.ndim != 2 or w.ndim != 2 or img.shape[1] != w.shape[1]:
        raise ValueError(f"need image [N, D] and weights [K, D], got {tuple(img.shape)} and {tuple(w.shape)}")
    return (logit_scale * img @ w.T).softmax(dim=-1)


@dataclass
class ZeroShotClassifier:
    """Class names + [K, D] prompt-ensemble weights: everything needed to classify embeddings."""

    class_names: list[str]
    weights: torch.Tensor
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.weights.ndim != 2 or self.weights.shape[0] != len(self.class_names):
            raise ValueError(
                f"{len(self.class_names)} class names but weights of shape {tuple(self.weights.shape)}"
            )

    @classmethod
    def from_prompts(
        cls,
        encode_text: EncodeText,
        templates: Sequence[str],
        classes: Sequence[str] | Mapping[str, Sequence[str]],
        logit_scale: float = 100.0,
    ) -> ZeroShotClassifier:
        """Build the ensemble from templates and classes (names or name -> synonyms)."""
        mapping = _check_classes(classes, "classes") or {}
        prompts = build_class_prompts(templates, mapping)
        return cls(list(mapping), zero_shot_weights(encode_text, prompts), logit_scale)

    def predict_proba(self, image_embeds: torch.Tensor | np.ndarray) -> np.ndarray:
        """[N, K] float64 numpy probabilities (sklearn convention; feeds ``classification_metrics``)."""
        with torch.no_grad():
            probs = zero_shot_scores(image_embeds, self.weights, self.logit_scale)
        return probs.cpu().double().numpy()

    def predict(self, image_embeds: torch.Tensor | np.ndarray) -> np.ndarray:
        """[N] class indices (argmax of the probabilities)."""
        return self.predict_proba(image_embeds).argmax(axis=1)
