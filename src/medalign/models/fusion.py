"""Fusion of co-registered imaging modalities (and text), with missing modalities (Stage III).

Reading order: the configs (plain data), the building blocks (a small conv U-Net encoder and
decoder, presence-masked means, modality dropout), ``FusionModel`` (what every fuser shares:
inputs, presence, heads), the four architectures and the registered entries at the bottom.

* ``fuse_adf`` — MM-EndoCL's align-disentangle-fuse: one conv encoder per modality (or one
  shared encoder) gives multi-scale features; at the ``adf_scales`` every modality's map is
  split by 1x1 heads into a *shared* part (one head for all modalities: a common space) and a
  *specific* part (a head per modality). The fused map at such a scale is a 1x1 conv over
  [mean of the present modalities' shared parts, every modality's specific part (zeros when
  absent)]; at the other scales it is the mean of the present modalities' features. A U-Net
  decoder takes the fused bottleneck and the fused skips. The losses of the ``fuse`` task
  (multi-scale MMD, similarity, dissimilarity, orthogonality, disentangled contrastive) read
  ``features``.
* ``fuse_moe`` — HiCur-NPC Stage III: the deepest map of every modality becomes tokens
  (+ position and modality embeddings) that attend, through
  :class:`medalign.models.moe.MoECrossAttention`, to the report's tokens (optional text tower,
  frozen MiniLM by default; ``text: null`` for none), to the other modalities' tokens and to a
  learned null token (so a query can always abstain). Padding and absent modalities are masked
  out of the context and absent modalities' queries are never routed. The fused tokens (mean over
  present modalities) go through the U-Net decoder with fused skips; ``balance_loss`` is the
  mean Switch load-balancing loss of every MoE call.
* ``fuse_early`` — the modalities stacked as channels into one U-Net (absent = zeros).
* ``fuse_late`` — one U-Net per modality (or one shared), logits averaged over present modalities.

Encoders: by default a small conv U-Net encoder per modality (``base_width``, ``depth``).
With ``vision`` set (e.g. ``{"source": "efficientnet-lite0"}``: ImageNet weights, offline) every
modality's encoder is that image tower instead (``TowerEncoder``: the tower's skips at every
stride, pixels normalised the way its weights expect) and the decoder is the
``medalign.models.pyramid.UNetDecoder`` of ``decoder_channels``; fusion itself is unchanged,
scale by scale. ``fuse_early`` with a pretrained tower and three 1-channel modalities feeds them
to the RGB stem as they are.

Every fusion model has the same call, so one task, evaluation and bundle format serve them all:

    forward(pixel_values: dict[modality name, Tensor [B, C, H, W] in [0, 1]],
            present: Tensor [B, M] bool | None = None,     # M = len(config.modalities), config order
            input_ids=None, attention_mask=None,           # fuse_moe with a text tower
            text_present: Tensor [B] bool | None = None)   # False = no report for that case
        -> {"logits": [B, K, H, W] ("segment") or [B, K] ("classify"),
            "side_logits": [],
            "present": [B, M] bool  (the presence actually used: after modality dropout),
            "features": {...},     # see each architecture; lists are in config.modalities order
            "balance_loss": scalar tensor (fuse_moe only)}

A modality whose key is missing from ``pixel_values`` is absent for every case; ``present``
marks absent modalities per case. Absent inputs are replaced by zeros before any layer sees
them and masked out of every fusion, so the pixels of an absent modality never change the
output: inference works on any subset of modalities with no code change. In training mode
``modality_dropout`` drops each present modality of a case with that probability (torch's RNG,
so seeded runs repeat), never all modalities of a case. ``config.in_channels`` counts the
channels of *all* modalities together (the stacked convention of the data pipeline); each
modality has ``in_channels // len(modalities)``.
"""

# Why one module: the fusion family (align-disentangle-fuse, MoE cross-attention, modality dropout)
# shares one config and one forward skeleton.

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medalign.models.moe import MoECrossAttention
from medalign.models.pyramid import (
    DECODER_CHANNELS,
    ConvBlock,
    FeaturePyramid,
    UNetDecoder,
    tower_image_stats,
    upsample_to,
)
from medalign.models.registry import register_model
from medalign.models.segmentation import SegmentationModel, _SegConfig
from medalign.models.towers import MINILM_TEXT, TowerConfig, build_text_tower, build_vision_tower

