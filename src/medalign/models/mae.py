"""Stage I: a ViT masked autoencoder with a contrastive projection head (the hybrid MAE).

Reading order: ``MAEConfig`` (plain data), the helpers (patchify, sin-cos positions, random
masking, the decoder block), ``HybridMAE`` and the registered architectures at the bottom.

The encoder is a medalign ``VisionTower`` (``self.vision``), so the pretrained bundle hands its
weights to any later model with a ViT tower (``model.init_from``). Masking happens *after* the
HF embeddings module, which adds the CLS token and the learned positional embeddings: the
visible patches keep their positions, and the rest of the HF model (CLIP: ``pre_layrnorm``,
``encoder``, ``post_layernorm``; ViT: the layers and ``layernorm``) runs on CLS + visible tokens
only, which is what makes MAE pretraining cheap (a quarter of the tokens at ratio 0.75).

``forward`` returns the reconstruction loss (MSE on the masked patches only, against per-patch
normalised pixels when ``norm_pix_loss``), the per-patch predictions, the mask and an
L2-normalised ``embedding``: the projection head applied to the encoder's pooled output over the
visible tokens. The contrastive term of Stage I is computed on that embedding by the task
(``medalign.tasks.pretrain``), never on reconstructed pixels, so its gradient reaches the encoder
and the projection head but not the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medalign.models.registry import register_model
from medalign.models.towers import (
    SMALL_CLIP_VISION,
    TINY_CLIP_VISION,
    VIT_B16,
    ConfigRecord,
    ImageInput,
    TowerConfig,
    attention_forward,
    build_vision_tower,
)


@dataclass
class MAEConfig(ImageInput, ConfigRecord):
    """Complete description of a hybrid MAE; ``to_dict()`` is what a bundle stores."""

    _towers: ClassVar[tuple[str, ...]] = ("vision",)

    vision: TowerConfig
    image_size: int = 224
    in_channels: int = 3
    image_mean: list[float] | None = None  # None: CLIP's statistics (their average unless 3 channels)
    image_std: list[float] | None = None
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True  # target = each patch normalised by its own mean/std (MAE's default)
    embed_dim: int = 256  # contrastive projection head output

    def __post_init__(self) -> None:
        self.check_towers()
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"decoder_dim={self.decoder_dim} must be divisible by decoder_heads={self.decoder_heads}"
            )
        if self.decoder_dim % 4:
            raise ValueError(f"decoder_dim={self.decoder_dim} must be divisible by 4 (2D sin-cos positions)")
        self.check_image_stats()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, N, p*p*C]`` in the patch embedding's order (rows of patches, then columns).

    Within a patch the values run (row, column, channel), as in MAE.
    """
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a whole number of {patch}-pixel patches")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Tensor, patch: int, channels: int, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, N, p*p*C]`` -> ``[B, C, H, W]``."""
    b = patches.shape[0]
    x = patches.reshape(b, grid[0], grid[1], patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, grid[0] * patch, grid[1] * patch)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> Tensor:
    """Fixed 2D sin-cos positions ``[cls + gh*gw, dim]`` (MAE's decoder positions; CLS gets zeros).

    Half of the channels encode the row, half the column, each as sin/cos of geometric
    frequencies; fixed positions leave the decoder nothing to learn about geometry.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position dim must be divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(rows), encode(cols)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float()


def random_masking(
    batch: int, num_patches: int, ratio: float, device: torch.device, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image uniform random masks with exactly ``round(ratio * N)`` masked patches each.

    Returns ``(keep [B, N_keep] indices of the visible patches in ascending order, mask [B, N]
    with 1 = masked, restore [B, N]: position of each patch in the (visible, masked) order)``.
    Drawn from ``generator`` when given (on its own device), else from torch's global RNG.
    """
    n_masked = round(ratio * num_patches)
    if not 0 < n_masked < num_patches:
        raise ValueError(
            f"mask ratio {ratio} masks {n_masked} of {num_patches} patches; at least one patch must be "
            "masked and one visible"
        )
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=noise_device).to(device)
    shuffle = noise.argsort(dim=1)
    keep = shuffle[:, : num_patches - n_masked].sort(dim=1).values
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, keep, 0.0)
    order = torch.cat([keep, shuffle[:, num_patches - n_masked :]], dim=1)
    restore = order.argsort(dim=1)
    return keep, mask, restore


