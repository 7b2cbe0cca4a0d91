"""Segmentation models: MONAI U-Nets, a U-Net on any image tower and a CLIP-feature decoder; the
shared segmenter base.

Reading order: the configs (plain data, one per family), ``SegmentationModel`` (what every
segmenter shares), the families (``MonaiSegmenter``, ``TowerUNet``, ``ClipDecoder``) and the
registered architectures at the bottom. ``TowerUNet`` and ``ClipDecoder`` take any image tower
(``vision``: pretrained EfficientNet-Lite offline, a hub model online, or a random ViT); their
encoder/decoder pieces live in ``medalign.models.pyramid``. The text-guided family
(``text_guided``, alias ``text_unet``) lives in :mod:`medalign.models.text_guided` and registers
its archs here through ``register_segmentation_arch``.

Every segmenter has the same call, so one segmentation task, loss and Predictor serve them all:

    forward(pixel_values [B, C, H, W] in [0, 1], input_ids=None, attention_mask=None, attributes=None)
        -> {"logits": [B, K, H, W], "side_logits": [coarse logits, ...] (possibly empty)}

Image-only models ignore the text arguments, so a task can always pass what the batch has.
``needs_text`` tells the data pipeline whether to tokenize; ``tokenizer`` is built lazily and only
text models have one. Side logits keep their own (coarser) resolution: the loss decides how to
compare them with the mask (upsample the logits or pool the mask), not the model.
"""

# Why one module: the segmentation family shares one config, one decoder and the side outputs
# the losses read.

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from medalign.models.pyramid import (
    DECODER_CHANNELS,
    ConvBlock,
    FeaturePyramid,
    UNetDecoder,
    conv_norm_act,
    prior_logits_head,
    upsample_to,
)
from medalign.models.registry import register_model
from medalign.models.tower_config import EFFICIENTNET_LITE
from medalign.models.towers import (
    ConfigRecord,
    ImageInput,
    ImageTower,
    TowerConfig,
    VisionTower,
    build_text_tower,
    build_tokenizer,
    build_vision_tower,
    tokenizer_source,
    tower_call,
)

MONAI_ARCHS = ("unet", "attention_unet", "swin_unetr")
SEGMENTATION_MODELS = (
    *MONAI_ARCHS,
    "unet_pretrained",
    "clip_decoder",
    "text_guided",
    "text_unet",
)  # registered
# (text_guided and its alias text_unet live in medalign.models.text_guided)
LITE0 = TowerConfig("efficientnet_lite", source=next(iter(EFFICIENTNET_LITE)))  # ImageNet weights, offline

__all__ = ["ConvBlock"]  # re-exported: fusion and the text-guided model build with it

C = TypeVar("C", bound="_SegConfig")


# ---------------------------------------------------------------------------------------------
# Configs: everything that defines a model, as JSON-safe data (what a bundle stores)
# ---------------------------------------------------------------------------------------------


@dataclass
class _SegConfig(ConfigRecord):
    """Fields and (de)serialisation shared by every segmentation config.

    ``arch`` is stored in the dict so ``segmentation_config_from_dict`` can pick the config
    class of a saved model without being told which family it belongs to.
    """

    arch: str
    in_channels: int = 1
    num_classes: int = 1
    image_size: int = 224  # the training resolution; convolutional models accept other multiples

    _towers: ClassVar[tuple[str, ...]] = ()  # fields holding a TowerConfig (or None)

    def __post_init__(self) -> None:
        self.check_towers()  # YAML recipes and bundles give nested dicts
        if self.in_channels < 1 or self.num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be >= 1, got {self.in_channels}, {self.num_classes}"
            )


@dataclass
class MonaiSegConfig(_SegConfig):
    """MONAI's 2D U-Net, Attention U-Net or SwinUNETR; ``arch`` picks which."""

    arch: str = "unet"
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # (Attention) U-Net
    num_res_units: int = 2  # U-Net only
    dropout: float = 0.0
    feature_size: int = 24  # SwinUNETR only; MONAI requires a multiple of 12
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # SwinUNETR only
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])  # SwinUNETR only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.arch not in MONAI_ARCHS:
            raise ValueError(f"arch must be one of {MONAI_ARCHS}, got {self.arch!r}")
        self.channels = [int(c) for c in self.channels]
        self.depths = [int(d) for d in self.depths]
        self.num_heads = [int(h) for h in self.num_heads]
        if self.arch == "swin_unetr" and self.feature_size % 12:
            raise ValueError(f"SwinUNETR needs feature_size divisible by 12, got {self.feature_size}")
        if self.image_size % self.size_multiple:
            raise ValueError(
                f"{self.arch} needs image_size divisible by {self.size_multiple}, got {self.image_size}"
            )

    @property
    def size_multiple(self) -> int:
        """Inputs must divide by this: every stride-2 stage halves the map and skips must line up."""
        return 32 if self.arch == "swin_unetr" else 2 ** (len(self.channels) - 1)


