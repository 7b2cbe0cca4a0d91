"""Text-guided segmentation (LViT / C2FVL): the prompt decides which structure is the target.

``TextGuidedSegmenter`` (registry names ``text_guided`` and, for recipes written before it,
``text_unet``) is a U-Net whose encoder and decoder exchange information with the prompt's
word features at several scales. The design answers one question: how can a model be made
unable to ignore its text? What it takes, each measured on the phantom's lesion prompts
(BENCHMARKS.md, "Text-guided segmentation"):

* **Words, not a sentence vector.** The frozen MiniLM mean-pooled embeddings of "the lesion
  in the right lower zone" and "... left lower zone" have cosine 0.985 (the features of the
  side word itself: 0.87): a pooled vector hides the one word that matters. Every fusion block
  attends to the projected *token* features.
* **Positions on the image side.** Prompts name places ("left", "lower zone"); an image
  position can only match such a word if it knows where it is. Image features entering a fusion
  block get a fixed 2D sinusoidal encoding of their position as a fraction of the image side
  (so it means the same at every scale and resolution), mixed by a learned linear layer.
* **Interaction at several scales, both ways.** Encoder stages (LViT's two branches): image
  positions attend to the words (text -> image) and the words attend back to the image
  (image -> text), so the word features carry on to deeper stages informed by what the image
  shows. Decoder stages (GuideDecoder-style): image positions attend to the updated words.
  Each text -> image update is a position-wise FiLM (``x * (1 + scale) + shift``), so the
  prompt can suppress a structure as well as add to it; a learned null token lets a position
  attend to nothing.
* **A text tower that can adapt**: ``text_trainable_layers`` unfreezes the top transformer
  layers of the pretrained tower (give them their own learning rate with
  ``optim.lr_multipliers: {text: 0.1}``).
* **C2FVL's structured attributes** as an alternative (or additional) context: one learned
  embedding per (attribute, value), unknown values masked out.

With neither text nor attributes the same network is the image-only control of a
comparison (``text=None``): the fusion blocks are not built and nothing else changes.

``LegacyTextUNet`` is the former ``text_unet`` (FiLM from the pooled text plus cross-attention
without positions, three decoder stages). It is kept only so that bundles saved with it still
load (their config says ``arch: text_unet``); new models cannot be built from it by name.
"""

