"""What the web demo does with an upload, without the web: one or more bundles, each asked
for what its kind can do, and an optional gallery of known cases for similar-case search.

Serving several bundles at once is the point: a clinician uploads one scan and sees the
aligned model's zero-shot diagnosis and similar cases, the segmenter's overlay and the report
model's text side by side. Each capability goes to the first bundle (in ``--model`` order) that
has it; a capability no bundle has is simply absent from the answer, and one that fails for
this input (a text-guided segmenter with no prompt, a fusion model missing its modalities) is
listed in ``notes`` with the reason instead of failing the whole request.

Each bundle records the images it takes (:mod:`medalign.inputs`): the page asks for one upload
per modality the served bundles name (``image:<modality>``) and one plain ``image`` only when a
bundle takes a single unnamed image. A bundle trained on *a* and *b* stacked never sees one
upload repeated into both channels: without *b* it answers nothing and the note says what it
needs. Every answer lists the uploads it used (``inputs``).
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medalign.inputs import InputSpec, modality_name
from medalign.predict import Predictor, PredictorError, prepare

# Per capability, the bundle kinds that have it (the Predictor's CAPABILITIES, seen from the demo).
_EMBEDDERS = ("DualEncoder", "pretrain", "report", "clinical")
THUMBNAIL_SIDE = 96
OVERLAY_SIDE = 512


def png_base64(image: Any) -> str:
    """A PIL image as a ``data:`` URL the page can show without another request."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _display_image(array: np.ndarray, side: int) -> Any:
    """A [0, 1] grey/RGB array as an 8-bit PIL image no larger than ``side`` pixels a side."""
    from PIL import Image

    image = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    image.thumbnail((side, side))
    return image


def _unit_grey(pixels: Any) -> np.ndarray:
    """The first channel of a prepared ``[1, C, H, W]`` tensor, as [0, 1] floats."""
    return pixels[0, 0].clamp(0, 1).float().cpu().numpy()


def upload_field(modality: str) -> str:
    """The form field of an upload: ``image`` (plain) or ``image:<modality>``."""
    return modality if modality == "image" else f"image:{modality}"


def _fields_used(answer: Any) -> list[str]:
    """The upload fields an answer records (similar cases: every hit records the same)."""
    if isinstance(answer, dict):
        return list(answer.get("inputs", []))
    if isinstance(answer, list) and answer and isinstance(answer[0], dict):
        return list(answer[0].get("inputs", []))
    return []


@dataclass
class ServedModel:
    """One loaded bundle with the name the page shows for it."""

    name: str
    predictor: Predictor

    @property
    def kind(self) -> str:
        return self.predictor.kind

    @property
    def inputs(self) -> InputSpec:
        return self.predictor.inputs

    @property
    def modalities(self) -> list[str]:
        """The named uploads this bundle takes (none: one plain ``image``)."""
        return [] if self.takes_plain_image else list(self.inputs.modalities)

    @property
    def takes_plain_image(self) -> bool:
        """One image per case, whatever the modality column was called (``single``, ``any``, ``unrecorded``)."""
        spec = self.inputs
        return spec.layout in ("single", "any", "unrecorded") or (len(spec.modalities) == 1 and spec.layout != "stacked")

    def case(self, images: Mapping[str, str]) -> tuple[Any, list[str]]:
        """The uploads this bundle uses, as the Predictor takes them, and their field names.

        A plain-image bundle takes the ``image`` upload, else the one upload named by one of its
        modalities; a several-modality bundle takes ``{modality: upload}`` of its own modalities
        (the Predictor refuses a missing one, naming what it needs).
        """
        spec = self.inputs
        if self.takes_plain_image:
            if "image" in images:
                return images["image"], ["image"]
            own = [m for m in spec.modalities if m in images]
            if len(own) == 1:
                return images[own[0]], [upload_field(own[0])]
            raise PredictorError(f"{self.name} takes {spec.describe()}: upload it as 'image'")
        present = {m: images[m] for m in spec.modalities if m in images}
        self.predictor.arrange(present)  # a missing modality: the bundle's one-line error
        return present, [upload_field(m) for m in present]

    def can(self, capability: str) -> bool:
        p, config = self.predictor, self.predictor.model.config
        if capability == "segment":
            return p.kind == "segmentation" or (p.kind == "fusion" and config.task_head == "segment")
        if capability == "classify":
            return (
                p.kind == "DualEncoder"
                or (p.kind == "clinical" and bool(config.num_classes))
                or (p.kind == "fusion" and config.task_head == "classify")
            )
        if capability == "embed":
            return p.kind in _EMBEDDERS
        if capability == "report":
            return p.kind == "report"
        if capability == "risk":
            return p.kind == "clinical" and getattr(config, "survival", None) not in (None, "none")
        if capability == "chat":
            return p.kind == "instruct"
        raise ValueError(f"unknown capability {capability!r}")

    @property
    def needs_text(self) -> bool:
        return self.kind == "segmentation" and bool(getattr(self.predictor.model, "needs_text", False))


