"""Clinical heads (Stage III): diagnosis and prognosis from image, fused or image+text features.

Reading order: ``ClinicalConfig`` (plain data), ``ClinicalModel`` (encode every modality with
one shared image tower, fuse the present ones with the report, then the heads) and the registered
architectures at the bottom.

    forward(images: dict[modality, Tensor [B, C, H, W] in [0, 1]] | Tensor (one modality),
            present: Tensor [B, M] bool | None = None,   # M = len(config.modalities), config order
            input_ids=None, attention_mask=None,          # with a text tower: the report
            text_present: Tensor [B] bool | None = None)  # False = no report for that case
        -> {"features": [B, hidden_size] fused features,
            "logits": [B, num_classes]       (num_classes > 0),
            "risk": [B]                       (survival "cox": log hazard ratio, higher = earlier),
            "hazard_logits": [B, K]           (survival "discrete": per-interval hazard logits)}

Every modality goes through the *same* ``vision`` tower (one set of weights, so a tower
pretrained on single images in Stage I/II serves any number of co-registered sequences; a ViT
or a pretrained EfficientNet-Lite, ``clinical_effnet``); its pooled embedding (CLS, or the
average-pooled head features of a CNN) is projected to ``hidden_size`` and tagged with a learned modality
embedding. The report, when the model has a text tower and ``input_ids`` are given, adds one
more token (projected pooled text embedding + a text-type embedding). Fusion sees only present
tokens: absent modalities are zeroed before the tower and selected away (``where``) before the
fusion, so their pixels cannot change the output:

* ``fusion: mean`` - the masked mean of the present tokens;
* ``fusion: attention`` - one pre-norm transformer layer over the tokens with a key padding mask
  (absent tokens are neither attended to nor pooled), then the masked mean of its outputs.

A case needs at least one present modality or a report; one with neither is an error.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from medalign.models.adapters import check_trainable_blocks, freeze_configured_towers
from medalign.models.registry import register_model
from medalign.models.towers import (
    MINILM_TEXT,
    SMALL_CLIP_VISION,
    TINY_BERT,
    TINY_CLIP_VISION,
    VIT_B16,
    ConfigRecord,
    ImageInput,
    TowerConfig,
    build_text_tower,
    build_tokenizer,
    build_vision_tower,
    tokenizer_source,
)

FUSIONS = ("mean", "attention")
SURVIVAL_KINDS = ("none", "cox", "discrete")


@dataclass
class ClinicalConfig(ImageInput, ConfigRecord):
    """Everything that defines a clinical model; ``to_dict()`` is what a bundle stores."""

    _towers: ClassVar[tuple[str, ...]] = ("vision", "text")
    # (mean, std) for grey [0, 1] scans when the config gives none
    default_image_stats: ClassVar[tuple[tuple[float, ...], tuple[float, ...]]] = ((0.5,), (0.25,))

    vision: TowerConfig
    text: TowerConfig | None = None  # None = image features only
    modalities: list[str] = field(default_factory=lambda: ["image"])
    in_channels: int = 1  # per modality (each modality is one input of the shared tower)
    image_size: int = 64
    image_mean: list[float] | None = None  # per channel of one modality; None = 0.5
    image_std: list[float] | None = None  # None = 0.25
    fusion: Literal["mean", "attention"] = "mean"
    hidden_size: int = 128
    num_heads: int = 4  # fusion: attention
    dropout: float = 0.1
    num_classes: int = 0  # 0 = no diagnosis head
    survival: Literal["none", "cox", "discrete"] = "none"
    time_bins: list[float] | None = None  # survival "discrete": interval edges, e.g. [0, 12, 24, 36, 60]
    max_text_length: int = 128
    freeze_vision: bool = False
    freeze_text: bool = False
    # {tower: N}: a frozen tower's last N blocks (and what follows them) still train
    trainable_blocks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check_towers()
        self.modalities = [str(m) for m in self.modalities]
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be distinct names, got {self.modalities}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.survival not in SURVIVAL_KINDS:
            raise ValueError(f"survival must be one of {SURVIVAL_KINDS}, got {self.survival!r}")
        if self.num_classes < 0 or self.num_classes == 1:
            raise ValueError(f"num_classes must be 0 (no diagnosis head) or >= 2, got {self.num_classes}")
        if self.num_classes == 0 and self.survival == "none":
            raise ValueError("a clinical model needs a head: set num_classes >= 2 and/or survival")
        if self.survival == "discrete":
            bins = [float(b) for b in self.time_bins or []]
            if len(bins) < 2 or any(b >= c for b, c in itertools.pairwise(bins)) or bins[0] < 0:
                raise ValueError(
                    f"survival 'discrete' needs time_bins: >= 2 increasing edges from >= 0, got {self.time_bins}"
                )
            self.time_bins = bins
        if self.in_channels < 1 or self.hidden_size < 1:
            raise ValueError(
                f"in_channels and hidden_size must be >= 1, got {self.in_channels}, {self.hidden_size}"
            )
        if self.fusion == "attention" and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.check_image_stats()
        self.trainable_blocks = dict(self.trainable_blocks)
        check_trainable_blocks(self)


    @property
    def num_intervals(self) -> int:
        return len(self.time_bins) - 1 if self.time_bins else 0


class ClinicalModel(nn.Module):
    """Shared image tower over every modality, presence-masked fusion (+ report), diagnosis/survival heads."""

    bundle_kind = "clinical"

    def __init__(self, config: ClinicalConfig) -> None:
        super().__init__()
        self.config = c = config
        self.vision = build_vision_tower(c.vision, c.in_channels, c.image_size)
        self.text = build_text_tower(c.text) if c.text is not None else None
        d = c.hidden_size
        self.image_proj = nn.Linear(self.vision.hidden_size, d)
        self.modality_embed = nn.Parameter(torch.zeros(len(c.modalities), d))
        nn.init.normal_(self.modality_embed, std=0.02)
        if self.text is not None:
            self.text_proj = nn.Linear(self.text.hidden_size, d)
            self.text_embed = nn.Parameter(torch.zeros(d))
            nn.init.normal_(self.text_embed, std=0.02)
        self.fuser = (
            nn.TransformerEncoderLayer(
                d, c.num_heads, 2 * d, dropout=c.dropout, batch_first=True, norm_first=True
            )
            if c.fusion == "attention"
            else None
        )
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(d, c.num_classes) if c.num_classes else None
        self.risk_head = nn.Linear(d, 1) if c.survival == "cox" else None
        self.hazard_head = nn.Linear(d, c.num_intervals) if c.survival == "discrete" else None

        mean, std = c.image_stats()
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self._tokenizer: Any = None
        freeze_configured_towers(self)

    # -- description ----------------------------------------------------------------------------

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modalities)

    @property
    def needs_text(self) -> bool:
        """Whether reports join the fusion (the model has a text tower)."""
        return self.text is not None

    @property
    def tokenizer(self) -> Any:
        """The text tower's tokenizer, built on first use; None without a text tower."""
        if self.config.text is None:
            return None
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.config.text)
        return self._tokenizer

    def train(self, mode: bool = True) -> ClinicalModel:
        """Frozen towers stay in eval mode (no dropout), so they give the same features throughout."""
        super().train(mode)
        for frozen, tower in ((self.config.freeze_vision, self.vision), (self.config.freeze_text, self.text)):
            if frozen and mode and tower is not None:
                tower.eval()
        return self

    # -- forward --------------------------------------------------------------------------------

    def _images(self, images: dict[str, Tensor] | Tensor) -> list[Tensor | None]:
        if isinstance(images, Tensor):
            if len(self.modalities) != 1:
                raise ValueError(f"a single tensor was given but the model has modalities {self.modalities}")
            images = {self.modalities[0]: images}
        unknown = sorted(set(images) - set(self.modalities))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; the model has {self.modalities}")
        out: list[Tensor | None] = []
        for name in self.modalities:
            x = images.get(name)
            if x is not None and (x.ndim != 4 or x.shape[1] != self.config.in_channels):
                raise ValueError(
                    f"modality {name!r}: expected [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}"
                )
            out.append(x)
        if all(x is None for x in out):
            raise ValueError(f"no image given for any of the modalities {self.modalities}")
        return out

    def _modality_tokens(self, images: list[Tensor | None], present: Tensor) -> Tensor:
        """[B, M, D] projected pooled features + modality embeddings; absent entries are zeros."""
        reference = next(x for x in images if x is not None)
        zeros = torch.zeros_like(reference)
        stacked = []
        for m, x in enumerate(images):
            x = zeros if x is None else torch.where(present[:, m, None, None, None], x, zeros)
            stacked.append(x)
        batch = torch.cat(stacked)  # one tower call for every modality
        dtype = batch.dtype
        pooled, _ = self.vision((batch - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype))
        b, m = present.shape
        tokens = self.image_proj(pooled).reshape(m, b, -1).transpose(0, 1) + self.modality_embed
        return torch.where(
            present[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device)
        )

    def forward(
        self,
        images: dict[str, Tensor] | Tensor,
        present: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        text_present: Tensor | None = None,
    ) -> dict[str, Tensor]:
        inputs = self._images(images)
        reference = next(x for x in inputs if x is not None)
        b = reference.shape[0]
        given = torch.tensor([x is not None for x in inputs], device=reference.device)
        present = (
            given[None, :].expand(b, -1) if present is None else present.bool().to(reference.device) & given
        )
        if present.shape != (b, len(self.modalities)):
            raise ValueError(f"present must be [B={b}, M={len(self.modalities)}], got {tuple(present.shape)}")
        tokens = self._modality_tokens(inputs, present)
        keep = present
        if self.text is not None and input_ids is not None:
            pooled, _ = self.text(input_ids, attention_mask)
            text_token = self.text_proj(pooled) + self.text_embed
            has_text = torch.ones(b, dtype=torch.bool, device=keep.device)
            if text_present is not None:
                has_text = text_present.bool().to(keep.device)
            text_token = torch.where(has_text[:, None], text_token, torch.zeros_like(text_token))
            tokens = torch.cat([tokens, text_token[:, None]], dim=1)
            keep = torch.cat([keep, has_text[:, None]], dim=1)
        empty = ~keep.any(dim=1)
        if bool(empty.any()):
            raise ValueError(
                f"cases {empty.nonzero().flatten().tolist()} have no present modality and no report"
            )
        if self.fuser is not None:
            tokens = self.fuser(tokens, src_key_padding_mask=~keep)
            tokens = torch.where(
                keep[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device)
            )
        weights = keep[..., None].to(tokens.dtype)
        features = self.norm((tokens * weights).sum(1) / weights.sum(1))
        hidden = self.drop(features)
        out: dict[str, Tensor] = {"features": features}
        if self.classifier is not None:
            out["logits"] = self.classifier(hidden)
        if self.risk_head is not None:
            out["risk"] = self.risk_head(hidden)[:, 0]
        if self.hazard_head is not None:
            out["hazard_logits"] = self.hazard_head(hidden)
        return out

    # -- saving ---------------------------------------------------------------------------------

    def portable_config(self) -> ClinicalConfig:
        """This config with the towers described by their full HF configs (``source=None``)."""
        mean, std = self.config.image_stats()
        vision = TowerConfig(self.config.vision.kind, None, self.vision.hf_config_dict())
        text = None
        if self.text is not None and self.config.text is not None:
            text = TowerConfig(
                self.config.text.kind,
                None,
                self.text.hf_config_dict(),
                tokenizer=tokenizer_source(self.config.text),
                pooling=self.text.pooling,
            )
        return self.config.replace(vision=vision, text=text, image_mean=mean, image_std=std)


