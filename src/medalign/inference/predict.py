"""The Predictor: one object that turns a bundle into answers (classify, segment, retrieve, ...).

``medalign.load(DIR)`` returns a :class:`Predictor`. It takes images the way users have them
and preprocesses them exactly as training did, with training's own functions: the reader
(:func:`medalign.data.readers.read_image`), channel matching (the dataset's rule: RGB -> grey
by the mean, grey -> RGB by repetition), ``"dtype"`` intensity scaling (uint8 / 255, uint16 /
65535, floats as given, so float inputs are expected in [0, 1]) and the bilinear resize to the
model's ``config.image_size`` (``build_preprocess``). Segmentation skips the resize: it runs
sliding windows at the model's training scale (:mod:`medalign.inference`) and answers at the
source size.

Accepted images, alone or in a list (a list is a batch, processed ``batch_size`` at a time):

* a path (``str`` ending in an image suffix, or ``pathlib.Path``): PNG, JPEG, TIFF, BMP,
  DICOM, NIfTI, ``.npy``/``.npz``; a 3D volume needs a slice selector (``"ct.nii.gz#slice=40"``);
* a numpy array or torch tensor: ``(H, W)``; 3D arrays are ``(C, H, W)`` when the first axis
  has 1-4 entries, else ``(H, W, C)`` when the last one has; 4D arrays are a batch
  ``(B, C, H, W)``;
* ``{modality: image or list of images}`` for a bundle trained on several modalities: one
  input per modality (fusion, clinical) or the modalities stacked as channels (early fusion), in
  the order the bundle records. What a bundle takes is ``predictor.inputs``
  (:class:`medalign.bundle.inputs.InputSpec`); a missing or unknown modality, or a bare image for a
  several-modality bundle, is a :class:`PredictorError` saying what to pass. One image is
  repeated into channels only as training did within a modality (grey to RGB), never into
  another modality's channels.

A plain ``str`` without an image suffix is text (for ``retrieve``). The raw model stays at
``predictor.model``; any other attribute (``predictor.config``, ``predictor.encode_image``,
``predictor(**inputs)``) is forwarded to it, so code written when ``medalign.load`` returned
the model keeps working.
"""

# Why one module: the Predictor is one public class whose methods share one preprocessing and
# batching path; splitting it would scatter a single API over files.

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medalign.bundle.inputs import InputError, InputSpec, input_spec
from medalign.data.dataset import match_channels
from medalign.data.readers import SUPPORTED_SUFFIXES, parse_image_ref, read_image
from medalign.data.transforms import Normalisation, PreprocessConfig, build_preprocess, to_channel_first
from medalign.evaluation.metrics import unit_rows

ImageLike = str | os.PathLike | np.ndarray | torch.Tensor

# Prompts for plain label names (no template file): CLIP-style phrasings of a medical image.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}.",
    "an image of {}.",
    "a medical image showing {}.",
    "a scan with {}.",
)

# What each bundle kind can do, for the error raised when a method does not fit the kind.
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "DualEncoder": ("embed_image", "embed_text", "classify", "retrieve", "build_index"),
    "segmentation": ("segment",),
    "fusion": ("segment (segmentation head)", "classify (classification head)"),
    "pretrain": ("embed_image", "retrieve (image to image)", "build_index"),
    "clinical": ("embed_image", "classify (diagnosis head)", "risk", "retrieve (image to image)"),
    "report": ("report", "embed_image", "retrieve (image to image)", "build_index"),
    "instruct": ("chat", "embed_image", "retrieve (image to image)", "build_index"),
}


class PredictorError(ValueError):
    """A call the bundle cannot answer, or an input it cannot read; the message says which."""


# -- inputs ---------------------------------------------------------------------------------------


