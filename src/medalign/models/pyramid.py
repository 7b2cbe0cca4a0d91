"""Any image tower as a U-Net encoder, and the decoder that reads it.

A decoder with skips at every scale needs one map per stride, finest first. Image towers give
that in two shapes (``tower.feature_maps``, see ``medalign.models.towers``):

* convolutional towers (EfficientNet-Lite, ConvNeXt, ...): maps at strides 2, 4, 8, 16, 32
  (or 4..32), used as they are;
* transformer towers (CLIP/ViT, DINOv2, SigLIP): several layers, all at the patch stride
  ``p``. ``FeaturePyramid`` turns them into a simple pyramid (ViTDet, UNETR): the shallowest
  tapped layer is upsampled x4 (transposed convolutions), the next x2, the next kept and the
  deepest max-pooled x2, so the skips sit at ``p/4, p/2, p, 2p`` with the finer ones narrower.

``FeaturePyramid`` optionally adds a small full-resolution stem on the image itself (two
convolutions), so the finest skip exists whatever the tower. ``UNetDecoder`` walks the maps
coarse to fine: upsample to the next skip's size (bilinear, so any stride ratio works, even
a 14-pixel patch), concatenate, two 3x3 convolutions with GroupNorm; a 1x1 convolution makes
the logits, whose bias starts at the logit of ``foreground_prior`` (RetinaNet's prior
initialisation: the first steps do not have to learn how rare foreground is).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medalign.models.tower_config import CLIP_MEAN, CLIP_STD
from medalign.models.towers import ImageTower, TowerConfig, VisionTower

DECODER_CHANNELS = [256, 128, 64, 32, 16]  # one per decoder stage, coarsest first (the U-Net's)


class ConvBlock(nn.Sequential):
    """Two 3x3 conv - GroupNorm - GELU layers (GroupNorm: batch-size independent, unlike BatchNorm)."""

    def __init__(self, cin: int, cout: int) -> None:
        groups = math.gcd(8, cout)
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.GroupNorm(groups, cout),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.GroupNorm(groups, cout),
            nn.GELU(),
        )


def conv_norm_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """One 3x3 convolution - GroupNorm - GELU (the decoders' normalised unit)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(math.gcd(8, cout), cout),
        nn.GELU(),
    )


def prior_logits_head(cin: int, num_classes: int, foreground_prior: float | None) -> nn.Conv2d:
    """1x1 convolution to logits; bias = logit(prior) so sigmoid starts at the foreground share."""
    head = nn.Conv2d(cin, num_classes, 1)
    if foreground_prior is not None:
        if not 0.0 < foreground_prior < 1.0:
            raise ValueError(f"foreground_prior must lie in (0, 1), got {foreground_prior}")
        nn.init.constant_(head.bias, math.log(foreground_prior / (1.0 - foreground_prior)))
    return head