FUSION_MODELS = ("fuse_adf", "fuse_moe", "fuse_early", "fuse_late")  # the registered names
TASK_HEADS = ("segment", "classify")


# ---------------------------------------------------------------------------------------------
# Configs: everything that defines a model, as JSON-safe data (what a bundle stores)
# ---------------------------------------------------------------------------------------------


@dataclass
class FusionConfig(_SegConfig):
    """Fields every fusion model has; ``fuse_early`` and ``fuse_late`` need nothing else."""

    arch: str = "fuse_early"
    modalities: list[str] = field(default_factory=lambda: ["a", "b"])
    in_channels: int = 2  # all modalities together; each has in_channels // len(modalities)
    image_size: int = 128
    task_head: Literal["segment", "classify"] = "segment"
    shared_encoder: bool = False  # one encoder (same weights) for every modality
    base_width: int = 16  # conv encoder widths base * (1, 2, 4, ..., 2**depth)
    depth: int = 4  # number of 2x downsamplings of the conv encoder
    modality_dropout: float = 0.0  # training only; never drops every modality of a case
    vision: TowerConfig | None = None  # set: each modality's encoder is this image tower
    decoder_channels: list[int] = field(default_factory=lambda: list(DECODER_CHANNELS))  # with vision
    freeze_vision: bool = False

    _towers: ClassVar[tuple[str, ...]] = ("vision",)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.modalities = [str(m) for m in self.modalities]
        if self.arch not in FUSION_MODELS:
            raise ValueError(f"arch must be one of {FUSION_MODELS}, got {self.arch!r}")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be distinct names, got {self.modalities}")
        if self.in_channels % len(self.modalities):
            raise ValueError(
                f"in_channels={self.in_channels} (all modalities together) is not divisible by "
                f"{len(self.modalities)} modalities"
            )
        if self.task_head not in TASK_HEADS:
            raise ValueError(f"task_head must be one of {TASK_HEADS}, got {self.task_head!r}")
        if self.task_head == "classify" and self.num_classes < 2:
            raise ValueError("task_head 'classify' needs num_classes >= 2 (softmax over classes)")
        if self.depth < 1 or self.base_width < 1:
            raise ValueError(f"depth and base_width must be >= 1, got {self.depth}, {self.base_width}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if self.vision is None and self.image_size % 2**self.depth:
            raise ValueError(f"image_size must be divisible by 2**depth = {2**self.depth}")
        self.decoder_channels = [int(c) for c in self.decoder_channels]

    @property
    def channels_per_modality(self) -> int:
        return self.in_channels // len(self.modalities)

    @property
    def widths(self) -> list[int]:
        """The conv encoder's widths (a ``vision`` tower's come from the tower: ``model.widths``)."""
        return [self.base_width * 2**i for i in range(self.depth + 1)]


@dataclass
class AdfFusionConfig(FusionConfig):
    """Align-disentangle-fuse (MM-EndoCL)."""

    arch: str = "fuse_adf"
    # encoder scales split into shared/specific parts (0 = input size, depth = bottleneck);
    # None = the two deepest
    adf_scales: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adf_scales is not None:
            self.adf_scales = sorted({int(s) for s in self.adf_scales})
        if self.vision is None:  # a tower's number of scales is known once it is built
            self.split_scales(self.depth)

    def split_scales(self, depth: int) -> list[int]:
        """The scales split into shared/specific parts, for an encoder whose deepest scale is ``depth``."""
        scales = sorted({max(depth - 1, 0), depth}) if self.adf_scales is None else list(self.adf_scales)
        if not scales or any(not 0 <= s <= depth for s in scales):
            raise ValueError(f"adf_scales must be non-empty and lie in [0, {depth}], got {scales}")
        return scales


@dataclass
class MoeFusionConfig(FusionConfig):
    """MoE cross-attention over image tokens of every modality and report tokens (HiCur-NPC Stage III)."""

    arch: str = "fuse_moe"
    text: TowerConfig | None = field(default_factory=lambda: MINILM_TEXT.replace())
    freeze_text: bool = True
    max_text_length: int = 64
    token_dim: int = 128
    num_heads: int = 4
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.25  # training
    eval_capacity_factor: float | None = None  # None = never drop at inference (batch-independent)
    hidden_ratio: float = 2.0
    moe_layers: int = 1
    text_dropout: float = 0.0  # training: hide the report of a case with this probability

    _towers: ClassVar[tuple[str, ...]] = ("vision", "text")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.token_dim % self.num_heads:
            raise ValueError(f"token_dim {self.token_dim} is not divisible by num_heads {self.num_heads}")
        if self.moe_layers < 1:
            raise ValueError(f"moe_layers must be >= 1, got {self.moe_layers}")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"text_dropout must be in [0, 1], got {self.text_dropout}")