def is_image_path(item: Any) -> bool:
    """``Path`` objects always; strings when they end in a readable image suffix (selector allowed)."""
    if isinstance(item, os.PathLike):
        return True
    if not isinstance(item, str):
        return False
    path, _ = parse_image_ref(item)
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def channel_first(item: ImageLike) -> np.ndarray:
    """One image -> ``(C, H, W)`` in its stored dtype (nothing scaled yet)."""
    if is_image_path(item):
        array = to_channel_first(read_image(item).array)  # the reader's layout, as training reads it
        if array.ndim != 3:
            raise PredictorError(
                f"'{item}' is a volume of shape {read_image(item).array.shape}; "
                "select one slice, e.g. 'file.nii.gz#slice=10'"
            )
        return array
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if not isinstance(item, np.ndarray):
        raise PredictorError(
            f"cannot read an image from {type(item).__name__} {str(item)[:60]!r}: give a path with an "
            f"image suffix {SUPPORTED_SUFFIXES}, a numpy array or a torch tensor"
        )
    if item.ndim == 2:
        return item[None]
    if item.ndim == 3 and item.shape[0] <= 4:
        return item
    if item.ndim == 3 and item.shape[-1] <= 4:
        return np.moveaxis(item, -1, 0)
    raise PredictorError(
        f"an image array must be (H, W), (C, H, W) or (H, W, C) with 1-4 channels, got shape {item.shape}"
    )