@dataclass
class TowerUNetConfig(ImageInput, _SegConfig):
    """U-Net whose encoder is an image tower (pretrained EfficientNet-Lite0 by default).

    Skips come from every stride of the tower (``FeaturePyramid``: a transformer's patch-grid
    layers are resampled into a pyramid). ``stem_width`` 0 (default) predicts at the tower's
    finest stride (2 for EfficientNet) and upsamples the logits; > 0 adds a full-resolution skip
    from two convolutions on the image, which multiplies the CPU training step several times
    (two GroupNorm convolutions at full resolution and a decoder stage there).
    """

    arch: str = "unet_pretrained"
    vision: TowerConfig = field(default_factory=lambda: LITE0.replace())
    decoder_channels: list[int] = field(default_factory=lambda: list(DECODER_CHANNELS))
    stem_width: int = 0
    foreground_prior: float | None = 0.1  # the head's initial sigmoid; None = zero bias
    freeze_vision: bool = False
    image_mean: list[float] | None = None  # None = what the tower's weights expect
    image_std: list[float] | None = None

    _towers: ClassVar[tuple[str, ...]] = ("vision",)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.decoder_channels = [int(c) for c in self.decoder_channels]
        if not self.decoder_channels or min(self.decoder_channels) < 1 or self.stem_width < 0:
            raise ValueError(
                f"decoder_channels must be positive widths and stem_width >= 0, got "
                f"{self.decoder_channels}, {self.stem_width}"
            )
        self.check_image_stats()


@dataclass
class ClipDecoderConfig(ImageInput, _SegConfig):
    """CLIPSeg-style decoder on the deep features of any image tower (a CLIP ViT by default)."""

    arch: str = "clip_decoder"
    vision: TowerConfig = field(default_factory=lambda: TowerConfig("clip_vision"))
    text: TowerConfig | None = None  # set -> FiLM conditioning on the pooled text embedding
    decoder_dim: int = 64  # width every tapped map is projected to
    # 1-based transformer layers to tap (CLIP/ViT towers only); None = the tower's feature maps
    # (four evenly spaced layers of a transformer, the stride >= 8 maps of a CNN)
    extract_layers: list[int] | None = None
    skip_dim: int = 32  # width of the high-resolution (stride 4) skip from the image
    foreground_prior: float | None = 0.1  # the head's initial sigmoid; None = zero bias
    freeze_vision: bool = False
    freeze_text: bool = True
    max_text_length: int = 77
    image_mean: list[float] | None = None  # None = the tower's statistics (CLIP's for ViTs)
    image_std: list[float] | None = None

    _towers: ClassVar[tuple[str, ...]] = ("vision", "text")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.extract_layers is not None:
            self.extract_layers = sorted({int(i) for i in self.extract_layers})
        if self.decoder_dim < 1 or self.skip_dim < 1:
            raise ValueError(
                f"decoder_dim and skip_dim must be >= 1, got {self.decoder_dim}, {self.skip_dim}"
            )
        self.check_image_stats()


# arch -> (config class, model class). The text-guided family registers itself from its own
# module (medalign.models.text_guided) through ``register_segmentation_arch``.
ARCHITECTURES: dict[str, tuple[type[_SegConfig], type[SegmentationModel]]] = {}
CONFIG_CLASSES: dict[str, type[_SegConfig]] = {}


def register_segmentation_arch(arch: str, config_class: type[_SegConfig], model_class: type) -> None:
    """Make ``arch`` (the value a config dict stores) rebuild ``model_class`` from ``config_class``."""
    if arch in ARCHITECTURES:
        raise ValueError(f"segmentation arch {arch!r} is already registered")
    ARCHITECTURES[arch] = (config_class, model_class)
    CONFIG_CLASSES[arch] = config_class


