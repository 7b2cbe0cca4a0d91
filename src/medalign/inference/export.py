"""ONNX export of a bundle (vision tower, text tower, segmentation model) and an ONNX Runtime predictor.

``export_onnx(bundle, out)`` writes one ONNX file per part plus ``export.json``:

* ``vision.onnx``: ``pixel_values [B, C, H, W]`` in [0, 1] -> ``image_embeds [B, D]``. The
  model's own pixel normalisation is inside the graph, so a deployment feeds [0, 1] pixels
  and cannot pair the weights with the wrong mean/std (what the embedding is, per bundle kind,
  is in ``VISION_EMBEDDINGS``);
* ``text.onnx`` (dual encoders): ``input_ids, attention_mask [B, L]`` -> ``text_embeds [B, D]``;
* ``segmentation.onnx``: ``pixel_values`` (+ ``input_ids, attention_mask`` for text-guided
  models) -> ``logits [B, K, H, W]``.

Batch size and text length are dynamic axes; the image size is fixed at export (ViT position
tables are; convolutional models, EfficientNet towers included, can be exported at another
multiple of their largest stride with ``image_size``).
Every file is checked before it is written: ONNX Runtime and PyTorch run the same random
images (and sample prompts) at a batch size and text length other than the traced ones, and a
part whose outputs differ by more than ``TOLERANCE`` is refused, so an export that exists is
one that was measured to agree.

The graphs come from ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), the
exporter PyTorch supports since 2.9; the TorchScript exporter is deprecated. Install the
``onnx`` extra: ``pip install -e ".[onnx]"``.
"""

# Why one module: ONNX export of every exportable part, each with its numerical check against
# PyTorch and the export manifest: one module per export format.

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import nn

from medalign.bundle.inputs import InputSpec, input_spec

EXPORT_FORMAT = 1
MANIFEST_NAME = "export.json"
TOKENIZER_DIR = "tokenizer"
TOLERANCE = 1e-4  # max abs difference ONNX Runtime vs PyTorch an export must stay within
PARTS = ("vision", "text", "segmentation")
KIND_PARTS: dict[str, tuple[str, ...]] = {
    "DualEncoder": ("vision", "text"),
    "pretrain": ("vision",),
    "clinical": ("vision",),
    "report": ("vision",),
    "segmentation": ("segmentation",),
}
# Bundle kind -> (model method giving the image embedding, what it is). None: the vision tower's
# pooled output (CLS of a ViT, average-pooled head features of a CNN) on normalised pixels (the
# clinical model has no single-image embedding method).
VISION_EMBEDDINGS: dict[str, tuple[str | None, str]] = {
    "DualEncoder": ("encode_image", "L2-normalised projected image embedding (DualEncoder.encode_image)"),
    "pretrain": ("encode", "pooled CLS features of the encoder, as probes use them (HybridMAE.encode)"),
    "report": (
        "encode_image",
        "L2-normalised CLS embedding of the vision tower (ReportGenerator.encode_image)",
    ),
    "clinical": (None, "pooled features of the shared vision tower (before image_proj)"),
}
# Traced with two prompts of different length (padding in the graph), checked with three others.
TRACE_TEXTS = ("a lesion in the left upper zone", "normal")
CHECK_TEXTS = ("no finding", "two nodules in the right lung, the larger one near the hilum", "effusion")
MAX_BATCH = 65536  # upper bound of the dynamic batch axis (torch.export needs one)
MAX_LENGTH = 4096  # upper bound of the dynamic text-length axis
EXTERNAL_DATA_BYTES = 1_800_000_000  # above this the weights go to a .data file (protobuf's 2 GB limit)


class ExportError(ValueError):
    """An export that cannot be done or did not verify; the message names the part and the cause."""


# ---------------------------------------------------------------------------------------------
# What each ONNX file computes: small modules around the bundle's model
# ---------------------------------------------------------------------------------------------


class _ImageEmbedding(nn.Module):
    """``pixel_values`` in [0, 1] -> the kind's image embedding (normalisation included)."""

    def __init__(self, model: nn.Module, method: str | None) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.method is not None:
            return getattr(self.model, self.method)(pixel_values)
        model = self.model
        pooled, _ = model.vision((pixel_values - model.pixel_mean) / model.pixel_std)
        return pooled


class _TextEmbedding(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class _SegmentationLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(pixel_values, input_ids=input_ids, attention_mask=attention_mask)["logits"]


@dataclass
class _Part:
    """One ONNX file to write: module, trace inputs, check inputs and axis names."""

    name: str
    module: nn.Module
    trace: dict[str, torch.Tensor]
    check: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, Any]]
    output: str
    description: str