def image_list(images: Any) -> list[ImageLike]:
    """A single image, a list of them or a ``(B, C, H, W)`` array/tensor -> a flat list of images."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise PredictorError("no images given (empty list)")
        return [x for item in images for x in image_list(item)]
    return [images]


def prepare(
    item: ImageLike, channels: int | None, size: int | None, normalisation: Normalisation, *, convert: bool = True
) -> torch.Tensor:
    """One image -> ``[C, H, W]`` float32 exactly as the training dataset makes it (no resize: None).

    ``channels``: training's channel rule (``convert``) or an exact count (not ``convert``);
    None keeps the image's own channels.
    """
    array = channel_first(item)
    if channels is not None and array.shape[0] != channels:
        if not convert:
            raise PredictorError(
                f"the model takes {channels} channel(s) per image and does not record how other images "
                f"were converted; this input has {array.shape[0]}"
            )
        try:
            array = match_channels(array, channels)
        except ValueError as err:
            raise PredictorError(
                f"the model takes {channels} channel(s) per image; this input has {array.shape[0]}"
            ) from err
    preprocess = build_preprocess(
        ["image"], [], PreprocessConfig(size=(size, size) if size else None, normalisation=normalisation)
    )
    return torch.from_numpy(np.asarray(preprocess({"image": array})["image"], dtype=np.float32))


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# -- fusion models under the sliding-window inferer ------------------------------------------------


class StackedModalities(nn.Module):
    """A fusion model seen as a single-input segmenter: channels split back into its modality dict.

    ``medalign.inference.sliding_window.predict_probabilities`` slides windows over one ``[1, C, H, W]`` tensor;
    this wrapper lets a fusion model (which takes ``{modality: [B, c, H, W]}``) run under it, with
    only the modalities the caller gave (the others are absent, as in training's missing data).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)
        self.config = model.config
        self.needs_text = bool(getattr(model, "needs_text", False))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.model.tokenize(texts)

    def forward(self, pixel_values: torch.Tensor, **text: torch.Tensor) -> dict[str, Any]:
        parts = pixel_values.split(self.config.channels_per_modality, dim=1)
        return self.model(pixel_values=dict(zip(self.names, parts, strict=True)), **text)


# -- the predictor --------------------------------------------------------------------------------


class Predictor:
    """A loaded bundle with task methods; see the module docstring for the accepted inputs.

    ``batch_size`` images go through the model at a time; ``normalisation`` must match the
    recipe's ``data.normalisation``: ``from_bundle`` takes it from the bundle (trained bundles
    record it), else training's default ``"dtype"``.
    """

    def __init__(
        self, model: nn.Module, *, batch_size: int = 16, normalisation: Normalisation = "dtype"
    ) -> None:
        if not isinstance(getattr(model, "bundle_kind", None), str):
            raise PredictorError(f"{type(model).__name__} is not a medalign bundle model (no bundle_kind)")
        if batch_size < 1:
            raise PredictorError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.kind: str = model.bundle_kind
        self.batch_size = batch_size
        self.normalisation: Normalisation = normalisation
        self._zero_shot: dict[Any, Any] = {}

    @classmethod
    def from_bundle(cls, name_or_path: str | os.PathLike, **options: Any) -> Predictor:
        from medalign.bundle import load_bundle

        model = load_bundle(name_or_path)
        if "normalisation" not in options:
            options = {**options, "normalisation": input_spec(model).normalisation}
        return cls(model, **options)

    # Forwarding keeps callers of the former ``medalign.load`` (which returned the model) working.
    def __getattr__(self, name: str) -> Any:
        if name == "model" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Predictor(kind={self.kind!r}, model={type(self.model).__name__})"

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _require(self, method: str, kinds: Sequence[str], detail: str = "") -> None:
        if self.kind not in kinds:
            raise PredictorError(
                f"{method}() needs a {' or '.join(kinds)} bundle{detail}; this is a {self.kind!r} bundle, "
                f"which can do: {', '.join(CAPABILITIES.get(self.kind, ()))}"
            )

    @property
    def inputs(self) -> InputSpec:
        """What the bundle takes: modalities, their order and channel layout, preprocessing."""
        return input_spec(self.model)

    def arrange(self, images: Any) -> dict[str, Any]:
        """``images`` as ``{modality: image(s)}`` in model order, checked against :attr:`inputs`.

        The keys are the modalities an answer used; a bare image of an ``any``-layout bundle is
        keyed ``"*"``. Raises :class:`PredictorError` naming what the bundle needs and how to pass it.
        """
        try:
            return self.inputs.arrange(images)
        except InputError as err:
            raise PredictorError(str(err)) from None

    def _pixels(self, images: Any, size: int | None) -> torch.Tensor:
        """One modality's images as a batch ``[B, c, size, size]`` on the model's device."""
        spec = self.inputs
        channels = None if spec.layout == "unrecorded" else spec.channels
        prepared = [prepare(x, channels, size, self.normalisation, convert=spec.convert_channels) for x in image_list(images)]
        return torch.stack(prepared).to(self.device)

    def _modality_pixels(self, images: Any, size: int | None) -> dict[str, torch.Tensor]:
        """``{modality: [B, c, H, W]}`` in model order, every modality with the same number of images."""
        batch = {name: self._pixels(value, size) for name, value in self.arrange(images).items()}
        if len({len(v) for v in batch.values()}) > 1:
            raise PredictorError(
                f"modalities give different numbers of images: { {k: len(v) for k, v in batch.items()} }"
            )
        return batch

    def _single_input(self, images: Any, size: int | None = -1) -> torch.Tensor:
        """``[B, C, H, W]`` for a one-input model: one image, or the modalities stacked as the bundle records.

        ``size`` -1 resizes to the model's size; None keeps the source size (sliding windows).
        """
        batch = self._modality_pixels(images, self.model.config.image_size if size == -1 else size)
        pixels = torch.cat(list(batch.values()), dim=1)
        expected = int(self.model.config.in_channels)
        if pixels.shape[1] != expected:
            raise PredictorError(
                f"this bundle takes {self.inputs.describe()}; the images given have {pixels.shape[1]} "
                f"channel(s) in all, the model takes {expected}"
            )
        return pixels

    def _modality_batch(self, images: Any, size: int | None) -> dict[str, torch.Tensor]:
        """``{modality: [B, c, H, W]}`` for fusion/clinical models (modalities left out are absent)."""
        return self._modality_pixels(images, size)

    def _batched(self, pixels: torch.Tensor | dict[str, torch.Tensor], fn: Any) -> np.ndarray:
        """``fn`` over ``batch_size`` rows at a time (tensor or dict of tensors), concatenated."""
        n = len(next(iter(pixels.values()))) if isinstance(pixels, dict) else len(pixels)
        out = []
        with torch.inference_mode():
            for rows in chunks(n, self.batch_size):
                part = {k: v[rows] for k, v in pixels.items()} if isinstance(pixels, dict) else pixels[rows]
                out.append(fn(part).float().cpu())
        return torch.cat(out).numpy()

    def _class_names(self, count: int) -> list[str]:
        """Names the run stored (metrics of its evaluation), else the indices as strings."""
        info = getattr(self.model, "bundle_info", None) or {}
        metrics = info.get("metrics") or {}
        for names in (
            info.get("class_names"),
            metrics.get("class_names"),
            (metrics.get("diagnosis") or {}).get("class_names"),
        ):
            if isinstance(names, list) and len(names) == count:
                return [str(n) for n in names]
        return [str(i) for i in range(count)]

    # -- embeddings -------------------------------------------------------------------------------

    def embed_image(self, images: Any) -> np.ndarray:
        """``[B, D]``: DualEncoder's normalised image embedding; MAE/report: pooled vision features;
        clinical: the fused features its heads read."""
        self._require("embed_image", ("DualEncoder", "pretrain", "report", "clinical", "instruct"))
        model = self.model
        if self.kind == "clinical":
            batch = self._modality_batch(images, model.config.image_size)
            return self._batched(batch, lambda x: model(images=x)["features"])
        encode = model.encode if self.kind == "pretrain" else model.encode_image
        return self._batched(self._single_input(images), encode)

    def embed_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """``[B, D]`` normalised text embeddings in the image embedding space (DualEncoder)."""
        self._require("embed_text", ("DualEncoder",))
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise PredictorError("embed_text takes a string or a non-empty list of strings")
        out = []
        with torch.inference_mode():
            for rows in chunks(len(texts), self.batch_size):
                tokens = self.model.tokenize(texts[rows])
                out.append(
                    self.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float().cpu()
                )
        return torch.cat(out).numpy()

    # -- classification ---------------------------------------------------------------------------

    def classify(
        self,
        images: Any,
        labels: Sequence[str] | None = None,
        templates: str | os.PathLike | Sequence[str] | None = None,
    ) -> list[dict[str, float]]:
        """Per image, label -> probability.

        DualEncoder (zero-shot, prompt ensemble): ``labels`` are class names prompted with
        :data:`DEFAULT_TEMPLATES`, or ``templates`` names a template file (shipped name like
        ``"phantom_diagnosis"`` or a path; its classes are used unless ``labels`` picks some) or
        is a list of ``"...{}..."`` strings. Clinical and fusion-classification bundles use their
        trained head; ``labels`` may rename its classes (default: the names the run stored).
        """
        if isinstance(labels, str):
            raise PredictorError("labels must be a list of class names (for a template file use templates=)")
        if self.kind == "DualEncoder":
            return self._zero_shot_classify(images, labels, templates)
        self._require("classify", ("DualEncoder", "clinical", "fusion"))
        config = self.model.config
        if self.kind == "clinical" and config.num_classes:
            batch = self._modality_batch(images, config.image_size)
            head = lambda x: self.model(images=x)["logits"].softmax(-1)  # noqa: E731
        elif self.kind == "fusion" and config.task_head == "classify":
            batch = self._modality_batch(images, config.image_size)
            head = lambda x: self.model(pixel_values=x)["logits"].softmax(-1)  # noqa: E731
        else:
            raise PredictorError(
                f"this {self.kind!r} bundle has no classification head; it can do: "
                f"{', '.join(CAPABILITIES[self.kind])}"
            )
        if templates is not None:
            raise PredictorError(f"templates are for zero-shot (DualEncoder) bundles, not {self.kind!r}")
        probs = self._batched(batch, head)
        names = self._class_names(probs.shape[1]) if labels is None else [str(n) for n in labels]
        if len(names) != probs.shape[1]:
            raise PredictorError(f"{len(names)} labels {names} for a head with {probs.shape[1]} classes")
        return [dict(zip(names, map(float, row), strict=True)) for row in probs]

    def _zero_shot_classify(
        self, images: Any, labels: Sequence[str] | None, templates: str | os.PathLike | Sequence[str] | None
    ) -> list[dict[str, float]]:
        from medalign.evaluation.zeroshot import ZeroShotClassifier, load_templates, resolve_classes

        if templates is None or (isinstance(templates, Sequence) and not isinstance(templates, str)):
            if not labels:
                raise PredictorError("give labels=[...] (class names) or templates='<template file>'")
            prompts, classes = list(templates or DEFAULT_TEMPLATES), {str(n): [str(n)] for n in labels}
        else:
            spec = load_templates(templates)
            prompts, classes = spec["templates"], resolve_classes(spec, labels)
        key = (tuple(prompts), tuple((k, tuple(v)) for k, v in classes.items()))
        if key not in self._zero_shot:
            with torch.inference_mode():
                scale = float(self.model.logit_scale.exp())
                self._zero_shot[key] = ZeroShotClassifier.from_prompts(
                    lambda texts: torch.from_numpy(self.embed_text(texts)), prompts, classes, scale
                )
        classifier = self._zero_shot[key]
        probs = classifier.predict_proba(self.embed_image(images))
        return [dict(zip(classifier.class_names, map(float, row), strict=True)) for row in probs]

    # -- segmentation -----------------------------------------------------------------------------

    def segment(
        self,
        image: Any,
        text: str | Sequence[str] | None = None,
        *,
        attributes: dict[str, str] | Sequence[dict[str, str]] | None = None,
        overlap: float = 0.25,
        flip_tta: bool = False,
        bf16: bool = False,
    ) -> Any:
        """Foreground probability map ``[H, W]`` at the source image's size (a list: one per image).

        Images of any size work: sliding windows of the training size (``medalign.inference``).
        ``text`` is the prompt of a text-guided model, ``attributes`` the findings of an
        attribute-guided one (``{"side": "left", "zone": "lower"}``); each is one per image for
        a list. A prompt-guided model sees the whole image at its training size, as ``medalign
        eval segment`` does, and the empty prompt ``""`` asks it for what it predicts without
        one. Fusion bundles take a dict ``{modality: image}``; modalities left out are treated
        as missing where the bundle was trained for that. ``flip_tta`` averages with the
        flipped image (a prompt's left/right words mirrored with it); ``bf16`` runs under
        bfloat16 autocast.
        """
        self._require("segment", ("segmentation", "fusion"))
        if self.kind == "fusion" and self.model.config.task_head != "segment":
            raise PredictorError("this fusion bundle has a classification head; use classify()")
        arch = self.model.config.arch
        if text is not None and not getattr(self.model, "needs_text", False):
            raise PredictorError(f"this {arch} model is not text-guided; call it without text")
        if attributes is not None and not getattr(self.model, "takes_attributes", False):
            raise PredictorError(f"this {arch} model takes no attributes; call it without them")
        arranged = self.arrange(image)
        lists = {name: image_list(value) for name, value in arranged.items()}
        if len({len(v) for v in lists.values()}) != 1:
            raise PredictorError(f"modalities give different numbers of images: {list(map(len, lists.values()))}")
        cases = [dict(zip(lists, case, strict=True)) for case in zip(*lists.values(), strict=True)]
        single = not any(isinstance(v, (list, tuple)) for v in arranged.values())
        texts = [text] * len(cases) if text is None or isinstance(text, str) else list(text)
        if len(texts) != len(cases):
            raise PredictorError(f"{len(texts)} prompts for {len(cases)} images")
        findings = (
            [attributes] * len(cases) if attributes is None or isinstance(attributes, Mapping) else list(attributes)
        )
        if len(findings) != len(cases):
            raise PredictorError(f"{len(findings)} attribute sets for {len(cases)} images")
        options = {"overlap": overlap, "flip_tta": flip_tta, "bf16": bf16}
        maps = [
            self._segment_one(case, prompt, attributes=found, **options)
            for case, prompt, found in zip(cases, texts, findings, strict=True)
        ]
        return maps[0] if single else maps

    def _segment_one(self, case: dict[str, Any], text: str | None, **options: Any) -> np.ndarray:
        """One case ``{modality: image}`` (already arranged) at its source size."""
        from medalign.inference.sliding_window import predict_probabilities

        batch = {name: self._pixels(value, None) for name, value in case.items()}
        shapes = {tuple(v.shape[-2:]) for v in batch.values()}
        if len(shapes) > 1:
            raise PredictorError(f"modalities differ in size: { {k: tuple(v.shape) for k, v in batch.items()} }")
        model: nn.Module = self.model
        if self.kind == "fusion":
            model = StackedModalities(self.model, list(batch))
        pixels = torch.cat(list(batch.values()), dim=1)
        if self.kind != "fusion" and pixels.shape[1] != self.model.config.in_channels:
            raise PredictorError(
                f"this bundle takes {self.inputs.describe()}; the images given have {pixels.shape[1]} channels"
            )
        return predict_probabilities(model, pixels, text=text, **options)

    # -- retrieval --------------------------------------------------------------------------------

    def build_index(self, items: Any) -> np.ndarray:
        """L2-normalised ``[N, D]`` embeddings of texts (DualEncoder) or images, for :meth:`retrieve`."""
        listed = [items] if isinstance(items, str) else items
        is_text = [isinstance(x, str) and not is_image_path(x) for x in image_list(listed)]
        if all(is_text):
            embeddings = self.embed_text(list(listed))
        elif not any(is_text):
            embeddings = self.embed_image(items)
        else:
            raise PredictorError("a mix of texts and images; queries and indexes hold one kind")
        return unit_rows(embeddings)

    def retrieve(self, query: Any, index: Any, k: int = 5) -> list[list[tuple[int, float]]]:
        """Per query, the ``k`` most similar index entries as ``(position, cosine similarity)``.

        ``query`` and ``index`` are texts or images (text <-> image needs a DualEncoder); a 2D
        float ``index`` array is taken as precomputed ``[N, D]`` embeddings (:meth:`build_index`),
        so to index one image pass it in a list.
        """
        if k < 1:
            raise PredictorError(f"k must be >= 1, got {k}")
        precomputed = isinstance(index, np.ndarray) and index.ndim == 2 and index.dtype.kind == "f"
        keys = unit_rows(index.astype(np.float32)) if precomputed else self.build_index(index)
        queries = self.build_index(query)
        if queries.shape[1] != keys.shape[1]:
            raise PredictorError(f"query embeddings have {queries.shape[1]} dims, the index {keys.shape[1]}")
        scores = queries @ keys.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(int(j), float(scores[i, j])) for j in row] for i, row in enumerate(order)]

    # -- reports ----------------------------------------------------------------------------------

    def decoding_defaults(self) -> dict[str, Any]:
        """The decoding the run was evaluated with (stored in the bundle), else ``ReportConfig``'s."""
        from dataclasses import asdict

        from medalign.config import ReportConfig

        defaults = {k: v for k, v in asdict(ReportConfig()).items() if k != "retrieval_baseline"}
        stored = ((getattr(self.model, "bundle_info", None) or {}).get("metrics") or {}).get("decoding") or {}
        return {**defaults, **{k: v for k, v in stored.items() if k in defaults}}

    def report(self, image: Any, **decoding: Any) -> str | list[str]:
        """The generated report (a list for a list of images). ``decoding`` overrides the bundle's
        defaults: ``decoding="greedy"|"beam"``, ``beam_size``, ``max_new_tokens``,
        ``length_penalty``, ``no_repeat_ngram_size``, ``repetition_penalty``."""
        self._require("report", ("report",))
        settings = self.decoding_defaults()
        unknown = sorted(set(decoding) - set(settings))
        if unknown:
            raise PredictorError(f"unknown decoding options {unknown}; known: {sorted(settings)}")
        settings.update(decoding)
        pixels = self._single_input(image)
        texts: list[str] = []
        with torch.inference_mode():
            for rows in chunks(len(pixels), self.batch_size):
                texts += self.model.generate(
                    pixels[rows],
                    settings["decoding"],
                    settings["beam_size"],
                    settings["max_new_tokens"],
                    settings["length_penalty"],
                    no_repeat_ngram_size=settings["no_repeat_ngram_size"],
                    repetition_penalty=settings["repetition_penalty"],
                )
        return texts if isinstance(image, (list, tuple)) or len(texts) > 1 else texts[0]

    # -- visual instruction tuning ---------------------------------------------------------------

    def chat(
        self,
        images: Any,
        question: str,
        history: Sequence[dict[str, str]] = (),
        *,
        stream: Any = None,
        max_new_tokens: int = 64,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        use_cache: bool = True,
    ) -> str:
        """The model's answer to ``question`` about ``images`` (one, a list: several images of one
        conversation, or ``{modality: image}`` stacked as channels as in training).

        ``history``: earlier turns (``{"from": "human"|"gpt", "value": ...}``); ``stream``: a
        callable that receives the answer's text piece by piece as it is generated; ``sample``:
        sampling with ``temperature`` / ``top_p`` instead of greedy decoding.
        """
        self._require("chat", ("instruct",))
        pixels = self._single_input(images)
        with torch.inference_mode():
            return self.model.chat(
                pixels, question, history, on_text=stream, max_new_tokens=max_new_tokens, do_sample=sample,
                temperature=temperature, top_p=top_p, use_cache=use_cache,
            )  # fmt: skip

    # -- clinical ---------------------------------------------------------------------------------

    def risk(self, case: Any, text: str | None = None) -> dict[str, Any]:
        """One case ``{modality: image}`` (+ its report) -> risk, survival curve, diagnosis.

        ``risk``: Cox log hazard ratio, or for discrete-time models the cumulative hazard (higher
        = earlier event, as in evaluation); discrete models add ``survival``: the probability of no
        event by the end of each interval; a diagnosis head adds ``diagnosis``: label -> probability.
        """
        from medalign.tasks.clinical import risk_score

        self._require("risk", ("clinical",))
        config = self.model.config
        batch = self._modality_batch(case, config.image_size)
        if len(next(iter(batch.values()))) != 1:
            raise PredictorError("risk() takes one case: one image per modality")
        inputs: dict[str, Any] = {"images": batch}
        if text is not None:
            if not self.model.needs_text:
                raise PredictorError("this clinical model has no text tower; call risk() without text")
            tokens = self.model.tokenizer(
                [text], padding=True, truncation=True, max_length=config.max_text_length, return_tensors="pt"
            )
            inputs.update(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
        with torch.inference_mode():
            outputs = self.model(**inputs)
        result: dict[str, Any] = {"modalities": list(batch), "survival_model": config.survival}
        score = risk_score(outputs)
        if score is not None:
            result["risk"] = float(score[0])
        if "hazard_logits" in outputs:
            hazards = torch.sigmoid(outputs["hazard_logits"][0].float())
            result["survival"] = {
                "time": [float(t) for t in config.time_bins[1:]],
                "probability": torch.cumprod(1 - hazards, 0).tolist(),
            }
        if "logits" in outputs:
            probs = outputs["logits"][0].float().softmax(-1).tolist()
            result["diagnosis"] = dict(zip(self._class_names(len(probs)), probs, strict=True))
        return result