class DecoderBlock(nn.Module):
    """Pre-norm transformer block (attention + MLP), attention through towers' ``attention_forward``.

    ``attention_forward`` is SDPA except in bf16 on the CPU, where the explicit product is several
    times faster; using it keeps the decoder as fast as the encoder's HF layers.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.is_causal = False

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended, _ = attention_forward(self, q, k, v, None, is_causal=False)
        x = x + self.proj(attended.reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class HybridMAE(nn.Module):
    """Masked autoencoder on a medalign vision tower, with a contrastive projection head."""

    bundle_kind = "pretrain"

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = build_vision_tower(config.vision, config.in_channels, config.image_size)
        hf_config = self.vision.model.config
        patch = hf_config.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        if config.image_size % self.patch_size:
            raise ValueError(f"image_size={config.image_size} is not a multiple of patch {self.patch_size}")
        side = config.image_size // self.patch_size
        self.grid = (side, side)
        hidden, dim = self.vision.hidden_size, config.decoder_dim

        self.projection = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, config.embed_dim, bias=False)
        )
        self.decoder_embed = nn.Linear(hidden, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos", sincos_2d(dim, self.grid)[None], persistent=False)
        self.decoder = nn.ModuleList(
            DecoderBlock(dim, config.decoder_heads, config.decoder_mlp_ratio)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, self.patch_size**2 * config.in_channels)

        mean, std = config.image_stats()
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokenizer(self) -> None:
        """An MAE reads no text."""
        return None

    def normalize_pixels(self, pixel_values: Tensor) -> Tensor:
        """[0, 1] pixels -> the tower's input scale; rejects a wrong shape with a hint."""
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"expected pixel_values [B, {', '.join(map(str, expected))}], got {tuple(pixel_values.shape)}; "
                "set in_channels/image_size in the model config or data.channels/data.image_size"
            )
        dtype = pixel_values.dtype
        return (pixel_values - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)

    # -- encoder ----------------------------------------------------------------------------------

    def _hf(self) -> nn.Module:
        return getattr(self.vision.model, "vision_model", self.vision.model)  # transformers 4 nests CLIP

    def _trunk(self, tokens: Tensor) -> Tensor:
        """The HF model after its embeddings module, on ``[B, 1 + n, H]`` tokens: final-normed tokens."""
        hf = self._hf()
        if self.vision.kind == "clip_vision":
            hidden = hf.encoder(inputs_embeds=hf.pre_layrnorm(tokens)).last_hidden_state
            return hf.post_layernorm(hidden)  # CLIP norms CLS only; on all tokens, as VisionTower does
        if hasattr(hf, "layers"):  # transformers 5 ViT
            hidden = tokens
            for layer in hf.layers:
                out = layer(hidden, None)
                hidden = out[0] if isinstance(out, tuple) else out
        else:  # transformers 4 ViT
            hidden = hf.encoder(tokens).last_hidden_state
        return hf.layernorm(hidden)

    def encode_visible(
        self, pixel_values: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Encode the visible patches: ``(latent [B, 1 + n_keep, H], mask, restore, normalised pixels)``."""
        x = self.normalize_pixels(pixel_values)
        embedded = self._hf().embeddings(x)  # CLS + patches, positional embeddings added
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        keep, mask, restore = random_masking(x.shape[0], self.num_patches, ratio, x.device, generator)
        patches = embedded[:, 1:]
        visible = patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[-1]))
        latent = self._trunk(torch.cat([embedded[:, :1], visible], dim=1))
        return latent, mask, restore, x

    def encode(self, pixel_values: Tensor) -> Tensor:
        """Pooled (CLS) features ``[B, H]`` of the whole image, no masking: for probes and downstream."""
        pooled, _ = self.vision(self.normalize_pixels(pixel_values))
        return pooled

    def embed(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised contrastive embedding of the whole (unmasked) image."""
        return F.normalize(self.projection(self.encode(pixel_values)), dim=-1)

    # -- decoder and loss -------------------------------------------------------------------------

    def decode(self, latent: Tensor, restore: Tensor) -> Tensor:
        """Per-patch pixel predictions ``[B, N, p*p*C]`` from the visible tokens plus mask tokens."""
        tokens = self.decoder_embed(latent)
        cls, visible = tokens[:, :1], tokens[:, 1:]
        b, n_keep, d = visible.shape
        filled = torch.cat(
            [visible, self.mask_token.to(visible.dtype).expand(b, self.num_patches - n_keep, d)], 1
        )
        filled = filled.gather(1, restore[..., None].expand(-1, -1, d))  # back to patch order
        x = torch.cat([cls, filled], dim=1) + self.decoder_pos.to(filled.dtype)
        for block in self.decoder:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, normalized: Tensor) -> Tensor:
        """Reconstruction target per patch; with ``norm_pix_loss`` each patch is standardised.

        The variance is the unbiased one with eps 1e-6, exactly MAE's (and HF ViTMAE's) target.
        """
        target = patchify(normalized, self.patch_size)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6).sqrt()
        return target

    def reconstruction_loss(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over the masked patches only (visible patches are not scored)."""
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, pixel_values: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Mask, encode, decode; see the module docstring for the returned ``loss``/``pred``/``mask``/``embedding``."""
        latent, mask, restore, normalized = self.encode_visible(pixel_values, mask_ratio, generator)
        pred = self.decode(latent, restore)
        loss = self.reconstruction_loss(pred, self.target(normalized), mask)
        embedding = F.normalize(self.projection(latent[:, 0]).float(), dim=-1)
        return {"loss": loss, "pred": pred, "mask": mask, "embedding": embedding}

    # -- saving -----------------------------------------------------------------------------------

    def portable_config(self) -> MAEConfig:
        """This config with the tower described by its full HF config (``source=None``) and resolved stats."""
        mean, std = self.config.image_stats()
        vision = TowerConfig(self.config.vision.kind, None, self.vision.hf_config_dict())
        return self.config.replace(vision=vision, image_mean=mean, image_std=std)


def build_mae_model(config: MAEConfig | dict[str, Any]) -> HybridMAE:
    """A hybrid MAE from its config or the dict a bundle stores."""
    return HybridMAE(config if isinstance(config, MAEConfig) else MAEConfig.from_dict(config))


# ---------------------------------------------------------------------------------------------
# Registered architectures
# ---------------------------------------------------------------------------------------------

_MAE_TINY = MAEConfig(  # vision tower of align_tiny
    vision=TINY_CLIP_VISION,
    image_size=64,
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=2,
    embed_dim=32,
)

_MAE_SMALL = MAEConfig(  # vision tower of align_small_minilm, so Stage II can start from it
    vision=SMALL_CLIP_VISION,
    image_size=128,
    decoder_dim=128,
    decoder_depth=2,
    decoder_heads=4,
    embed_dim=128,
)

_MAE_VIT_B16 = MAEConfig(  # MAE's ViT-B/16: 8 x 512 decoder, 16 heads
    vision=VIT_B16,
    image_size=224,
    image_mean=[0.5],  # as align_vit_b16_minilm: (x - 0.5) / 0.5
    image_std=[0.5],
    decoder_dim=512,
    decoder_depth=8,
    decoder_heads=16,
    embed_dim=256,
)


@register_model
def mae_tiny(**overrides: Any) -> HybridMAE:
    """~0.2M-parameter hybrid MAE on align_tiny's CLIP-ViT tower (64 px): for tests."""
    return HybridMAE(_MAE_TINY.replace(**overrides))


@register_model
def mae_small(**overrides: Any) -> HybridMAE:
    """Hybrid MAE on align_small_minilm's CLIP-ViT tower (128 px): trains on a CPU."""
    return HybridMAE(_MAE_SMALL.replace(**overrides))


@register_model
def mae_vit_b16(**overrides: Any) -> HybridMAE:
    """Hybrid MAE on a ViT-B/16 (224 px) with MAE's 8 x 512 decoder; random unless ``vision`` is sourced."""
    return HybridMAE(_MAE_VIT_B16.replace(**overrides))