def build_clinical_model(config: ClinicalConfig | dict[str, Any]) -> ClinicalModel:
    """A clinical model from its config or the dict a bundle stores."""
    return ClinicalModel(config if isinstance(config, ClinicalConfig) else ClinicalConfig.from_dict(config))


# ---------------------------------------------------------------------------------------------
# Registered architectures: configs are data; the entry function only applies overrides.
# ---------------------------------------------------------------------------------------------

_CLINICAL_TINY = ClinicalConfig(vision=TINY_CLIP_VISION, hidden_size=64, num_heads=2, image_size=64, num_classes=2)
_CLINICAL_SMALL_MINILM = ClinicalConfig(
    vision=SMALL_CLIP_VISION,
    text=MINILM_TEXT,
    freeze_text=True,
    hidden_size=128,
    image_size=128,
    num_classes=2,
)
# ImageNet EfficientNet-Lite0 from its PyPI wheel (no download), gray scans through summed stem
# kernels; fine-tuned whole by default (recipes give it a smaller learning rate than the heads).
_CLINICAL_EFFNET = ClinicalConfig(
    vision=TowerConfig("efficientnet_lite", source="efficientnet-lite0"),
    hidden_size=256,
    image_size=224,
    num_classes=2,
)
_CLINICAL_VIT_B16 = ClinicalConfig(
    vision=VIT_B16,
    hidden_size=256,
    image_size=224,
    in_channels=3,
    image_mean=[0.5],
    image_std=[0.5],
    num_classes=2,
)