@dataclass
class CaseGallery:
    """Known cases for similar-case search: unit embeddings, thumbnails and what each case says."""

    embeddings: np.ndarray
    case_ids: list[str]
    captions: list[str]
    thumbnails: list[str]
    source: str

    @classmethod
    def from_manifest(
        cls,
        manifest_path: str | Path,
        model: ServedModel,
        *,
        column: str | None = None,
        split: str | None = "test",
        max_cases: int = 1000,
    ) -> CaseGallery:
        from medalign.data.manifest import read_manifest
        from medalign.data.readers import read_image
        from medalign.metrics import unit_rows

        manifest = read_manifest(manifest_path)
        if split:
            if "split" not in manifest.table.columns or not (manifest.table["split"] == split).any():
                raise ValueError(f"'{manifest_path}': no rows in split {split!r} for the similar-case gallery")
            manifest = manifest.split(split)
        spec = model.inputs
        try:  # the bundle's own columns (each of its modalities), or the one --cases-column names
            keys = spec.columns_for(manifest.image_columns, [column] if column else None)
        except ValueError as err:
            raise ValueError(f"'{manifest_path}' for the similar-case gallery: {err}") from err
        if model.takes_plain_image:
            keys = keys[:1]
        table = manifest.table.head(max_cases)
        images = {modality_name(k): [manifest.resolve(ref) for ref in table[k]] for k in keys}
        paths = next(iter(images.values()))  # thumbnails: the first modality
        embeddings = unit_rows(model.predictor.embed_image(paths if model.takes_plain_image else images))
        captions = []
        for _, row in table.iterrows():
            label = next((f"{c}: {row[c]}" for c in manifest.label_columns if str(row[c])), "")
            text = str(row["text"]) if "text" in table.columns else ""
            captions.append(" · ".join(part for part in (label, text[:160]) if part))
        thumbnails = []
        for ref in paths:
            array = read_image(ref).array.astype(np.float32)
            scale = float(array.max()) or 1.0
            thumbnails.append(png_base64(_display_image(array / scale, THUMBNAIL_SIDE)))
        return cls(embeddings, [str(c) for c in table["case_id"]], captions, thumbnails, str(manifest_path))

    def __len__(self) -> int:
        return len(self.case_ids)

    def nearest(self, embedding: np.ndarray, k: int) -> list[dict[str, Any]]:
        from medalign.metrics import unit_rows

        scores = self.embeddings @ unit_rows(embedding.reshape(1, -1))[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return [
            {
                "case_id": self.case_ids[i],
                "score": round(float(scores[i]), 4),
                "caption": self.captions[i],
                "thumbnail": self.thumbnails[i],
            }
            for i in order
        ]


@dataclass
class DemoService:
    """The demo's answers for one upload; thread-safe (one inference at a time, CPU-friendly)."""

    models: list[ServedModel]
    labels: list[str] | None = None
    templates: str | None = None
    gallery: CaseGallery | None = None
    gallery_model: ServedModel | None = None
    top_k: int = 5
    router: Any = None  # medalign.routing.Router, built on the first typed request
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("the demo needs at least one bundle (--model)")

    @classmethod
    def from_bundles(
        cls,
        bundles: Sequence[str | Path],
        *,
        labels: Sequence[str] | None = None,
        templates: str | None = None,
        cases: str | Path | None = None,
        cases_column: str | None = None,
        cases_split: str | None = "test",
        max_cases: int = 1000,
    ) -> DemoService:
        import medalign

        models = [ServedModel(Path(b).name if Path(b).name != "bundle" else Path(b).parent.name, medalign.load(str(b))) for b in bundles]
        service = cls(models, list(labels) if labels else None, templates)
        if cases is not None:
            service.gallery_model = service.first("embed")
            if service.gallery_model is None:
                raise ValueError("--cases needs a bundle that embeds images (alignment, MAE, report or clinical)")
            service.gallery = CaseGallery.from_manifest(
                cases, service.gallery_model, column=cases_column, split=cases_split, max_cases=max_cases
            )
        return service

    def first(self, capability: str) -> ServedModel | None:
        return next((m for m in self.models if m.can(capability)), None)

    def modalities(self) -> list[str]:
        """Named uploads the page asks for: every several-modality bundle's, in first-seen order."""
        seen: list[str] = []
        for model in self.models:
            seen += [m for m in model.modalities if m not in seen]
        return seen

    def upload_fields(self) -> list[dict[str, Any]]:
        """One upload per input the served bundles take: ``image`` (plain) and ``image:<modality>``."""
        fields = []
        plain = [m.name for m in self.models if m.takes_plain_image]
        if plain:
            fields.append({"field": "image", "label": "Image", "models": plain, "required": True})
        for name in self.modalities():
            users = [m for m in self.models if name in m.modalities]
            optional = all(m.inputs.missing_allowed for m in users)
            fields.append({"field": f"image:{name}", "label": f"Modality {name}", "models": [m.name for m in users],
                           "required": not optional})  # fmt: skip
        return fields

    def info(self) -> dict[str, Any]:
        """What the page needs to draw its form: the bundles, their abilities, the inputs."""
        capabilities = ("classify", "segment", "embed", "report", "risk", "chat")
        return {
            "models": [
                {"name": m.name, "kind": m.kind, "can": [c for c in capabilities if m.can(c)], "modalities": m.modalities,
                 "takes": m.inputs.describe()}
                for m in self.models
            ],
            "modalities": self.modalities(),
            "uploads": self.upload_fields(),
            "labels": self.labels or [],
            "templates": self.templates,
            "needs_prompt": any(m.needs_text for m in self.models if m.can("segment")),
            "gallery": {"cases": len(self.gallery), "source": Path(self.gallery.source).name} if self.gallery else None,
        }

    # -- one request -------------------------------------------------------------------------

    def analyse(
        self,
        images: Mapping[str, str],
        prompt: str | None = None,
        labels: Sequence[str] | None = None,
        request: str | None = None,
    ) -> dict[str, Any]:
        """Every answer the served bundles can give for one case, or the one a request asks for.

        ``images`` maps ``"image"`` (a single-input scan) and/or modality names to readable refs
        (the stored uploads). A typed ``request`` ("outline the lesion", "how many lesions?") is
        routed (``medalign.routing``) to chat, segment, classify or risk and only that answer is
        given; a request under the routing threshold, or routed to what no bundle serves, falls
        back to every answer, with a note saying why. Failures of one capability go to ``notes``;
        a case none of the bundles can read raises :class:`PredictorError`.
        """
        if not images:
            raise PredictorError("upload an image")
        prompt = (prompt or "").strip() or None
        request = (request or "").strip() or None
        labels = [s.strip() for s in (labels or self.labels or []) if s.strip()] or None
        uploads = dict(images)
        result: dict[str, Any] = {"notes": [], "timings_ms": {}}
        steps = [
            ("classify", lambda: self._classify(uploads, labels)),
            ("segment", lambda: self._segment(uploads, prompt or request)),
            ("similar", lambda: self._similar(uploads)),
            ("report", lambda: self._report(uploads)),
            ("risk", lambda: self._risk(uploads)),
        ]
        if request is not None:
            steps = self._routed(steps, request, result, lambda: self._chat(uploads, request))
        with self._lock:
            result["input"] = self._input_preview(next(iter(uploads.values())))
            for name, step in steps:
                start = time.perf_counter()
                try:
                    answer = step()
                except (PredictorError, ValueError) as exc:  # this capability cannot use this input
                    result["notes"].append(f"{name}: {exc}")
                    continue
                if answer is not None:
                    result[name] = answer
                    result["timings_ms"][name] = round(1000 * (time.perf_counter() - start), 1)
        answered = [k for k in ("classify", "segment", "similar", "report", "risk", "chat") if k in result]
        if not answered:
            raise PredictorError("no served model could use this input: " + "; ".join(result["notes"]))
        used = {field for k in answered for field in _fields_used(result[k])}
        unused = [field for field in map(upload_field, uploads) if field not in used]
        if unused:
            result["notes"].append(f"uploads not used by any answer: {', '.join(unused)}")
        return result

    def _routed(self, steps: list[Any], request: str, result: dict[str, Any], chat: Any) -> list[Any]:
        """The one step a request routes to (recorded in ``result["route"]``), else every step."""
        from medalign.routing import Router

        if self.router is None:
            self.router = Router()
        route = self.router.route(request)
        result["route"] = route.to_dict()
        if route.name is None:
            result["notes"].append(
                f"request: not understood (closest: {route.best}, similarity {route.score:.2f} < "
                f"{self.router.threshold}); showing every answer"
            )
            return steps
        if self.first(route.name) is None:
            result["notes"].append(f"request: routed to {route.name}, which no served bundle does; showing every answer")
            return steps
        return [("chat", chat)] if route.name == "chat" else [s for s in steps if s[0] == route.name]

    def _input_preview(self, ref: str) -> dict[str, Any]:
        from medalign.data.readers import read_image

        data = read_image(ref)
        array = data.array.astype(np.float32)
        low, high = float(array.min()), float(array.max())
        shown = (array - low) / (high - low) if high > low else np.zeros_like(array)
        return {
            "format": data.meta.get("format"),
            "height": int(array.shape[0]),
            "width": int(array.shape[1]),
            "image": png_base64(_display_image(shown, OVERLAY_SIDE)),
        }

    def _classify(self, uploads: Mapping[str, str], labels: Sequence[str] | None) -> dict[str, Any] | None:
        model = self.first("classify")
        if model is None:
            return None
        case, used = model.case(uploads)
        if model.kind == "DualEncoder":
            if not labels and not self.templates:
                raise PredictorError("zero-shot diagnosis needs class labels (type them, or start with --label)")
            probs = model.predictor.classify(case, labels=labels, templates=self._templates_for(labels))[0]
        else:
            probs = model.predictor.classify(case, labels=labels)[0]
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])
        return {
            "model": model.name,
            "inputs": used,
            "zero_shot": model.kind == "DualEncoder",
            "probabilities": {k: round(v, 4) for k, v in ranked},
            "prediction": ranked[0][0],
        }

    def _templates_for(self, labels: Sequence[str] | None) -> str | None:
        """The served template file when it knows every typed label, else plain-name prompts."""
        if self.templates is None or not labels:
            return self.templates
        from medalign.zeroshot import load_templates

        known = load_templates(self.templates).get("classes") or {}
        return self.templates if set(labels) <= set(known) else None

    def _segment(self, uploads: Mapping[str, str], prompt: str | None) -> dict[str, Any] | None:
        from medalign.inference import overlay

        model = self.first("segment")
        if model is None:
            return None
        if model.needs_text and not prompt:
            raise PredictorError(f"{model.name} is text-guided: type what to segment")
        case, used = model.case(uploads)
        probabilities = model.predictor.segment(case, text=prompt if model.needs_text else None)
        mask = probabilities >= 0.5
        shown = case if isinstance(case, str) else next(iter(case.values()))
        image = overlay(prepare(shown, 1, None, model.predictor.normalisation)[None], mask)
        image.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE))
        return {
            "model": model.name,
            "inputs": used,
            "prompt": prompt if model.needs_text else None,
            "foreground_fraction": round(float(mask.mean()), 4),
            "overlay": png_base64(image),
        }

    def _similar(self, uploads: Mapping[str, str]) -> list[dict[str, Any]] | None:
        if self.gallery is None or self.gallery_model is None:
            return None
        case, used = self.gallery_model.case(uploads)
        hits = self.gallery.nearest(self.gallery_model.predictor.embed_image(case)[0], self.top_k)
        return [{**hit, "inputs": used} for hit in hits]

    def _report(self, uploads: Mapping[str, str]) -> dict[str, Any] | None:
        model = self.first("report")
        if model is None:
            return None
        case, used = model.case(uploads)
        return {"model": model.name, "inputs": used, "text": model.predictor.report(case)}

    def _chat(self, uploads: Mapping[str, str], question: str) -> dict[str, Any] | None:
        model = self.first("chat")
        if model is None:
            return None
        case, used = model.case(uploads)
        return {"model": model.name, "inputs": used, "question": question, "answer": model.predictor.chat(case, question)}

    def _risk(self, uploads: Mapping[str, str]) -> dict[str, Any] | None:
        model = self.first("risk")
        if model is None:
            return None
        case, used = model.case(uploads)
        return {"model": model.name, "inputs": used, **model.predictor.risk(case)}
