"""Any ``transformers`` vision model as an image tower (``kind: hf_vision``): ConvNeXt, DINOv2,
SigLIP, CLIP, ViT, Swin, ... named by hub id (online users) or by a local ``save_pretrained``
folder.

The tower answers the calls every medalign image tower answers (see ``medalign.models.towers``):
``forward -> (pooled [B, H], tokens [B, N, H])`` and ``feature_maps -> [B, C_i, h_i, w_i]`` with
``feature_channels`` / ``feature_strides``, whatever the family:

* convolutional models (hidden states ``[B, C, h, w]``): the last map of every stride;
  tokens are the final map flattened; pooled is the model's pooler output or the mean;
* transformer models (hidden states ``[B, prefix + h*w, D]``): four evenly spaced layers
  reshaped to the patch grid (all at the patch stride, as ViTDet/UNETR use a plain ViT);
  tokens are the final patch tokens (CLS / register tokens dropped), pooled the pooler output,
  else the CLS token, else the mean.

Checkpoints holding an image and a text model (CLIP, SigLIP) give their vision half. Inputs that
are not RGB: the first convolution (patch embedding or stem) is adapted like every pretrained
tower's (``adapt_patch_embedding``). Widths and strides are found with one forward pass of a
blank image when the tower is built.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from medalign.models.pretrained import (
    NON_ARCH_KEYS,
    OFFLINE_VISION,
    adapt_patch_embedding,
    from_pretrained_checked,
    unavailable_message,
)
from medalign.models.tower_config import TowerConfig, resolve_source

DEFAULT_IMAGE_SIZE = 224
TRANSFORMER_TAPS = 4  # hidden layers a transformer tower hands to a decoder


def _vision_class(config: Any) -> tuple[Any, Any]:
    """The transformers model class for ``config`` (its vision part when it has one) and that config."""
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None:
        return MODEL_MAPPING[type(vision_config)], vision_config
    return AutoModel, config


def _load(cfg: TowerConfig) -> nn.Module:
    from transformers import AutoConfig

    if cfg.source is None:
        data = {k: v for k, v in cfg.config.items() if k not in (*NON_ARCH_KEYS, "image_stats")}
        if "model_type" not in data:
            raise ValueError("hf_vision with source=None needs config['model_type'] (e.g. 'convnext', 'dinov2')")
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        model_cls, config = _vision_class(config)
        return model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    overrides = {k: v for k, v in cfg.config.items() if k != "image_stats"}
    try:
        config = AutoConfig.from_pretrained(resolve_source(cfg.source), **overrides)
    except OSError as err:
        raise OSError(unavailable_message(cfg.source, err, OFFLINE_VISION)) from None
    model_cls, _ = _vision_class(config)
    return from_pretrained_checked(model_cls, cfg.source, offline_hint=OFFLINE_VISION, **overrides)


def _adapt_channels(model: nn.Module, in_channels: int) -> None:
    """Turn the first RGB convolution into one for ``in_channels`` and update the channel checks."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels == in_channels:
        return  # built for these channels already (a bundle's saved config)
    if conv is None or conv.in_channels != 3:
        raise ValueError(f"{type(model).__name__} has no RGB input convolution to adapt to {in_channels} channels")
    conv.weight = nn.Parameter(adapt_patch_embedding(conv.weight.detach(), in_channels).clone())
    conv.in_channels = in_channels
    for module in model.modules():  # patch-embedding modules check the channel count they were built for
        if getattr(module, "num_channels", None) == 3:
            module.num_channels = in_channels
    if getattr(model.config, "num_channels", None) == 3:
        model.config.num_channels = in_channels


class HFVisionTower(nn.Module):
    """A transformers vision model behind medalign's image-tower calls (see the module doc)."""

    kind = "hf_vision"

    def __init__(self, model: nn.Module, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.model = model
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        patch = getattr(model.config, "patch_size", None)
        self.patch_size = int(patch[0] if isinstance(patch, (list, tuple)) else patch) if patch else None
        with torch.no_grad():
            blank = torch.zeros(1, in_channels, image_size, image_size)
            was_training = model.training
            model.eval()
            pooled, _ = self.forward(blank)
            maps = self.feature_maps(blank)
            model.train(was_training)
        self.hidden_size: int = int(pooled.shape[-1])
        self.feature_channels = [int(m.shape[1]) for m in maps]
        self.feature_strides = [image_size // int(m.shape[-1]) for m in maps]
        self.size_multiple = max(self.feature_strides)

    def _run(self, pixel_values: torch.Tensor) -> Any:
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if self._interpolate:
            kwargs["interpolate_pos_encoding"] = True
        return self.model(pixel_values=pixel_values, **kwargs)

    def _grid(self, pixel_values: torch.Tensor, length: int) -> tuple[int, int, int]:
        """``(prefix tokens, grid h, grid w)`` of a transformer's ``length``-token sequence."""
        if self.patch_size is None:
            raise ValueError(f"{type(self.model).__name__} gives token sequences but has no patch_size")
        h, w = (s // self.patch_size for s in pixel_values.shape[-2:])
        prefix = length - h * w
        if prefix < 0:
            raise ValueError(f"{length} tokens do not cover a {h}x{w} patch grid")
        return prefix, h, w

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run(pixel_values)
        last = out.last_hidden_state
        pooler = getattr(out, "pooler_output", None)
        pooler = pooler.flatten(1) if pooler is not None and pooler.ndim >= 2 else None
        if last.ndim == 4:  # convolutional: [B, C, h, w]
            tokens = last.flatten(2).transpose(1, 2)
            return (pooler if pooler is not None else tokens.mean(1)), tokens
        prefix, _, _ = self._grid(pixel_values, last.shape[1])
        tokens = last[:, prefix:]
        if pooler is not None:
            return pooler, tokens
        return (last[:, 0] if prefix else tokens.mean(1)), tokens

    def feature_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale maps, finest first (see the module doc)."""
        hidden = self._run(pixel_values).hidden_states
        if hidden[-1].ndim == 4:
            by_stride: dict[int, torch.Tensor] = {}
            for state in hidden:
                by_stride[pixel_values.shape[-1] // state.shape[-1]] = state  # the last map of each stride
            return [by_stride[s] for s in sorted(by_stride)]
        layers = len(hidden) - 1
        picks = sorted({max(1, round(layers * (i + 1) / TRANSFORMER_TAPS)) for i in range(TRANSFORMER_TAPS)})
        maps = []
        for index in picks:
            state = hidden[index]
            prefix, h, w = self._grid(pixel_values, state.shape[1])
            maps.append(state[:, prefix:].transpose(1, 2).reshape(state.shape[0], -1, h, w))
        return maps

    def hf_config_dict(self) -> dict[str, Any]:
        data = self.model.config.to_dict()
        for key in NON_ARCH_KEYS:
            data.pop(key, None)
        return data


def build_hf_vision_tower(cfg: TowerConfig, in_channels: int = 3, image_size: int | None = None) -> HFVisionTower:
    model = _load(cfg)
    _adapt_channels(model, in_channels)
    return HFVisionTower(model, in_channels, int(image_size or DEFAULT_IMAGE_SIZE))