def _create(default: ClinicalConfig, overrides: dict[str, Any]) -> ClinicalModel:
    # ``text: "tiny"`` names the small random text tower (a YAML recipe cannot build a TowerConfig)
    if overrides.get("text") == "tiny":
        overrides = {**overrides, "text": TINY_BERT}
    return ClinicalModel(default.replace(**overrides))


@register_model
def clinical_tiny(**overrides: Any) -> ClinicalModel:
    """Tiny random ViT (align_tiny's), no text unless ``text="tiny"`` or a tower: for tests."""
    return _create(_CLINICAL_TINY, overrides)


@register_model
def clinical_small_minilm(**overrides: Any) -> ClinicalModel:
    """Small random ViT at 128 px + the offline pretrained MiniLM (frozen) for the report token."""
    return _create(_CLINICAL_SMALL_MINILM, overrides)


@register_model
def clinical_effnet(**overrides: Any) -> ClinicalModel:
    """Pretrained EfficientNet-Lite0 (offline ImageNet weights) at 224 px, 1 channel per modality, no text."""
    return _create(_CLINICAL_EFFNET, overrides)


@register_model
def clinical_vit_b16(**overrides: Any) -> ClinicalModel:
    """ViT-B/16 at 224 px, 3 channels per modality (random, or ``vision={"source": ...}``), no text."""
    return _create(_CLINICAL_VIT_B16, overrides)