CONFIG_CLASSES: dict[str, type[FusionConfig]] = {
    "fuse_adf": AdfFusionConfig,
    "fuse_moe": MoeFusionConfig,
    "fuse_early": FusionConfig,
    "fuse_late": FusionConfig,
}


def fusion_config_from_dict(data: dict[str, Any]) -> FusionConfig:
    """The config class named by ``data["arch"]``, so a saved dict alone rebuilds its model."""
    arch = data.get("arch")
    if arch not in CONFIG_CLASSES:
        raise ValueError(f"unknown fusion arch {arch!r}; choose from {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[arch].from_dict(data)


def build_fusion_model(config: FusionConfig | dict[str, Any]) -> FusionModel:
    """Model of a config (or its dict): the inverse of ``model.config.to_dict()``."""
    if isinstance(config, dict):
        config = fusion_config_from_dict(config)
    classes: dict[str, type[FusionModel]] = {
        "fuse_adf": AdfFusion,
        "fuse_moe": MoeFusion,
        "fuse_early": EarlyFusion,
        "fuse_late": LateFusion,
    }
    return classes[config.arch](config)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Conv U-Net encoder: features at every scale, ``[f_0 (H), f_1 (H/2), ..., f_depth]``."""

    def __init__(self, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        self.widths = list(widths)
        self.size_multiple = 2 ** (len(widths) - 1)
        self.stem = ConvBlock(in_channels, widths[0])
        self.down = nn.ModuleList(ConvBlock(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = [self.stem(x)]
        for down in self.down:
            features.append(down(F.max_pool2d(features[-1], 2)))
        return features


class TowerEncoder(nn.Module):
    """An image tower as a fusion encoder: [0, 1] pixels -> normalised -> maps finest first.

    Same contract as ``Encoder`` (``widths``, ``size_multiple``, a list of maps, each scale
    half the previous for a CNN tower), so every fusion works on it unchanged.
    """

    def __init__(self, vision: TowerConfig, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.tower = build_vision_tower(vision, in_channels, image_size)
        self.pyramid = FeaturePyramid(self.tower, in_channels)
        mean, std = tower_image_stats(vision, in_channels)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.widths = self.pyramid.widths
        self.size_multiple = self.pyramid.size_multiple

    def forward(self, x: Tensor) -> list[Tensor]:
        mean, std = self.pixel_mean.to(x.dtype), self.pixel_std.to(x.dtype)
        return self.pyramid((x - mean) / std)


class Decoder(nn.Module):
    """U-Net decoder from ``features[-1]`` with skips ``features[:-1]`` to ``num_classes`` logits."""

    def __init__(self, widths: list[int], num_classes: int) -> None:
        super().__init__()
        stages = list(reversed(list(itertools.pairwise(widths))))  # (cout, cin), coarsest first
        self.up = nn.ModuleList(nn.ConvTranspose2d(cin, cout, 2, stride=2) for cout, cin in stages)
        self.merge = nn.ModuleList(ConvBlock(2 * cout, cout) for cout, _ in stages)
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for up, merge, skip in zip(self.up, self.merge, reversed(features[:-1]), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def masked_mean(stack: Tensor, present: Tensor) -> Tensor:
    """Mean over the modality dim 0 of ``stack [M, B, ...]`` counting only ``present [B, M]``.

    Absent entries are selected away (``where``), not multiplied by zero, so even NaN pixels of
    an absent modality cannot leak in; a case with no present modality gets zeros.
    """
    keep = present.T.reshape(*present.T.shape, *([1] * (stack.ndim - 2)))
    total = torch.where(keep, stack, torch.zeros((), dtype=stack.dtype, device=stack.device)).sum(0)
    return total / keep.sum(0).clamp(min=1).to(stack.dtype)


def modality_dropout(present: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Drop each present modality of a case with probability ``p``, never all of a case's.

    A case whose draw dropped every present modality keeps one of them, chosen uniformly.
    Draws come from torch's RNG (or ``generator``), so a seeded run repeats its masks.
    """
    if p <= 0:
        return present
    draws = torch.rand(present.shape, device=present.device, generator=generator)
    kept = present & (draws >= p)
    emptied = present.any(dim=1) & ~kept.any(dim=1)
    if emptied.any():
        choice = torch.rand(present.shape, device=present.device, generator=generator)
        choice = choice.masked_fill(~present, -1.0).argmax(dim=1)
        rescue = F.one_hot(choice, present.shape[1]).bool() & emptied[:, None]
        kept = kept | rescue
    return kept


def _pool(x: Tensor) -> Tensor:
    return x.mean(dim=(-2, -1))


# ---------------------------------------------------------------------------------------------
# What every fusion model shares
# ---------------------------------------------------------------------------------------------


class FusionModel(SegmentationModel):
    """Base class: the dict-of-modalities input, presence, modality dropout and the heads.

    Subclasses build their layers, then implement ``_fuse(images, present, ...)`` returning
    ``(logits, features, extra outputs)``. ``text`` is None unless the model reads reports.
    """

    bundle_kind = "fusion"

    config: FusionConfig

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.text = None

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modalities)

    @property
    def task_head(self) -> str:
        return self.config.task_head

    def _encoder(self, in_channels: int) -> Encoder | TowerEncoder:
        """The conv encoder, or the ``vision`` tower (frozen when the config says so).

        The first one built sets ``self.widths`` / ``self.depth`` (deepest scale index), which
        the fusion layers and the decoder are sized from.
        """
        c = self.config
        encoder: Encoder | TowerEncoder
        if c.vision is None:
            encoder = Encoder(in_channels, c.widths)
        else:
            encoder = TowerEncoder(c.vision, in_channels, c.image_size)
            if c.freeze_vision:
                self._freeze(encoder.tower)
        self.widths, self.depth = list(encoder.widths), len(encoder.widths) - 1
        self.size_multiple = encoder.size_multiple
        return encoder

    def _encoders(self) -> nn.ModuleList:
        """One encoder per modality, or a single shared one."""
        c = self.config
        count = 1 if c.shared_encoder else len(c.modalities)
        return nn.ModuleList(self._encoder(c.channels_per_modality) for _ in range(count))

    def _decoder(self) -> nn.Module:
        c = self.config
        if c.vision is None:
            return Decoder(self.widths, c.num_classes)
        return UNetDecoder(self.widths, c.decoder_channels, c.num_classes, foreground_prior=None)

    def _tower_for(self, name: str) -> nn.Module | None:
        """A tower's architecture for ``portable_config``: every modality's encoder has the same one."""
        if name != "vision":
            return super()._tower_for(name)
        encoder = getattr(self, "encoder", None) or next(iter(getattr(self, "encoders", [])), None)
        return getattr(encoder, "tower", None)

    def _encode_all(self, images: list[Tensor]) -> list[list[Tensor]]:
        """Features ``[modality][scale]``; a shared encoder runs once on the stacked batch."""
        if len(self.encoders) == 1 and len(images) > 1:
            stacked = self.encoders[0](torch.cat(images))
            chunks = [f.chunk(len(images)) for f in stacked]
            return [[chunk[m] for chunk in chunks] for m in range(len(images))]
        return [enc(img) for enc, img in zip(self.encoders, images, strict=True)]

    def _inputs(self, pixel_values: dict[str, Tensor], present: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """Images in config order with absent ones zeroed, and the [B, M] presence mask."""
        if not isinstance(pixel_values, dict):
            raise TypeError(
                "fusion models take pixel_values as a dict {modality: [B, C, H, W]}, "
                f"with modalities {self.modalities}; got {type(pixel_values).__name__}"
            )
        unknown = sorted(set(pixel_values) - set(self.modalities))
        if unknown or not pixel_values:
            raise ValueError(f"pixel_values keys {sorted(pixel_values)}: expected some of {self.modalities}")
        reference = next(iter(pixel_values.values()))
        c, multiple = self.config.channels_per_modality, self.size_multiple
        for name, x in pixel_values.items():
            if (
                x.ndim != 4
                or x.shape[1] != c
                or x.shape[0] != reference.shape[0]
                or x.shape[2:] != reference.shape[2:]
            ):
                raise ValueError(
                    f"modality {name!r}: expected [B, {c}, H, W] like the others, got {tuple(x.shape)}"
                )
        b, h, w = reference.shape[0], *reference.shape[-2:]
        if h % multiple or w % multiple:
            raise ValueError(f"{self.config.arch} needs H and W divisible by {multiple}, got {h}x{w}")
        given = torch.tensor([m in pixel_values for m in self.modalities], device=reference.device)
        if present is None:
            present = given.expand(b, -1)
        if present.shape != (b, len(self.modalities)):
            raise ValueError(
                f"present must be [B, M] = [{b}, {len(self.modalities)}], got {tuple(present.shape)}"
            )
        present = present.to(reference.device).bool() & given
        if self.training and self.config.modality_dropout > 0:
            present = modality_dropout(present, self.config.modality_dropout)
        zero = torch.zeros((), dtype=reference.dtype, device=reference.device)
        images = [
            torch.where(present[:, i, None, None, None], pixel_values[m], zero)
            if m in pixel_values
            else torch.zeros_like(reference)
            for i, m in enumerate(self.modalities)
        ]
        return images, present

    def forward(
        self,
        pixel_values: dict[str, Tensor],
        present: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        text_present: Tensor | None = None,
    ) -> dict[str, Any]:
        images, present = self._inputs(pixel_values, present)
        logits, features, extra = self._fuse(images, present, input_ids, attention_mask, text_present)
        return {"logits": logits, "side_logits": [], "present": present, "features": features, **extra}

    def _fuse(
        self,
        images: list[Tensor],
        present: Tensor,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        text_present: Tensor | None,
    ) -> tuple[Tensor, dict[str, Any], dict[str, Any]]:
        raise NotImplementedError

    def _head(self, fused: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Segmentation: decode the fused pyramid, logits at the input's ``size`` (a tower's finest
        map is coarser than the input); classification: pooled bottleneck -> classes."""
        if self.task_head == "segment":
            return upsample_to(self.decoder(fused), size)
        return self.classifier(_pool(fused[-1]))

    def _classifier(self) -> nn.Module:
        return nn.Sequential(nn.LayerNorm(self.widths[-1]), nn.Linear(self.widths[-1], self.config.num_classes))

    def _build_head(self) -> None:
        if self.config.task_head == "segment":
            self.decoder = self._decoder()
        else:
            self.classifier = self._classifier()


# ---------------------------------------------------------------------------------------------
# Align - disentangle - fuse (MM-EndoCL)
# ---------------------------------------------------------------------------------------------


class AdfFusion(FusionModel):
    """Per-modality encoders; shared/specific split and fusion at ``adf_scales``; fused U-Net decoder.

    ``features``: ``multiscale`` [modality][scale] GAP-pooled encoder features [B, C_s] (for the
    multi-scale MMD), ``shared`` / ``specific`` per modality [B, D] (GAP of the split maps at
    every ADF scale, concatenated; for similarity, dissimilarity, orthogonality and the
    disentangled contrastive loss).
    """

    config: AdfFusionConfig

    def __init__(self, config: AdfFusionConfig) -> None:
        super().__init__(config)
        m = len(config.modalities)
        self.encoders = self._encoders()
        widths, scales = self.widths, config.split_scales(self.depth)
        half = {s: max(1, widths[s] // 2) for s in scales}  # width of each part
        self.shared_heads = nn.ModuleDict({str(s): nn.Conv2d(widths[s], half[s], 1) for s in scales})
        self.specific_heads = nn.ModuleDict(
            {str(s): nn.ModuleList(nn.Conv2d(widths[s], half[s], 1) for _ in range(m)) for s in scales}
        )
        self.fuse_convs = nn.ModuleDict(
            {str(s): nn.Sequential(nn.Conv2d((1 + m) * half[s], widths[s], 1), nn.GELU()) for s in scales}
        )
        self._build_head()

    def _fuse(self, images, present, input_ids, attention_mask, text_present):  # type: ignore[override]
        per_modality = self._encode_all(images)
        fused: list[Tensor] = []
        shared_vectors: list[list[Tensor]] = [[] for _ in images]
        specific_vectors: list[list[Tensor]] = [[] for _ in images]
        for s in range(self.depth + 1):
            maps = [features[s] for features in per_modality]
            if str(s) not in self.shared_heads:
                fused.append(masked_mean(torch.stack(maps), present))
                continue
            shared = [self.shared_heads[str(s)](x) for x in maps]
            specific = [head(x) for head, x in zip(self.specific_heads[str(s)], maps, strict=True)]
            for i in range(len(maps)):
                shared_vectors[i].append(_pool(shared[i]))
                specific_vectors[i].append(_pool(specific[i]))
            zero = torch.zeros((), dtype=maps[0].dtype, device=maps[0].device)
            kept = [torch.where(present[:, i, None, None, None], p, zero) for i, p in enumerate(specific)]
            stacked = torch.cat([masked_mean(torch.stack(shared), present), *kept], dim=1)
            fused.append(self.fuse_convs[str(s)](stacked))
        features = {
            "multiscale": [[_pool(f) for f in features] for features in per_modality],
            "shared": [torch.cat(v, dim=1) for v in shared_vectors],
            "specific": [torch.cat(v, dim=1) for v in specific_vectors],
        }
        return self._head(fused, images[0].shape[-2:]), features, {}


# ---------------------------------------------------------------------------------------------
# MoE cross-attention fusion (HiCur-NPC Stage III)
# ---------------------------------------------------------------------------------------------


class MoeFusion(FusionModel):
    """Deepest-scale tokens of each modality attend to text and the other modalities (MoE blocks).

    ``features``: ``multiscale`` as in ``fuse_adf`` and ``tokens`` [B, M, L, D] after fusion.
    ``balance_loss``: the mean load-balancing loss over MoE calls (add it to the task loss).
    """

    config: MoeFusionConfig

    def __init__(self, config: MoeFusionConfig) -> None:
        super().__init__(config)
        c, m = config, len(config.modalities)
        self.encoders = self._encoders()
        grid = c.image_size // 2**self.depth if c.vision is None else c.image_size // self.size_multiple
        self.to_tokens = nn.Linear(self.widths[-1], c.token_dim)
        self.position = nn.Parameter(torch.randn(1, c.token_dim, grid, grid) * 0.02)
        self.modality_embed = nn.Parameter(torch.randn(m, c.token_dim) * 0.02)
        self.null_token = nn.Parameter(torch.zeros(1, 1, c.token_dim))
        self.blocks = nn.ModuleList(
            MoECrossAttention(
                c.token_dim,
                num_heads=c.num_heads,
                num_experts=c.num_experts,
                k=c.top_k,
                capacity_factor=c.capacity_factor,
                hidden_ratio=c.hidden_ratio,
                # E / k slots per expert never drop a token (math.inf would too, but not with zero tokens)
                eval_capacity_factor=c.eval_capacity_factor or c.num_experts / c.top_k,
            )
            for _ in range(c.moe_layers)
        )
        self.from_tokens = nn.Sequential(nn.LayerNorm(c.token_dim), nn.Linear(c.token_dim, self.widths[-1]))
        self.text = build_text_tower(c.text) if c.text is not None else None
        self.text_proj = (
            nn.Sequential(nn.Linear(self.text.hidden_size, c.token_dim), nn.LayerNorm(c.token_dim))
            if self.text is not None
            else None
        )
        if self.text is not None and c.freeze_text:
            self._freeze(self.text)
        self._build_head()

    def _text_context(
        self,
        batch: int,
        device: torch.device,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        text_present: Tensor | None,
    ) -> tuple[Tensor, Tensor] | None:
        if self.text is None:
            return None
        if input_ids is None:  # no report for any case: the text positions are simply absent
            return None
        _, tokens, mask = self._encode_text(input_ids, attention_mask)
        assert self.text_proj is not None
        valid = mask
        if text_present is not None:
            valid = valid & text_present.to(device).bool()[:, None]
        if self.training and self.config.text_dropout > 0:
            valid = valid & (torch.rand(batch, 1, device=device) >= self.config.text_dropout)
        return self.text_proj(tokens), valid

    def _fuse(self, images, present, input_ids, attention_mask, text_present):  # type: ignore[override]
        per_modality = self._encode_all(images)
        deepest = [features[-1] for features in per_modality]
        b, _, gh, gw = deepest[0].shape
        position = self.position
        if position.shape[-2:] != (gh, gw):
            position = F.interpolate(position, size=(gh, gw), mode="bilinear", align_corners=False)
        position = position.flatten(2).transpose(1, 2)  # [1, L, D]
        tokens = [
            self.to_tokens(x.flatten(2).transpose(1, 2)) + position + self.modality_embed[i]
            for i, x in enumerate(deepest)
        ]
        length = tokens[0].shape[1]
        query_valid = [present[:, i, None].expand(b, length) for i in range(len(tokens))]
        null = self.null_token.expand(b, 1, -1).to(tokens[0].dtype)
        always = torch.ones(b, 1, dtype=torch.bool, device=present.device)
        text = self._text_context(b, present.device, input_ids, attention_mask, text_present)

        balance: list[Tensor] = []
        for block in self.blocks:
            updated = []
            for i, queries in enumerate(tokens):
                others = [j for j in range(len(tokens)) if j != i]
                context = [null, *(tokens[j] for j in others)]
                valid = [always, *(query_valid[j] for j in others)]
                if text is not None:
                    context.append(text[0].to(queries.dtype))
                    valid.append(text[1])
                out, aux = block(queries, torch.cat(context, 1), torch.cat(valid, 1), query_valid[i])
                updated.append(out)
                balance.append(aux["balance_loss"])
            tokens = updated

        fused_tokens = masked_mean(torch.stack(tokens), present)  # [B, L, D]
        bottleneck = self.from_tokens(fused_tokens).transpose(1, 2).reshape(b, -1, gh, gw)
        skips = [
            masked_mean(torch.stack([f[s] for f in per_modality]), present) for s in range(self.depth)
        ]
        features = {
            "multiscale": [[_pool(f) for f in features] for features in per_modality],
            "tokens": torch.stack(tokens, dim=1),
        }
        logits = self._head([*skips, bottleneck], images[0].shape[-2:])
        return logits, features, {"balance_loss": torch.stack(balance).mean()}


# ---------------------------------------------------------------------------------------------
# Baselines in the same harness
# ---------------------------------------------------------------------------------------------


class EarlyFusion(FusionModel):
    """All modalities stacked as channels into one U-Net; an absent modality is zeros."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__(config)
        self.encoder = self._encoder(config.in_channels)
        self._build_head()

    def _fuse(self, images, present, input_ids, attention_mask, text_present):  # type: ignore[override]
        return self._head(self.encoder(torch.cat(images, dim=1)), images[0].shape[-2:]), {}, {}


class LateFusion(FusionModel):
    """One U-Net per modality (or one shared); logits averaged over the present modalities."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__(config)
        self.encoders = self._encoders()
        count = len(self.encoders)
        if config.task_head == "segment":
            self.decoders = nn.ModuleList(self._decoder() for _ in range(count))
        else:
            self.classifiers = nn.ModuleList(self._classifier() for _ in range(count))

    def _fuse(self, images, present, input_ids, attention_mask, text_present):  # type: ignore[override]
        per_modality = self._encode_all(images)
        heads = self.decoders if self.task_head == "segment" else self.classifiers
        logits = []
        for i, features in enumerate(per_modality):
            head = heads[i if len(heads) > 1 else 0]
            if self.task_head == "segment":
                size = images[i].shape[-2:]
                logits.append(upsample_to(head(features), size))
            else:
                logits.append(head(_pool(features[-1])))
        features = {"multiscale": [[_pool(f) for f in features] for features in per_modality]}
        return masked_mean(torch.stack(logits), present), features, {}


# ---------------------------------------------------------------------------------------------
# Registered architectures: configs are data; the entry function only applies overrides.
# ---------------------------------------------------------------------------------------------


@register_model
def fuse_adf(**overrides: Any) -> AdfFusion:
    """Align-disentangle-fuse (MM-EndoCL): per-modality encoders, shared/specific split, fused decoder."""
    return AdfFusion(AdfFusionConfig().replace(**overrides))


@register_model
def fuse_moe(**overrides: Any) -> MoeFusion:
    """MoE cross-attention over modality and report tokens (HiCur-NPC Stage III); frozen MiniLM text."""
    return MoeFusion(MoeFusionConfig().replace(**overrides))


@register_model
def fuse_early(**overrides: Any) -> EarlyFusion:
    """Early fusion baseline: modalities stacked as channels into one U-Net (absent = zeros)."""
    return EarlyFusion(FusionConfig(arch="fuse_early").replace(**overrides))


@register_model
def fuse_late(**overrides: Any) -> LateFusion:
    """Late fusion baseline: one U-Net per modality, logits averaged over present modalities."""
    return LateFusion(FusionConfig(arch="fuse_late").replace(**overrides))