def segmentation_config_from_dict(data: dict[str, Any]) -> _SegConfig:
    """The config class named by ``data["arch"]``, so a saved dict alone rebuilds its model."""
    arch = data.get("arch")
    if arch not in CONFIG_CLASSES:
        import medalign.models  # noqa: F401  (registers the archs that live in other modules)
    if arch not in CONFIG_CLASSES:
        raise ValueError(f"unknown segmentation arch {arch!r}; choose from {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[arch].from_dict(data)


def build_segmentation_model(config: _SegConfig | dict[str, Any]) -> SegmentationModel:
    """Model of a config (or its dict): the inverse of ``model.config.to_dict()``."""
    if isinstance(config, dict):
        config = segmentation_config_from_dict(config)
    entry = ARCHITECTURES.get(getattr(config, "arch", None))  # type: ignore[arg-type]
    if entry is None or not isinstance(config, entry[0]):
        raise TypeError(f"not a segmentation config: {type(config).__name__}")
    return entry[1](config)


# ---------------------------------------------------------------------------------------------
# What every segmenter shares
# ---------------------------------------------------------------------------------------------


class SegmentationModel(nn.Module):
    """Base class: input checks, the lazy tokenizer and frozen-tower bookkeeping.

    Subclasses set ``self.text`` (a TextTower or None) before calling ``_finish_init``.
    """

    bundle_kind = "segmentation"

    config: Any
    text: nn.Module | None

    def __init__(self) -> None:
        super().__init__()
        self._tokenizer: Any = None
        self._frozen: list[nn.Module] = []

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def needs_text(self) -> bool:
        return getattr(self, "text", None) is not None

    @property
    def tokenizer(self) -> Any:
        """The text tower's HF tokenizer, built on first use; None for models that take no text."""
        if not self.needs_text:
            return None
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.config.text)
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` on the model's device, truncated to ``max_text_length``."""
        if not self.needs_text:
            raise ValueError(f"{self.config.arch} takes no text")
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_text_length,
            return_tensors="pt",
        )
        device = next(self.parameters()).device
        return {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
        }

    def _freeze(self, module: nn.Module) -> None:
        for p in module.parameters():
            p.requires_grad_(False)
        self._frozen.append(module)
        module.eval()

    def train(self, mode: bool = True) -> SegmentationModel:
        """Frozen towers stay in eval mode so their features do not change with dropout."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def _check_pixels(self, pixel_values: torch.Tensor, multiple: int) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.in_channels:
            raise ValueError(
                f"expected pixel_values [B, {self.in_channels}, H, W], got {tuple(pixel_values.shape)}; "
                "set in_channels in the model config or DatasetConfig.channels in the data config"
            )
        h, w = pixel_values.shape[-2:]
        if h % multiple or w % multiple:
            raise ValueError(f"{self.config.arch} needs H and W divisible by {multiple}, got {h}x{w}")

    def _encode_text(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pooled, tokens, mask)`` from the text tower; a missing mask means no padding."""
        if input_ids is None or self.text is None:
            raise ValueError(f"{self.config.arch} is text-conditioned: pass input_ids (see model.tokenize)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pooled, tokens = self.text(input_ids, attention_mask)
        return pooled, tokens, attention_mask.bool()

    def _tower_for(self, name: str) -> nn.Module | None:
        """The module built for the config's tower field ``name`` (None when it has none)."""
        return getattr(self, name, None)

    def portable_config(self) -> Any:
        """This config with every tower described by its full HF config (``source=None``).

        Rebuilding from it needs none of the original pretrained files, only this model's
        state dict (a bundle should also save the tokenizer and point ``text.tokenizer`` at it).
        """
        overrides: dict[str, Any] = {}
        for name in self.config._towers:
            tower, cfg = self._tower_for(name), getattr(self.config, name)
            if tower is None or cfg is None:
                continue
            extra = {"tokenizer": tokenizer_source(cfg), "pooling": tower.pooling} if name == "text" else {}
            overrides[name] = TowerConfig(cfg.kind, None, tower.hf_config_dict(), **extra)
        return self.config.replace(**overrides)


def _film(cond_dim: int, channels: int) -> nn.Module:
    """Pooled condition -> per-channel (scale, shift); LayerNorm keeps pretrained embeddings' scale tame."""
    return nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, 2 * channels))


def _apply_film(x: torch.Tensor, film: nn.Module, cond: torch.Tensor) -> torch.Tensor:
    gamma, beta = film(cond)[:, :, None, None].chunk(2, dim=1)
    return x * (1 + gamma) + beta


# ---------------------------------------------------------------------------------------------
# MONAI U-Net / Attention U-Net / SwinUNETR
# ---------------------------------------------------------------------------------------------


class MonaiSegmenter(SegmentationModel):
    """A MONAI 2D network behind the shared call; image-only, so text arguments are ignored.

    The networks normalise internally (instance/batch norm), so [0, 1] pixels go in unchanged.
    """

    def __init__(self, config: MonaiSegConfig) -> None:
        super().__init__()
        from monai.networks.nets import AttentionUnet, SwinUNETR, UNet

        self.config = config
        self.text = None
        c = config
        strides = [2] * (len(c.channels) - 1)
        self.to_logits: nn.Module = nn.Identity()
        if c.arch == "unet":
            # MONAI's UNet with residual units ends in norm + PReLU + residual on the output
            # channel itself: a normalised logit map whose level cannot move, so BCE stalls
            # (0.44 after 60 steps on toy disks vs 0.004 with this head). It emits channels[0]
            # features instead and a plain 1x1 convolution makes the logits.
            self.net: nn.Module = UNet(
                spatial_dims=2, in_channels=c.in_channels, out_channels=c.channels[0], channels=c.channels,
                strides=strides, num_res_units=c.num_res_units, dropout=c.dropout,
            )  # fmt: skip
            self.to_logits = nn.Conv2d(c.channels[0], c.num_classes, 1)
        elif c.arch == "attention_unet":
            self.net = AttentionUnet(
                spatial_dims=2, in_channels=c.in_channels, out_channels=c.num_classes, channels=c.channels,
                strides=strides, dropout=c.dropout,
            )  # fmt: skip
        else:  # MONAI >= 1.5 dropped img_size; 2D is supported through spatial_dims=2
            # MONAI imports einops lazily and would only fail inside the first forward pass.
            from monai.utils import optional_import

            if not optional_import("einops")[1]:
                raise ImportError("swin_unetr needs the einops package (MONAI's optional dependency)")
            self.net = SwinUNETR(
                in_channels=c.in_channels, out_channels=c.num_classes, feature_size=c.feature_size,
                depths=c.depths, num_heads=c.num_heads, drop_rate=c.dropout, spatial_dims=2,
            )  # fmt: skip

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        self._check_pixels(pixel_values, self.config.size_multiple)
        return {"logits": self.to_logits(self.net(pixel_values)), "side_logits": []}


# ---------------------------------------------------------------------------------------------
# Shared by the tower-based models: normalisation inside the model, the tower, frozen or not
# ---------------------------------------------------------------------------------------------


class _TowerSegmenter(SegmentationModel):
    """A segmenter on ``config.vision``: builds the tower, normalises pixels the tower's way.

    Pixel statistics live in the model (non-persistent buffers from ``config.image_stats()``),
    so a bundle, the Predictor and the ONNX graph all normalise alike.
    """

    vision: ImageTower

    def _build_tower(self, config: Any) -> None:
        self.vision = build_vision_tower(config.vision, config.in_channels, config.image_size)
        mean, std = config.image_stats()
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def _normalise(self, pixel_values: torch.Tensor) -> torch.Tensor:
        mean, std = self.pixel_mean.to(pixel_values.dtype), self.pixel_std.to(pixel_values.dtype)
        return (pixel_values - mean) / std

    @property
    def fixed_input_size(self) -> bool:
        """A CLIP/ViT tower's position table fits only its built size; CNN towers take any multiple."""
        return isinstance(self.vision, VisionTower)


# ---------------------------------------------------------------------------------------------
# U-Net on an image tower
# ---------------------------------------------------------------------------------------------


class TowerUNet(_TowerSegmenter):
    """Encoder = any image tower (skips at every stride), decoder = ``UNetDecoder``.

    The smp-style U-Net with a pretrained encoder: EfficientNet-Lite0's ImageNet weights load
    offline, so the encoder starts from features that already separate edges, textures and
    objects, which the from-scratch MONAI ``unet`` has to learn from a few hundred images.
    """

    def __init__(self, config: TowerUNetConfig) -> None:
        super().__init__()
        self.config = config
        self.text = None
        self._build_tower(config)
        self.encoder = FeaturePyramid(self.vision, config.in_channels, config.stem_width)
        self.decoder = UNetDecoder(
            self.encoder.widths, config.decoder_channels, config.num_classes, config.foreground_prior
        )
        if config.freeze_vision:
            self._freeze(self.vision)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        self._check_pixels(pixel_values, self.encoder.size_multiple)
        logits = self.decoder(self.encoder(self._normalise(pixel_values)))
        return {"logits": upsample_to(logits, pixel_values.shape[-2:]), "side_logits": []}


# ---------------------------------------------------------------------------------------------
# CLIP-feature decoder (CLIPSeg / NextGen-UIA)
# ---------------------------------------------------------------------------------------------

MIN_TAP_STRIDE = 8  # CNN maps finer than this are edges and textures, not what the tokens carry
SKIP_STRIDE = 4  # the high-resolution skip and the logits' resolution


class ClipDecoder(_TowerSegmenter):
    """Deep tower features as tokens -> progressive sum -> normalised conv decoder with a skip.

    As in CLIPSeg, the deepest tapped map enters first and each shallower one is added to the
    running activation after a residual mixing block (LayerNorm + MLP on each position's
    token), so the decoder sees semantics first. Taps: a transformer's patch-grid layers, or a
    CNN's maps at stride >= 8 resampled to the finest of them. Text (when configured) scales
    and shifts the activation once (FiLM). The spatial decoder is normalised (GroupNorm after
    every convolution), upsamples to stride 4, merges a high-resolution skip computed from the
    image by two strided convolutions (so every tower has one), and predicts there; logits are
    upsampled to the input. The head's bias starts at the logit of ``foreground_prior``.

    An earlier version had no normalisation, no skip and a zero bias: on BUSI it collapsed to
    empty masks (3% Dice). Bundles of that version do not load into this one.
    """

    def __init__(self, config: ClipDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self._build_tower(config)
        if config.extract_layers is not None:
            if not isinstance(self.vision, VisionTower):
                raise ValueError(
                    "extract_layers taps transformer layers; this tower is not a CLIP/ViT (leave it None)"
                )
            num_layers = self.vision.model.config.num_hidden_layers
            if not all(1 <= i <= num_layers for i in config.extract_layers):
                raise ValueError(
                    f"extract_layers {config.extract_layers} outside the tower's 1..{num_layers} layers"
                )
            channels = [self.vision.hidden_size] * len(config.extract_layers)
            strides = [self.vision.size_multiple] * len(config.extract_layers)
        else:
            channels, strides = list(self.vision.feature_channels), list(self.vision.feature_strides)
        self.taps = [i for i, s in enumerate(strides) if s >= MIN_TAP_STRIDE] or [len(strides) - 1]
        self.grid_stride = min(strides[i] for i in self.taps)

        dim = config.decoder_dim
        self.reduce = nn.ModuleList(  # deepest first, in the order they are added
            nn.Sequential(nn.LayerNorm(channels[i]), nn.Linear(channels[i], dim)) for i in reversed(self.taps)
        )
        self.mix = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in self.taps[1:]
        )
        self.text = build_text_tower(config.text) if config.text is not None else None
        self.film = _film(self.text.hidden_size, dim) if self.text is not None else None

        ups = max(0, round(math.log2(self.grid_stride / SKIP_STRIDE)))
        self.decoder = nn.Sequential(conv_norm_act(dim, dim), *(conv_norm_act(dim, dim) for _ in range(ups)))
        self.skip = nn.Sequential(
            conv_norm_act(config.in_channels, config.skip_dim, stride=2),
            conv_norm_act(config.skip_dim, config.skip_dim, stride=2),
        )
        self.fuse = conv_norm_act(dim + config.skip_dim, dim)
        self.head = prior_logits_head(dim, config.num_classes, config.foreground_prior)
        if config.freeze_vision:
            self._freeze(self.vision)
        if self.text is not None and config.freeze_text:
            self._freeze(self.text)

    @property
    def size_multiple(self) -> int:
        return math.lcm(int(self.vision.size_multiple), SKIP_STRIDE)

    @classmethod
    def from_dual_encoder(cls, encoder: nn.Module, **overrides: Any) -> ClipDecoder:
        """A decoder on a trained dual encoder's vision tower (weights copied, preprocessing kept).

        Adapters are not carried over: merge or drop them in the encoder first, otherwise the
        strict state-dict load below fails rather than silently dropping adapted weights.
        """
        portable = encoder.portable_config()
        mean, std = portable.image_stats()
        config = ClipDecoderConfig(
            vision=portable.vision,
            in_channels=portable.in_channels,
            image_size=portable.image_size,
            image_mean=mean,
            image_std=std,
        ).replace(**overrides)
        model = cls(config)
        model.vision.load_state_dict(encoder.vision.state_dict(), strict=True)
        return model

    def _tapped_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tapped maps, shallowest first, each ``[B, C, h, w]``."""
        if self.config.extract_layers is None:
            maps = self.vision.feature_maps(x)
            return [maps[i] for i in self.taps]
        grid = (x.shape[-2] // self.vision.size_multiple, x.shape[-1] // self.vision.size_multiple)
        with tower_call(self.vision, grid=grid):  # adapters on the tower read the grid
            hidden = self.vision.model(pixel_values=x, output_hidden_states=True).hidden_states
        return [
            hidden[i][:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid)
            for i in self.config.extract_layers
        ]

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        self._check_pixels(pixel_values, self.size_multiple)
        x = self._normalise(pixel_values)
        h, w = x.shape[-2:]
        grid = (math.ceil(h / self.grid_stride), math.ceil(w / self.grid_stride))
        maps = [
            m
            if tuple(m.shape[-2:]) == grid
            else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in reversed(self._tapped_maps(x))  # deepest first
        ]
        tokens = [m.flatten(2).transpose(1, 2) for m in maps]  # [B, h*w, C]
        a = self.reduce[0](tokens[0])
        for reduce, mix, t in zip(self.reduce[1:], self.mix, tokens[1:], strict=True):
            a = a + mix(a)
            a = a + reduce(t)
        a = a.transpose(1, 2).reshape(a.shape[0], -1, *grid)  # [B, D, h/g, w/g]
        if self.film is not None:
            pooled, _, _ = self._encode_text(input_ids, attention_mask)
            a = _apply_film(a, self.film, pooled)

        skip = self.skip(x)
        a = self.decoder[0](a)
        for layer in self.decoder[1:]:  # x2 per layer, the last one exactly to the skip's size
            size = (min(2 * a.shape[-2], skip.shape[-2]), min(2 * a.shape[-1], skip.shape[-1]))
            a = layer(F.interpolate(a, size=size, mode="bilinear", align_corners=False))
        a = upsample_to(a, skip.shape[-2:])
        logits = self.head(self.fuse(torch.cat([a, skip], dim=1)))
        return {"logits": upsample_to(logits, (h, w)), "side_logits": []}


# ---------------------------------------------------------------------------------------------
# Registered architectures: configs are data; the entry function only applies overrides.
# ---------------------------------------------------------------------------------------------

# A small CLIP ViT that trains on a CPU; pass vision={"source": "openai/clip-vit-base-patch16"}
# (or use ClipDecoder.from_dual_encoder) for pretrained features.
_CLIP_SMALL = TowerConfig(
    "clip_vision",
    config={
        "hidden_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "patch_size": 16,
    },
)


@register_model
def unet(**overrides: Any) -> MonaiSegmenter:
    """MONAI 2D residual U-Net, channels 32..512 (inputs divisible by 16)."""
    return MonaiSegmenter(MonaiSegConfig(arch="unet").replace(**overrides))


@register_model
def attention_unet(**overrides: Any) -> MonaiSegmenter:
    """MONAI 2D Attention U-Net (gated skips), channels 32..512."""
    return MonaiSegmenter(MonaiSegConfig(arch="attention_unet").replace(**overrides))


@register_model
def swin_unetr(**overrides: Any) -> MonaiSegmenter:
    """MONAI SwinUNETR in 2D (``spatial_dims=2``), feature size 24; inputs divisible by 32; needs einops."""
    return MonaiSegmenter(MonaiSegConfig(arch="swin_unetr").replace(**overrides))


@register_model
def unet_pretrained(**overrides: Any) -> TowerUNet:
    """U-Net on an image tower: ImageNet EfficientNet-Lite0 (offline) by default, any ``vision`` tower."""
    return TowerUNet(TowerUNetConfig().replace(**overrides))


@register_model
def clip_decoder(**overrides: Any) -> ClipDecoder:
    """CLIPSeg-style decoder on a small random CLIP ViT (``vision={"source": "efficientnet-lite0"}``
    for pretrained features offline); ``text=TowerConfig(...)`` adds FiLM prompting."""
    return ClipDecoder(ClipDecoderConfig(vision=_CLIP_SMALL).replace(**overrides))


for _arch in MONAI_ARCHS:
    register_segmentation_arch(_arch, MonaiSegConfig, MonaiSegmenter)
register_segmentation_arch("unet_pretrained", TowerUNetConfig, TowerUNet)
register_segmentation_arch("clip_decoder", ClipDecoderConfig, ClipDecoder)