# Why one module: the text-guided segmentation models share their language-vision fusion blocks
# and one config.

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medalign.models.registry import register_model
from medalign.models.segmentation import (
    ConvBlock,
    SegmentationModel,
    _apply_film,
    _film,
    _SegConfig,
    register_segmentation_arch,
)
from medalign.models.tower_config import ImageInput
from medalign.models.towers import MINILM_TEXT, TowerConfig, build_text_tower, build_vision_tower

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _check_attributes(vocab: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    if vocab is None:
        return None
    vocab = {str(k): [str(v) for v in vs] for k, vs in vocab.items()}
    empty = [k for k, vs in vocab.items() if not vs]
    if empty:
        raise ValueError(f"attributes without values: {empty}")
    return vocab


TEXT_CACHE_SIZE = 4096  # distinct prompts whose frozen word features are kept (<= ~160 MB)
PRETRAINED_DEPTH = 5  # EfficientNet-Lite's feature maps: strides 2, 4, 8, 16, 32


def _strides(name: str, chosen: list[int] | None, available: list[int]) -> list[int]:
    """The fusion strides of one side, checked against the stages that exist (None: all >= 4)."""
    if chosen is None:
        return [s for s in available if s >= 4]
    chosen = sorted({int(s) for s in chosen})
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ValueError(f"{name} strides {missing} have no stage; this depth has strides {available}")
    return chosen


@dataclass
class TextGuidedConfig(ImageInput, _SegConfig):
    """A text-guided U-Net; see the module docstring for what each part is for.

    The encoder is a conv net trained from scratch (``vision=None``: widths ``base_width *
    2**i``, ``depth`` 4 by default) or a pretrained EfficientNet-Lite (``vision={"source":
    "efficientnet-lite0"}``, loaded offline; its stride 2..32 maps are the skips, a small conv
    stem of ``base_width`` channels adds the full-resolution one, pixels are normalised with the
    weights' statistics, and ``depth`` is its 5 stages).

    Fusion places are given by the stride of the feature map they act on: the encoder has
    stages at strides 1, 2, ..., ``2**depth`` (the bottleneck), the decoder at ``2**(depth-1)``
    down to 1. ``None`` (the default) fuses at every stage of stride >= 4 on both sides: at
    depth 4, encoder 4, 8, 16 and decoder 8, 4. Finer maps cost far more than they gave on the
    phantom (the stride-2 decoder stage alone nearly doubled a training step).
    """

    arch: str = "text_guided"
    text: TowerConfig | None = field(default_factory=lambda: MINILM_TEXT.replace())
    vision: TowerConfig | None = None  # a pretrained encoder (efficientnet_lite); None: conv from scratch
    image_mean: list[float] | None = None  # with ``vision``: None = its weights' statistics
    image_std: list[float] | None = None
    # C2FVL's structured findings, e.g. {"side": ["left", "right"], "zone": [...]}: column i of
    # ``attributes`` indexes the values of the i-th key (negative = unknown, masked out).
    attributes_vocab: dict[str, list[str]] | None = None
    # encoder widths base * (1, 2, 4, ..., 2**depth); with ``vision``: the full-resolution stem's,
    # 0 for none (the decoder then stops at stride 2 and its logits are upsampled: about half the cost)
    base_width: int = 32
    depth: int | None = None  # number of 2x downsamplings; None: 4, or the vision tower's 5
    context_dim: int = 128  # width of the word/attribute tokens and of the attention
    num_heads: int = 4
    encoder_fusion: list[int] | None = None  # strides of the encoder stages that fuse; None: >= 4
    decoder_fusion: list[int] | None = None  # strides of the decoder stages that fuse; None: >= 4
    positional: bool = True  # 2D sinusoidal positions on the image side of every fusion block
    text_trainable_layers: int = 0  # top layers of the text tower that train (-1: all, 0: frozen)
    side_outputs: bool = False  # C2FVL's coarse-to-fine deep supervision
    max_text_length: int = 64

    _towers: ClassVar[tuple[str, ...]] = ("text", "vision")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_image_stats()
        self.attributes_vocab = _check_attributes(self.attributes_vocab)
        if self.vision is not None and self.vision.kind != "efficientnet_lite":
            raise ValueError(
                f"text_guided takes an efficientnet_lite vision tower (strides 2..32), got kind {self.vision.kind!r}"
            )
        if self.base_width < (0 if self.vision is not None else 1):
            raise ValueError(f"base_width must be >= 1 (>= 0 with a vision tower), got {self.base_width}")
        if self.vision is not None and self.depth not in (None, PRETRAINED_DEPTH):
            raise ValueError(
                f"with an EfficientNet-Lite encoder depth is its {PRETRAINED_DEPTH} stages, got {self.depth}"
            )
        self.fusion_strides()  # checks them
        if self.context_dim % self.num_heads or self.context_dim % 4:
            raise ValueError(
                f"context_dim {self.context_dim} must be divisible by num_heads {self.num_heads} and by 4"
            )
        if self.image_size % 2**self.levels:
            raise ValueError(f"image_size must be divisible by 2**depth = {2**self.levels}")
        if self.text_trainable_layers < -1:
            raise ValueError(f"text_trainable_layers must be >= -1, got {self.text_trainable_layers}")

    @property
    def levels(self) -> int:
        """The number of 2x downsamplings (``depth`` resolved)."""
        if self.depth is not None:
            return self.depth
        return PRETRAINED_DEPTH if self.vision is not None else 4

    @property
    def encoder_strides(self) -> list[int]:
        """Stride of each encoder stage, from the full-resolution stem to the bottleneck."""
        return [2**i for i in range(self.levels + 1)]

    def fusion_strides(self) -> tuple[list[int], list[int]]:
        """``(encoder, decoder)`` strides that fuse (the defaults resolved for this depth)."""
        strides = self.encoder_strides if self.base_width else self.encoder_strides[1:]
        encoder = _strides("encoder_fusion", self.encoder_fusion, strides)
        return encoder, _strides("decoder_fusion", self.decoder_fusion, strides[:-1])

    @property
    def conditioned(self) -> bool:
        """False for the image-only control (no text tower and no attributes)."""
        return self.text is not None or bool(self.attributes_vocab)


@dataclass
class LegacyTextUNetConfig(_SegConfig):
    """The former ``text_unet`` config, read from bundles saved before ``text_guided``."""

    arch: str = "text_unet"
    text: TowerConfig | None = field(default_factory=lambda: MINILM_TEXT.replace())
    attributes_vocab: dict[str, list[str]] | None = None
    base_width: int = 32
    depth: int = 4
    context_dim: int = 128
    num_heads: int = 4
    fuse_scales: list[int] = field(default_factory=lambda: [0, 1, 2])
    side_outputs: bool = False
    freeze_text: bool = True
    max_text_length: int = 64

    _towers: ClassVar[tuple[str, ...]] = ("text",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text is None and not self.attributes_vocab:
            raise ValueError("text_unet needs a text tower, attributes_vocab, or both")
        self.attributes_vocab = _check_attributes(self.attributes_vocab)
        self.fuse_scales = sorted({int(s) for s in self.fuse_scales})


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


FILM_INIT = 0.1  # the text -> image scale/shift layer starts at a tenth of its default weights


def sinusoidal_2d(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """``[height * width, dim]`` sin/cos features of each pixel's (y, x) as a fraction of the side.

    A quarter of the channels per (axis, sin|cos); frequencies from 0.5 cycle per image (whose
    cosine runs monotonically from one border to the other, so "left" and "right" differ in
    sign) up to ``dim / 8`` cycles. Fractions, not pixel indices: the encoding of "the right
    lower part" is the same at every scale of the network and at every input resolution.
    """
    n = dim // 4
    freqs = 0.5 * torch.logspace(0, math.log10(max(dim / 4, 1.0)), n, device=device)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    ay = math.pi * ys[:, None] * freqs  # [H, n]
    ax = math.pi * xs[:, None] * freqs  # [W, n]
    fy = torch.cat([ay.sin(), ay.cos()], dim=-1)[:, None, :].expand(height, width, 2 * n)
    fx = torch.cat([ax.sin(), ax.cos()], dim=-1)[None, :, :].expand(height, width, 2 * n)
    return torch.cat([fy, fx], dim=-1).reshape(height * width, 4 * n)


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """Multi-head attention on ``[B, N, D]`` inputs; ``mask`` [B, M] marks the keys to attend to.

    Written out (matmul, softmax in fp32, matmul) rather than through SDPA: one side is always
    the short prompt, so the score matrix is small, and PyTorch's fused CPU kernel is several
    times slower in bf16 (see ``medalign.models.towers.attention_forward``): it made the fusion
    blocks half of a training step.
    """
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (query, key, value))
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(weights, v).transpose(1, 2).flatten(2)


class TextImageFusion(nn.Module):
    """One exchange between a feature map and the context tokens.

    text -> image: every position (its feature plus its 2D position encoding) attends to the
    tokens and a learned null token; the result gives a position-wise scale and shift of the
    feature map. image -> text (``update_text``): every token attends to the positions and is
    updated by a residual MLP, so later blocks read words that have seen the image.
    """

    def __init__(self, channels: int, dim: int, heads: int, *, positional: bool, update_text: bool) -> None:
        super().__init__()
        self.heads, self.positional = heads, positional
        self.norm = nn.GroupNorm(1, channels)
        self.image_in = nn.Linear(channels, dim)
        self.position = nn.Linear(dim, dim) if positional else None
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.null = nn.Parameter(torch.zeros(1, 1, dim))
        self.to_film = nn.Linear(dim, 2 * channels)
        with torch.no_grad():  # start near the identity: the prompt's effect grows as it is learned
            self.to_film.weight.mul_(FILM_INIT)
            self.to_film.bias.zero_()
        self.text_block: nn.ModuleDict | None = None
        if update_text:
            self.text_block = nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(dim),
                    "q": nn.Linear(dim, dim),
                    "kv": nn.Linear(dim, 2 * dim),
                    "out": nn.Linear(dim, dim),
                    "mlp": nn.Sequential(
                        nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
                    ),
                }
            )
            for last in (self.text_block["out"], self.text_block["mlp"][-1]):  # residuals start at zero:
                nn.init.zeros_(last.weight)  # the words reach later blocks unchanged until the image
                nn.init.zeros_(last.bias)  # has something useful to add to them

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        image = self.image_in(self.norm(x).flatten(2).transpose(1, 2))  # [B, HW, D]
        if self.position is not None:
            image = image + self.position(sinusoidal_2d(h, w, image.shape[-1], x.device).to(image.dtype))
        keys = torch.cat([self.null.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        valid = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        k, v = self.kv(keys).chunk(2, dim=-1)
        read = _attend(self.q(image), k, v, self.heads, valid)  # [B, HW, D]
        scale, shift = self.to_film(read).transpose(1, 2).reshape(b, 2 * c, h, w).chunk(2, dim=1)
        x = x * (1 + scale) + shift
        if self.text_block is not None:
            t = self.text_block
            k, v = t["kv"](image).chunk(2, dim=-1)
            tokens = tokens + t["out"](_attend(t["q"](t["norm"](tokens)), k, v, self.heads, None))
            tokens = tokens + t["mlp"](tokens)
        return x, tokens


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class ContextEncoder(nn.Module):
    """Prompt word features and/or attribute values -> ``(tokens [B, L, D], valid [B, L])``.

    The text tower itself belongs to the model (``model.text``, what the shared segmenter code
    tokenises for and freezes); this module projects its word features and embeds attributes.
    """

    def __init__(
        self, text_width: int | None, attributes_vocab: dict[str, list[str]] | None, dim: int
    ) -> None:
        super().__init__()
        self.text_proj = nn.Linear(text_width, dim) if text_width is not None else None
        vocab = attributes_vocab or {}
        self.attr_names = list(vocab)
        sizes = [len(v) for v in vocab.values()]
        self.attr_embed = nn.Embedding(sum(sizes), dim) if sizes else None
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.register_buffer("attr_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("attr_sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, words: tuple[torch.Tensor, torch.Tensor] | None, attributes: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``words``: the text tower's ``(features [B, L, H], attention mask [B, L])``."""
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        if words is not None:
            assert self.text_proj is not None  # the model only passes words when it has a tower
            parts.append((self.text_proj(words[0]), words[1].bool()))
        if attributes is not None:
            if self.attr_embed is None:
                raise ValueError("this model has no attributes_vocab; pass input_ids instead")
            if attributes.shape[-1] != len(self.attr_names):
                raise ValueError(f"attributes must have {len(self.attr_names)} columns {self.attr_names}")
            if (attributes >= self.attr_sizes).any():
                raise ValueError(
                    f"attribute index out of range; sizes per attribute: {self.attr_sizes.tolist()}"
                )
            ids = (attributes.clamp(min=0) + self.attr_offsets).long()
            parts.append((self.attr_embed(ids), attributes >= 0))
        if not parts:
            raise ValueError("this model is prompt-guided: pass input_ids (see model.tokenize) or attributes")
        tokens = self.norm(torch.cat([t for t, _ in parts], dim=1))
        return tokens, torch.cat([m for _, m in parts], dim=1)


def encode_attribute_rows(vocab: dict[str, list[str]], rows: list[dict[str, str | None]]) -> torch.Tensor:
    """``[{"side": "left", ...}, ...]`` -> ``[B, n_attr]`` value indices; missing or empty = -1.

    A value outside the vocabulary is an error naming the attribute and the known values.
    """
    out = []
    for row in rows:
        line = []
        for name, values in vocab.items():
            value = row.get(name)
            if value is None or value == "":
                line.append(-1)
            elif value not in values:
                raise ValueError(f"attribute {name}={value!r} is not in the model's vocabulary {values}")
            else:
                line.append(values.index(value))
        out.append(line)
    return torch.tensor(out, dtype=torch.long).reshape(len(rows), len(vocab))


class _UNetSkeleton(SegmentationModel):
    """The conv U-Net both text-guided architectures share; subclasses act between its stages.

    ``_encoder_stage(i, x, state)`` runs after encoder stage ``i`` (stride ``2**i``, ``depth`` =
    the bottleneck) and ``_decoder_stage(s, x, state)`` after decoder stage ``s`` (0 = coarsest);
    both return the (possibly changed) feature map and may update ``state``, the forward pass's
    own dict (the context tokens travel in it). Parameter names are those of the former
    ``text_unet``, so its bundles load unchanged.
    """

    config: Any

    def _build_unet(self, c: Any, widths: list[int], encoder: bool = True) -> list[tuple[int, int]]:
        """Stem, encoder (unless another module provides the stride >= 2 maps), decoder, head and
        side heads for ``widths[i]`` channels at stride ``2**i``; returns the decoder's (in, out).

        ``widths[0] == 0`` leaves out the full-resolution level: no stem, the decoder stops at
        stride 2 and its logits are upsampled (only with another module as the encoder).
        """
        depth = len(widths) - 1
        self.widths = widths
        self.full_resolution = widths[0] > 0
        self.stem = ConvBlock(c.in_channels, widths[0]) if self.full_resolution else None
        if encoder:
            self.down = nn.ModuleList(ConvBlock(widths[i], widths[i + 1]) for i in range(depth))
        finest = 0 if self.full_resolution else 1
        dec = [(widths[depth - s], widths[depth - s - 1]) for s in range(depth - finest)]
        self.up = nn.ModuleList(nn.ConvTranspose2d(cin, cout, 2, stride=2) for cin, cout in dec)
        self.merge = nn.ModuleList(ConvBlock(2 * cout, cout) for _, cout in dec)
        self.head = nn.Conv2d(widths[finest], c.num_classes, 1)
        # side outputs: bottleneck, then every decoder stage but the last (its logits are the output)
        side_widths = [widths[depth]] + [cout for _, cout in dec[:-1]]
        self.side_heads = (
            nn.ModuleList(nn.Conv2d(w, c.num_classes, 1) for w in side_widths) if c.side_outputs else None
        )
        return dec

    def _encoder_stage(self, index: int, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return x

    def _decoder_stage(self, index: int, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return x

    def _encode(self, pixel_values: torch.Tensor, state: dict[str, Any]) -> list[torch.Tensor]:
        """The skips at strides 1, 2, ..., bottleneck (the conv encoder trained from scratch)."""
        skips = [self._encoder_stage(0, self.stem(pixel_values), state)]
        for i, down in enumerate(self.down, start=1):
            skips.append(self._encoder_stage(i, down(F.max_pool2d(skips[-1], 2)), state))
        return skips

    def _run_unet(self, pixel_values: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
        self._check_pixels(pixel_values, 2 ** (len(self.widths) - 1))
        skips = self._encode(pixel_values, state)
        x = skips.pop()  # bottleneck
        side = [x]
        for s, (up, merge) in enumerate(zip(self.up, self.merge, strict=True)):
            x = self._decoder_stage(s, merge(torch.cat([up(x), skips.pop()], dim=1)), state)
            side.append(x)
        side_logits = (
            [head(f) for head, f in zip(self.side_heads, side[:-1], strict=True)] if self.side_heads else []
        )
        logits = self.head(x)
        if not self.full_resolution:
            logits = F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False)
        return {"logits": logits, "side_logits": side_logits}

    def encode_attributes(self, rows: list[dict[str, str | None]]) -> torch.Tensor:
        """``[{"side": "left", ...}, ...]`` -> ``attributes [B, n_attr]`` on the model's device."""
        return encode_attribute_rows(self.config.attributes_vocab or {}, rows).to(self.head.weight.device)

    @property
    def takes_attributes(self) -> bool:
        return bool(self.config.attributes_vocab)


class TextGuidedSegmenter(_UNetSkeleton):
    """A conv U-Net steered by a prompt or by structured attributes (see the module docstring)."""

    def __init__(self, config: TextGuidedConfig) -> None:
        super().__init__()
        self.config = c = config
        self.vision = (
            build_vision_tower(c.vision, c.in_channels, c.image_size) if c.vision is not None else None
        )
        if self.vision is None:
            self._build_unet(c, [c.base_width * 2**i for i in range(c.levels + 1)])
        else:
            strides = list(self.vision.feature_strides)
            if strides != c.encoder_strides[1:]:
                raise ValueError(
                    f"the vision tower's feature strides {strides} are not {c.encoder_strides[1:]}"
                )
            self._build_unet(c, [c.base_width, *self.vision.feature_channels], encoder=False)
            mean, std = c.image_stats()
            self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.context: ContextEncoder | None = None
        self.encoder_fusion = nn.ModuleDict()
        self.decoder_fusion = nn.ModuleDict()
        self.text = build_text_tower(c.text) if c.text is not None else None
        self._text_cache: dict[tuple[Any, ...], torch.Tensor] = {}
        if c.conditioned:
            width = self.text.hidden_size if self.text is not None else None
            self.context = ContextEncoder(width, c.attributes_vocab, c.context_dim)
            encoder, decoder = c.fusion_strides()
            deepest = max(encoder, default=0)
            for stride in encoder:  # the deepest block has no later block to pass words to
                self.encoder_fusion[str(stride)] = TextImageFusion(
                    self.widths[c.encoder_strides.index(stride)],
                    c.context_dim,
                    c.num_heads,
                    positional=c.positional,
                    update_text=stride < deepest,
                )
            for stride in decoder:
                self.decoder_fusion[str(stride)] = TextImageFusion(
                    self.widths[c.encoder_strides.index(stride)],
                    c.context_dim,
                    c.num_heads,
                    positional=c.positional,
                    update_text=False,
                )
        if self.text is not None:
            self._set_text_trainable(c.text_trainable_layers)

    def _set_text_trainable(self, layers: int) -> None:
        """Freeze the text tower except its top ``layers`` transformer layers (-1: train all)."""
        from medalign.models.adapters import transformer_layers

        assert self.text is not None
        if layers == -1:
            return
        self._freeze(self.text)
        if layers == 0:
            return
        blocks = transformer_layers(self.text.model)
        if layers > len(blocks):
            raise ValueError(f"text_trainable_layers={layers} but the text tower has {len(blocks)} layers")
        self._frozen.remove(self.text)  # partly trained: it follows train()/eval() like the rest
        for block in list(blocks)[-layers:]:
            for p in block.parameters():
                p.requires_grad_(True)

    def _word_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [B, L, H], mask [B, L])`` of the prompt's tokens.

        A frozen tower gives every prompt the same features every time, and prompts repeat
        (a dataset has a few hundred distinct ones): they are computed once per distinct token
        sequence and kept (``TEXT_CACHE_SIZE`` at most), which takes the text tower, a fifth of
        a training step, out of it. The cache is dropped when weights are loaded.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tracing = torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
        cacheable = self.text is not None and not any(p.requires_grad for p in self.text.parameters())
        lengths = attention_mask.sum(dim=1)
        if not tracing and cacheable:  # the cache is plain Python: eager mode, frozen tower, right padding
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            cacheable = bool((attention_mask.bool() == (positions < lengths[:, None])).all())
        if tracing or not cacheable:
            _, features, mask = self._encode_text(input_ids, attention_mask)
            return features, mask
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        keys = [
            (dtype, tuple(ids[:n].tolist())) for ids, n in zip(input_ids.cpu(), lengths.tolist(), strict=True)
        ]
        missing = [i for i, k in enumerate(keys) if k not in self._text_cache]
        if missing:
            with torch.no_grad():
                _, features = self.text(input_ids[missing], attention_mask[missing])
            for row, i in enumerate(missing):
                if len(self._text_cache) < TEXT_CACHE_SIZE:
                    self._text_cache[keys[i]] = features[row, : len(keys[i][1])].detach()
        rows = []
        for i, key in enumerate(keys):
            cached = self._text_cache.get(key)
            if cached is None:  # a full cache: this row was computed in ``missing`` just now
                cached = features[missing.index(i), : len(key[1])]
            rows.append(cached)
        length = input_ids.shape[1]
        out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        for i, row in enumerate(rows):  # right-padded as the tokenizer pads
            out[i, : len(row)] = row
        return out, attention_mask.bool()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._text_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _encode(self, pixel_values: torch.Tensor, state: dict[str, Any]) -> list[torch.Tensor]:
        if self.vision is None:
            return super()._encode(pixel_values, state)
        stem = [self._encoder_stage(0, self.stem(pixel_values), state)] if self.stem is not None else []
        x = (pixel_values - self.pixel_mean.to(pixel_values.dtype)) / self.pixel_std.to(pixel_values.dtype)
        maps = self.vision.feature_maps(x, stage_hook=lambda i, m: self._encoder_stage(i + 1, m, state))
        maps[-1] = self._encoder_stage(len(maps), maps[-1], state)  # the bottleneck (after the hook's stages)
        return [*stem, *maps]

    def _encoder_stage(self, index: int, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        stride = str(2**index)
        if stride in self.encoder_fusion:
            x, state["tokens"] = self.encoder_fusion[stride](x, state["tokens"], state["mask"])
        return x

    def _decoder_stage(self, index: int, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        stride = str(2 ** (self.config.levels - 1 - index))
        if stride in self.decoder_fusion:
            x, _ = self.decoder_fusion[stride](x, state["tokens"], state["mask"])
        return x

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.context is not None:
            words = None
            if input_ids is not None:
                if self.text is None:
                    raise ValueError(
                        f"this {self.config.arch} model has no text tower; pass attributes instead"
                    )
                words = self._word_features(input_ids, attention_mask)
            state["tokens"], state["mask"] = self.context(words, attributes)
        return self._run_unet(pixel_values, state)


# ---------------------------------------------------------------------------------------------
# The former text_unet, for its saved bundles
# ---------------------------------------------------------------------------------------------


class TextCrossAttention(nn.Module):
    """The former fusion: positions attend to the tokens (no positions), then FiLM from their pool."""

    def __init__(self, channels: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(1, channels)
        self.q = nn.Linear(channels, context_dim)
        self.kv = nn.Linear(context_dim, 2 * context_dim)
        self.out = nn.Linear(context_dim, channels)
        self.film = _film(context_dim, channels)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))
        k, v = self.kv(context).chunk(2, dim=-1)
        any_valid = mask.any(dim=1)
        attend = mask | ~any_valid[:, None]
        y = _attend(q, k, v, self.num_heads, attend)
        y = self.out(y) * any_valid[:, None, None].to(x.dtype)
        x = x + y.transpose(1, 2).reshape(b, c, h, w)
        return _apply_film(x, self.film, pooled)


class LegacyTextUNet(_UNetSkeleton):
    """The former ``text_unet`` architecture, unchanged, so its bundles load and predict as before."""

    def __init__(self, config: LegacyTextUNetConfig) -> None:
        super().__init__()
        self.config = c = config
        dec = self._build_unet(c, [c.base_width * 2**i for i in range(c.depth + 1)])
        self.fuse = nn.ModuleDict(
            {str(s): TextCrossAttention(dec[s][1], c.context_dim, c.num_heads) for s in c.fuse_scales}
        )
        self.text = build_text_tower(c.text) if c.text is not None else None
        self.text_proj = nn.Linear(self.text.hidden_size, c.context_dim) if self.text is not None else None
        if self.text is not None and c.freeze_text:
            self._freeze(self.text)
        vocab = c.attributes_vocab or {}
        sizes = [len(v) for v in vocab.values()]
        self.attr_embed = nn.Embedding(sum(sizes), c.context_dim) if sizes else None
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.register_buffer("attr_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.context_norm = nn.LayerNorm(c.context_dim)

    def _decoder_stage(self, index: int, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        if str(index) in self.fuse:
            x = self.fuse[str(index)](x, state["tokens"], state["mask"], state["pooled"])
        return x

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        if input_ids is not None:
            _, words, mask = self._encode_text(input_ids, attention_mask)
            assert self.text_proj is not None
            parts.append((self.text_proj(words), mask))
        if attributes is not None and self.attr_embed is not None:
            ids = (attributes.clamp(min=0) + self.attr_offsets).long()
            parts.append((self.attr_embed(ids), attributes >= 0))
        if not parts:
            raise ValueError("text_unet needs input_ids (see model.tokenize) or attributes")
        tokens = self.context_norm(torch.cat([t for t, _ in parts], dim=1))
        mask = torch.cat([m for _, m in parts], dim=1)
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self._run_unet(pixel_values, {"tokens": tokens, "mask": mask, "pooled": pooled})


register_segmentation_arch("text_guided", TextGuidedConfig, TextGuidedSegmenter)
register_segmentation_arch("text_unet", LegacyTextUNetConfig, LegacyTextUNet)


@register_model
def text_guided(**overrides: Any) -> TextGuidedSegmenter:
    """U-Net guided by the prompt's words (frozen pretrained MiniLM) or C2FVL attributes at
    several encoder and decoder scales; ``text=None`` without attributes is its image-only control."""
    return TextGuidedSegmenter(TextGuidedConfig().replace(**overrides))


@register_model
def text_unet(**overrides: Any) -> TextGuidedSegmenter:
    """Alias of ``text_guided`` (the name recipes used before it; old bundles keep their architecture)."""
    return text_guided(**overrides)