def tower_image_stats(cfg: TowerConfig, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) a tower's weights expect (CLIP's when it states none), averaged
    over RGB and repeated when the input has another channel count (``ImageInput``'s rule)."""
    mean, std = cfg.weights_image_stats() or (CLIP_MEAN, CLIP_STD)

    def fit(values: tuple[float, ...]) -> list[float]:
        return list(values) if len(values) == channels else [sum(values) / len(values)] * channels

    return fit(mean), fit(std)


def _is_pyramid(strides: list[float]) -> bool:
    return all(a < b for a, b in itertools.pairwise(strides))


class _Resample(nn.Sequential):
    """Patch-grid map -> ``2**log2_factor`` times finer (transposed convs, halving widths) or coarser (max-pool)."""

    def __init__(self, width: int, log2_factor: int) -> None:
        layers: list[nn.Module] = []
        for i in range(max(log2_factor, 0)):
            cin, cout = width // 2**i, width // 2 ** (i + 1)
            layers.append(nn.ConvTranspose2d(cin, cout, 2, stride=2))
            if i < log2_factor - 1:
                layers += [nn.GroupNorm(math.gcd(8, cout), cout), nn.GELU()]
        layers += [nn.MaxPool2d(2, ceil_mode=True)] * max(-log2_factor, 0)
        super().__init__(*layers)
        self.width = width // 2 ** max(log2_factor, 0)


class FeaturePyramid(nn.Module):
    """``tower`` (normalised pixels in) -> maps finest first, one per stride (see the module doc).

    ``widths`` / ``strides`` describe the output, the stem's full-resolution map first when
    ``stem_width`` > 0. Strides are nominal (a transformer's ``p/4`` need not be an integer);
    the decoder matches maps by their actual sizes.
    """

    def __init__(self, tower: ImageTower, in_channels: int, stem_width: int = 0) -> None:
        super().__init__()
        self.tower = tower
        strides = [float(s) for s in tower.feature_strides]
        widths = [int(c) for c in tower.feature_channels]
        self.resample: nn.ModuleList | None = None
        if not _is_pyramid(strides):  # a transformer: every tap at the patch stride
            n = len(widths)
            factors = [n - 2 - i for i in range(n)]  # 4 taps: x4, x2, x1, /2
            self.resample = nn.ModuleList(_Resample(w, f) for w, f in zip(widths, factors, strict=True))
            widths = [r.width for r in self.resample]
            strides = [s / 2.0**f for s, f in zip(strides, factors, strict=True)]
        self.stem = ConvBlock(in_channels, stem_width) if stem_width > 0 else None
        if self.stem is not None:
            widths, strides = [stem_width, *widths], [1.0, *strides]
        self.widths: list[int] = widths
        self.strides: list[float] = strides

    @property
    def size_multiple(self) -> int:
        """Inputs must divide by this: the tower's own multiple, twice the patch for the pooled level."""
        multiple = int(self.tower.size_multiple)
        return 2 * multiple if self.resample is not None else multiple

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        maps = self.tower.feature_maps(pixel_values)
        if self.resample is not None:
            maps = [r(m) for r, m in zip(self.resample, maps, strict=True)]
        if self.stem is not None:
            maps = [self.stem(pixel_values), *maps]
        return maps


class UNetDecoder(nn.Module):
    """Maps finest first (``widths``) -> logits at the finest map's size (see the module doc).

    One stage per skip: the running map is upsampled to the skip's size, concatenated with it
    and mixed by a ``ConvBlock`` of ``channels[stage]`` (the last ``len(widths) - 1`` entries
    of ``channels``, coarsest first). The deepest map is first projected (1x1) to the first
    stage's width: pretrained towers end wide (1280 for EfficientNet) and a 3x3 convolution over
    that width at stride 16 would cost more than the whole encoder.
    """

    def __init__(
        self, widths: list[int], channels: list[int], num_classes: int, foreground_prior: float | None
    ) -> None:
        super().__init__()
        stages = len(widths) - 1
        if stages < 1:
            raise ValueError("a U-Net decoder needs at least two maps (one skip)")
        if len(channels) < stages:
            raise ValueError(f"decoder_channels needs {stages} widths for this encoder, got {channels}")
        channels = [int(c) for c in channels[-stages:]]
        self.project = nn.Sequential(
            nn.Conv2d(widths[-1], channels[0], 1, bias=False),
            nn.GroupNorm(math.gcd(8, channels[0]), channels[0]),
            nn.GELU(),
        )
        cins = [channels[0], *channels[:-1]]
        skips = list(reversed(widths[:-1]))
        self.blocks = nn.ModuleList(
            ConvBlock(cin + skip, cout) for cin, skip, cout in zip(cins, skips, channels, strict=True)
        )
        self.head = prior_logits_head(channels[-1], num_classes, foreground_prior)

    def forward(self, maps: list[Tensor]) -> Tensor:
        x = self.project(maps[-1])
        for block, skip in zip(self.blocks, reversed(maps[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def upsample_to(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Logits at the input's size (bilinear) when the decoder's finest map is coarser."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def fixed_size_tower(tower: Any) -> bool:
    """Whether a tower only runs at its built size (a CLIP/ViT whose position table was resampled once)."""
    return isinstance(tower, VisionTower)