def _model_name(model: nn.Module) -> str:
    arch = getattr(model.config, "arch", None)
    return f"{type(model).__name__} ({arch})" if arch else type(model).__name__


def _pixels(model: nn.Module, batch: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, int(model.config.in_channels), size, size, generator=generator)


def _tokens(model: nn.Module, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    batch = model.tokenize(list(texts))
    return {k: v.cpu().long() for k, v in batch.items()}


def _axes(text: bool) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=MAX_BATCH)
    axes: dict[str, dict[int, Any]] = {"pixel_values": {0: batch}}
    if text:
        length = Dim("length", min=1, max=MAX_LENGTH)
        axes = {**axes, "input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    return axes


def _export_size(model: nn.Module, image_size: int | None) -> int:
    """The exported image size; a ViT's position table only fits its trained size, a convolutional
    tower takes any multiple of its largest stride."""
    from medalign.models.towers import VisionTower

    size = int(model.config.image_size)
    if image_size is None or image_size == size:
        return size
    tower = getattr(model, "vision", None)
    if isinstance(tower, VisionTower):
        raise ExportError(
            f"{_model_name(model)} has a ViT whose position embeddings fit {size} px; "
            f"it cannot be exported at image_size={image_size}"
        )
    multiple = int(getattr(tower, "size_multiple", 1))
    if image_size < 1 or image_size % multiple:
        raise ExportError(
            f"image_size must be a positive multiple of {multiple} for {_model_name(model)}, got {image_size}"
        )
    return image_size


def _plan(model: nn.Module, kind: str, parts: Sequence[str], size: int) -> list[_Part]:
    """The modules and inputs of every requested part (no tracing yet)."""
    plan: list[_Part] = []
    for part in parts:
        if part == "vision":
            method, description = VISION_EMBEDDINGS[kind]
            plan.append(
                _Part(
                    "vision",
                    _ImageEmbedding(model, method),
                    {"pixel_values": _pixels(model, 2, size, 0)},
                    {"pixel_values": _pixels(model, 3, size, 1)},
                    {"pixel_values": _axes(False)["pixel_values"]},
                    "image_embeds",
                    description,
                )
            )
        elif part == "text":
            axes = _axes(True)
            plan.append(
                _Part(
                    "text",
                    _TextEmbedding(model),
                    _tokens(model, TRACE_TEXTS),
                    _tokens(model, CHECK_TEXTS),
                    {k: axes[k] for k in ("input_ids", "attention_mask")},
                    "text_embeds",
                    "L2-normalised projected text embedding (DualEncoder.encode_text)",
                )
            )
        else:
            text = bool(getattr(model, "needs_text", False))
            trace = {"pixel_values": _pixels(model, 2, size, 0)}
            check = {"pixel_values": _pixels(model, 3, size, 1)}
            if text:
                trace, check = (
                    {**trace, **_tokens(model, TRACE_TEXTS)},
                    {**check, **_tokens(model, CHECK_TEXTS)},
                )
            plan.append(
                _Part(
                    "segmentation",
                    _SegmentationLogits(model),
                    trace,
                    check,
                    _axes(text),
                    "logits",
                    "per-class logits at the input resolution; probabilities = sigmoid(logits)",
                )
            )
    return plan


def _check_supported(model: nn.Module, kind: str, parts: Sequence[str]) -> None:
    if kind not in KIND_PARTS:
        raise ExportError(
            f"bundle kind {kind!r} ({_model_name(model)}) has no ONNX export; supported kinds: {sorted(KIND_PARTS)}"
        )
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ExportError(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    missing = [p for p in parts if p not in KIND_PARTS[kind]]
    if missing:
        raise ExportError(
            f"{_model_name(model)} (kind {kind!r}) has no {missing} part; it exports {list(KIND_PARTS[kind])}"
        )
    attributes = getattr(model.config, "attributes_vocab", None)
    if "segmentation" in parts and attributes:
        raise ExportError(
            f"{_model_name(model)} takes structured attributes {sorted(attributes)}: exporting attribute "
            "inputs to ONNX is not supported (the model validates attribute indices with "
            "data-dependent control flow that torch.export cannot trace)"
        )


# ---------------------------------------------------------------------------------------------
# Export and verification
# ---------------------------------------------------------------------------------------------


def _require_onnx() -> None:
    """Fail early, naming the extra, when the exporter's packages are missing."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export needs {missing}: pip install -e '.[onnx]'")


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _numpy_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in inputs.items()}


def verify_onnx(
    path: str | os.PathLike, module: nn.Module, inputs: dict[str, torch.Tensor], tolerance: float = TOLERANCE
) -> float:
    """Max abs difference of ONNX Runtime vs ``module`` on ``inputs``; ExportError above ``tolerance``.

    A NaN or a shape mismatch counts as a failure too: either means the graph computes
    something else than the model.
    """
    with torch.inference_mode():
        expected = module(**inputs).float().cpu().numpy()
    actual = _session(Path(path)).run(None, _numpy_inputs(inputs))[0]
    if actual.shape != expected.shape:
        raise ExportError(
            f"'{path}': ONNX output shape {actual.shape} differs from PyTorch's {expected.shape}"
        )
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportError(
            f"'{path}': ONNX Runtime output differs from PyTorch by {diff:.3g} (> {tolerance:g}); "
            "refusing to write this model"
        )
    return diff


def _trace(part: _Part, path: Path, opset: int | None, name: str) -> None:
    external = sum(p.numel() * p.element_size() for p in part.module.parameters()) > EXTERNAL_DATA_BYTES
    # the exporter logs a warning per torchvision op it cannot register; medalign uses none
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # towers record per-batch state (attention mask, patch grid) as attributes; harmless here
            warnings.filterwarnings("ignore", message=".*was assigned during export.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            program = torch.onnx.export(
                part.module.eval(),
                (),
                kwargs=part.trace,
                dynamic_shapes=part.dynamic,
                input_names=list(part.trace),
                output_names=[part.output],
                opset_version=opset,
                dynamo=True,
                external_data=external,
                verbose=False,
            )
    except Exception as err:  # torch.export / onnxscript raise many types; keep the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"cannot export the {part.name} part of {name}: {first}") from err
    finally:
        registration.setLevel(level)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for the {part.name} part of {name}")
    program.save(str(path), external_data=external)


def _describe(path: Path) -> dict[str, Any]:
    """Inputs and outputs as ONNX Runtime sees them (symbolic axes by name) plus the opset."""
    import onnx

    session = _session(path)
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)

    def io(values: Any) -> list[dict[str, Any]]:
        return [{"name": v.name, "shape": list(v.shape), "dtype": v.type} for v in values]

    return {"inputs": io(session.get_inputs()), "outputs": io(session.get_outputs()), "opset": opset}


def _preprocessing(model: nn.Module, size: int, text: bool) -> dict[str, Any]:
    config = model.config
    stats = getattr(config, "image_stats", None)
    mean, std = stats() if callable(stats) and hasattr(model, "pixel_mean") else (None, None)
    out: dict[str, Any] = {
        "image_size": size,
        "in_channels": int(config.in_channels),
        "pixel_range": [0.0, 1.0],
        "image_mean": mean,
        "image_std": std,
        "normalisation": (
            "inside the graph: (pixel_values - image_mean) / image_std"
            if mean is not None
            else "none: the network takes [0, 1] pixels as they are"
        ),
        "resize": "bilinear, align_corners=False, no antialiasing (as medalign's data pipeline)",
    }
    if text:
        out["tokenizer"] = TOKENIZER_DIR
        out["max_text_length"] = int(config.max_text_length)
        out["tokenizer_call"] = "padding=True, truncation=True, max_length=max_text_length"
    return out


def export_onnx(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    parts: Sequence[str] | None = None,
    opset: int | None = None,
    image_size: int | None = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Path]:
    """Write ``<part>.onnx`` for each part (default: all the bundle has) and ``export.json``.

    Returns ``{part: path}`` plus ``"manifest"``. Nothing of a part is written unless ONNX
    Runtime reproduced PyTorch within ``tolerance`` on inputs of another batch size (and text
    length) than the traced ones.
    """
    from medalign.bundle import BundleError, load_bundle, read_bundle_config
    from medalign.version import __version__

    _require_onnx()

    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    try:
        kind = read_bundle_config(bundle_dir).get("kind")
        model = load_bundle(bundle_dir)
    except (BundleError, OSError) as err:
        raise ExportError(str(err)) from err
    wanted = list(dict.fromkeys(parts)) if parts else list(KIND_PARTS.get(kind, ()))
    _check_supported(model, kind, wanted)
    if tolerance < 0:
        raise ExportError(f"tolerance must be >= 0, got {tolerance}")
    size = _export_size(model, image_size)
    name = _model_name(model)
    model.eval()
    plan = _plan(model, kind, wanted, size)
    for part in plan:  # a wrong image_size (not a multiple the network needs) fails here, clearly
        try:
            with torch.inference_mode():
                part.module(**part.trace)
        except ValueError as err:
            raise ExportError(f"{name} cannot run at {size} px for the {part.name} part: {err}") from err

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    written: dict[str, Path] = {}
    described: dict[str, Any] = {}
    try:
        for part in plan:
            path = staging / f"{part.name}.onnx"
            _trace(part, path, opset, name)
            diff = max(
                verify_onnx(path, part.module, part.check, tolerance),
                verify_onnx(path, part.module, part.trace, tolerance),
            )
            info = _describe(path)
            described[part.name] = {
                "file": path.name,
                "inputs": info["inputs"],
                "outputs": info["outputs"],
                "opset": info["opset"],
                "output": part.description,
                "max_abs_diff": diff,
                "tolerance": tolerance,
            }
        for part in plan:  # every part verified: move them in together
            for file in staging.glob(f"{part.name}.onnx*"):
                os.replace(file, out_dir / file.name)
            written[part.name] = out_dir / f"{part.name}.onnx"
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    text = any(p.name == "text" or "input_ids" in p.trace for p in plan)
    if text:
        shutil.rmtree(out_dir / TOKENIZER_DIR, ignore_errors=True)
        model.tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    manifest = {
        "format": EXPORT_FORMAT,
        "medalign_version": __version__,
        "torch_version": torch.__version__,
        "bundle": str(bundle_dir.resolve()),
        "kind": kind,
        "model": name,
        "num_classes": int(model.config.num_classes) if kind == "segmentation" else None,
        # which images fill pixel_values' channels (e.g. modalities a + b stacked), as the bundle records
        "inputs": input_spec(model).to_dict(),
        "preprocessing": _preprocessing(model, size, text),
        "parts": described,
    }
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return {**written, "manifest": path}


# ---------------------------------------------------------------------------------------------
# ONNX Runtime predictor
# ---------------------------------------------------------------------------------------------


def _as_batch(images: Any, channels: int, size: int) -> np.ndarray:
    """``[B, C, H, W]`` (or one ``[C, H, W]``) float array/tensor -> float32 at the exported size."""
    array = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != channels:
        raise ValueError(f"expected images [B, {channels}, H, W] in [0, 1], got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if array.shape[-2:] != (size, size):
        resized = F.interpolate(
            torch.from_numpy(array), size=(size, size), mode="bilinear", align_corners=False
        )
        array = resized.numpy()
    return np.ascontiguousarray(array)


class OnnxPredictor:
    """Embeddings and segmentations from an ``export_onnx`` folder with ONNX Runtime (CPU).

    Images are ``[B, C, H, W]`` (or ``[C, H, W]``) floats in [0, 1], numpy or torch, with exactly
    the exported channels, or ``{modality: [B, c, H, W]}`` for a bundle trained on stacked
    modalities (stacked in the order ``export.json``'s ``inputs`` records; a missing modality is
    an error naming what is needed). Other sizes than the exported one are resized bilinearly
    (as medalign's data pipeline does), and segmentation probabilities are resized back to the
    input's size.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.directory = Path(out_dir)
        path = self.directory / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"'{self.directory}' is not an ONNX export: {MANIFEST_NAME} is missing")
        self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if self.manifest.get("format") != EXPORT_FORMAT:
            raise ValueError(f"'{path}': unsupported export format {self.manifest.get('format')!r}")
        self.sessions = {
            part: _session(self.directory / info["file"]) for part, info in self.manifest["parts"].items()
        }
        prep = self.manifest["preprocessing"]
        self.image_size, self.in_channels = int(prep["image_size"]), int(prep["in_channels"])
        self.max_text_length = prep.get("max_text_length")
        recorded = self.manifest.get("inputs")
        self.inputs = InputSpec.from_dict(recorded) if isinstance(recorded, dict) else None  # None: an older export
        self._tokenizer: Any = None

    def pixels(self, images: Any) -> np.ndarray:
        """``[B, C, size, size]`` float32 for the graph: an array with the exported channels, or
        ``{modality: array}`` stacked as the export's input record says."""
        if isinstance(images, Mapping):
            if self.inputs is None:
                raise ValueError("this export records no modalities (exported before inputs were recorded); give [B, C, H, W]")
            arranged = self.inputs.arrange(images)
            parts = [_as_batch(v, self.inputs.channels, self.image_size) for v in arranged.values()]
            if len({len(p) for p in parts}) > 1:
                raise ValueError(f"modalities give different numbers of images: {[len(p) for p in parts]}")
            return np.ascontiguousarray(np.concatenate(parts, axis=1))
        try:
            return _as_batch(images, self.in_channels, self.image_size)
        except ValueError as err:
            takes = f"; the model takes {self.inputs.describe()}" if self.inputs is not None else ""
            raise ValueError(f"{err}{takes}") from None

    @property
    def parts(self) -> list[str]:
        return list(self.sessions)

    def _run(self, part: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if part not in self.sessions:
            raise ValueError(f"'{self.directory}' has no {part} model; it has {self.parts}")
        return self.sessions[part].run(None, inputs)[0]

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            folder = self.directory / TOKENIZER_DIR
            if not folder.is_dir():
                raise ValueError(
                    f"'{self.directory}' has no {TOKENIZER_DIR}/: the exported model takes no text"
                )
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return self._tokenizer

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="np"
        )
        return {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    def embed_image(self, images: Any) -> np.ndarray:
        """``[B, D]`` image embeddings (what ``export.json`` names under parts.vision.output)."""
        return self._run("vision", {"pixel_values": self.pixels(images)})

    def embed_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """``[B, D]`` L2-normalised text embeddings (dual encoders)."""
        return self._run("text", self.tokenize(texts))

    def segment(self, images: Any, text: str | Sequence[str] | None = None) -> np.ndarray:
        """Per-class foreground probabilities ``[B, K, H, W]`` at the input's size.

        ``text`` is one prompt for the whole batch or one per image (text-guided models only).
        """
        pixels = self.pixels(images)
        inputs = {"pixel_values": pixels}
        names = {i["name"] for i in self.manifest["parts"].get("segmentation", {}).get("inputs", [])}
        if "input_ids" in names:
            if text is None:
                raise ValueError("this model is text-guided: give the prompt that names what to segment")
            prompts = [text] * len(pixels) if isinstance(text, str) else list(text)
            if len(prompts) != len(pixels):
                raise ValueError(f"{len(prompts)} prompts for {len(pixels)} images")
            inputs.update(self.tokenize(prompts))
        elif text is not None:
            raise ValueError("this segmentation model takes no text")
        logits = self._run("segmentation", inputs)
        array = next(iter(images.values())) if isinstance(images, Mapping) else images
        height, width = np.shape(array.detach() if isinstance(array, torch.Tensor) else array)[-2:]
        if (height, width) != logits.shape[-2:]:
            logits = F.interpolate(
                torch.from_numpy(logits), size=(height, width), mode="bilinear", align_corners=False
            ).numpy()
        return 1.0 / (1.0 + np.exp(-logits))


# ---------------------------------------------------------------------------------------------
# Command line (registered by medalign.cli as `medalign export`)
# ---------------------------------------------------------------------------------------------

export_app = typer.Typer(
    help="Export a trained bundle for other runtimes (ONNX).\n\nExample:\n\n"
    "    medalign export onnx --model runs/align/bundle --out exported/align",
    no_args_is_help=True,
)


@export_app.command("onnx")
def export_onnx_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="Bundle folder (a run's bundle/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the .onnx files and export.json.")],
    part: Annotated[
        list[str] | None,
        typer.Option(
            "--part",
            help="vision | text | segmentation; repeat for several (default: every part the bundle has).",
        ),
    ] = None,
    opset: Annotated[
        int | None, typer.Option("--opset", help="ONNX opset (default: the exporter's recommended one).")
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", help="Export size for convolutional segmenters (default: the trained size)."
        ),
    ] = None,
) -> None:
    """Export a bundle's vision tower, text tower and/or segmentation model to ONNX.

    Each file is checked against PyTorch (max abs difference <= 1e-4) before it is written.
    export.json records inputs, outputs, preprocessing and the measured difference.
    Needs the onnx extra of medalign (onnx, onnxscript, onnxruntime). Example:

        medalign export onnx --model runs/align/bundle --out exported/align --part vision --part text
    """
    try:
        written = export_onnx(model, out, parts=part or None, opset=opset, image_size=image_size)
    except (ImportError, ExportError) as err:
        from medalign.cli_grammar import fail

        raise fail(str(err)) from err
    manifest = json.loads(written["manifest"].read_text(encoding="utf-8"))
    for info in manifest["parts"].values():
        typer.echo(f"wrote {out / info['file']} (max abs diff vs PyTorch {info['max_abs_diff']:.2e})")
    typer.echo(f"wrote {written['manifest']}")
