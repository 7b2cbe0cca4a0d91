"""Parameter-efficient tuning of the towers: LoRA (via peft) and a Mona-style adapter.

A spec is plain data, stored in ``DualEncoderConfig.adapters`` so that a saved model rebuilds with
the same adapter modules before its state dict is loaded::

    {"vision": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
     "text": {"type": "mona", "bottleneck": 64, "kernel_sizes": [3, 5, 7]}}

Every spec also takes ``freeze`` (default True): freeze the tower's own weights so that only the
adapter (plus the projections and temperature, which live outside the towers) trains.

Both adapters hook into transformer blocks: Mona needs a medalign ViT (``clip_vision``/``vit``)
or text tower, LoRA any transformers model (its attention projections; ``target_modules`` for
others). A convolutional tower (``efficientnet_lite``) takes neither; it is tuned partly with
``freeze_tower(model, "vision", trainable_blocks=N)`` (the config's ``freeze_vision`` +
``trainable_blocks``) or fully with per-part learning rates (``optim.lr_multipliers``,
``optim.layer_decay``), and asking for an adapter on it is an error that says so.

Both adapters start as the identity (LoRA's B and Mona's up-projection are zero), so attaching
one to a pretrained model changes nothing until training moves it.

Mona (Yin et al., "Parameter-efficient is not sufficient", 2024) is placed after the attention
block and after the MLP block of every transformer layer (forward hooks on the attention module and
on the layer, so the HF model and its weight names are untouched). Per token stream ``x``::

    h = down(LN(x) * gamma + x * gammax)               # Mona's scaled LayerNorm, gamma = 1e-6
    h = h + mean_k(depthwise_conv_k(h))                # multi-scale local context, k in kernel_sizes
    h = irfft(rfft(h) * W)                             # learnable per-frequency, per-channel filter
    h = h + projector(h)
    x = x + up(dropout(gelu(h)))                       # up is zero-initialised

Vision adapters convolve and filter on the 2D patch grid (rfft2; CLS is left out of both), text
adapters along the sequence, with padding zeroed first so that a sentence's output does not depend
on how much padding its batch has.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from medalign.models.param_groups import layer_depths
from medalign.models.towers import TextTower, VisionTower, call_context

if TYPE_CHECKING:
    from medalign.models.dual_encoder import DualEncoder

CNN_TUNING = (
    "tune it partly with freeze_vision: true + trainable_blocks: {vision: N} (its last N blocks), or "
    "fully with optim.lr_multipliers / optim.layer_decay"
)

TOWERS = ("vision", "text")
ADAPTER_TYPES = ("lora", "mona")
_ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
_LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None, "freeze": True}
_MONA_DEFAULTS = {"bottleneck": 64, "kernel_sizes": [3, 5, 7], "dropout": 0.0, "filter": True, "freeze": True}


# ---------------------------------------------------------------------------------------------
# Mona
# ---------------------------------------------------------------------------------------------


class FrequencyFilter(nn.Module):
    """A learnable complex gain per frequency bin and channel (a global convolution, as in GFNet).

    ``size`` is the token layout the weight is defined on: ``(n,)`` for sequences (inputs are
    zero-padded to ``n``, so the filter is a linear, not circular, convolution over real tokens) or
    ``(h, w)`` for a patch grid. Another grid size bilinearly resamples the weight. The weight is
    stored as ``[..., channels, 2]`` (real, imag) and starts at 1 + 0j: the identity.
    """

    def __init__(self, channels: int, size: tuple[int, ...]) -> None:
        super().__init__()
        if len(size) not in (1, 2):
            raise ValueError(f"filter size must be (n,) or (h, w), got {size}")
        self.size = tuple(int(s) for s in size)
        bins = (*self.size[:-1], self.size[-1] // 2 + 1)
        weight = torch.zeros(*bins, channels, 2)
        weight[..., 0] = 1.0
        self.weight = nn.Parameter(weight)

    def complex_weight(self, bins: tuple[int, ...]) -> torch.Tensor:
        weight = self.weight
        if tuple(weight.shape[:-2]) != bins:
            # [*bins, C, 2] -> [1, C*2, *bins] for interpolate, and back
            channels = weight.shape[-2]
            moved = weight.flatten(-2).movedim(-1, 0).unsqueeze(0)
            mode = "linear" if len(bins) == 1 else "bilinear"
            moved = F.interpolate(moved, size=bins, mode=mode, align_corners=True)
            weight = moved.squeeze(0).movedim(0, -1).unflatten(-1, (channels, 2))
        return torch.view_as_complex(weight.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, L, C]`` (sequence) or ``[B, h, w, C]`` (grid), channels last."""
        dtype = x.dtype
        x = x.float()  # FFTs in half precision are restricted to power-of-two sizes
        if len(self.size) == 1:
            length = x.shape[1]
            n = max(length, self.size[0])
            spectrum = torch.fft.rfft(x, n=n, dim=1)
            spectrum = spectrum * self.complex_weight((spectrum.shape[1],))
            return torch.fft.irfft(spectrum, n=n, dim=1)[:, :length].to(dtype)
        h, w = x.shape[1], x.shape[2]
        spectrum = torch.fft.rfft2(x, dim=(1, 2))
        spectrum = spectrum * self.complex_weight(tuple(spectrum.shape[1:3]))
        return torch.fft.irfft2(spectrum, s=(h, w), dim=(1, 2)).to(dtype)


class MonaAdapter(nn.Module):
    """Mona-style adapter on a token stream ``[B, T, dim]``; returns ``x + delta`` (delta = 0 at init)."""

    def __init__(
        self,
        dim: int,
        bottleneck: int = 64,
        kernel_sizes: tuple[int, ...] | list[int] = (3, 5, 7),
        filter_size: tuple[int, ...] = (77,),
        spatial: bool = False,
        prefix_tokens: int = 0,
        dropout: float = 0.0,
        use_filter: bool = True,
    ) -> None:
        super().__init__()
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel sizes must be odd to keep the token layout, got {list(kernel_sizes)}")
        self.spatial = spatial
        self.prefix_tokens = prefix_tokens
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(dim))
        self.down = nn.Linear(dim, bottleneck)
        conv = nn.Conv2d if spatial else nn.Conv1d
        self.convs = nn.ModuleList(
            conv(bottleneck, bottleneck, k, padding=k // 2, groups=bottleneck) for k in kernel_sizes
        )
        self.filter = FrequencyFilter(bottleneck, filter_size) if use_filter else None
        self.projector = nn.Linear(bottleneck, bottleneck)  # Mona's 1x1 conv, on channels-last tokens
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _mix(self, h: torch.Tensor) -> torch.Tensor:
        """Local (depthwise convs) then global (frequency filter) mixing of channels-last tokens."""
        channels_first = h.movedim(-1, 1)
        local = torch.stack([conv(channels_first) for conv in self.convs]).mean(0)
        h = h + local.movedim(1, -1)
        return self.filter(h) if self.filter is not None else h

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int] | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.down(self.norm(x) * self.gamma + x * self.gammax)
        prefix, tokens = h[:, : self.prefix_tokens], h[:, self.prefix_tokens :]
        if self.spatial:
            if grid is None or grid[0] * grid[1] != tokens.shape[1]:
                raise ValueError(f"{tokens.shape[1]} patch tokens do not fit the grid {grid}")
            tokens = self._mix(tokens.unflatten(1, grid)).flatten(1, 2)
        else:
            if mask is not None:
                tokens = tokens * mask[:, -tokens.shape[1] :].unsqueeze(-1).to(tokens.dtype)
            tokens = self._mix(tokens)
        h = torch.cat([prefix, tokens], dim=1)
        h = h + self.projector(h)
        return x + self.up(self.dropout(F.gelu(h)))


class _MonaHook:
    """Forward hook that passes a module's output through an adapter.

    A class rather than a closure so ``copy.deepcopy(model)`` (EMA, SWA) re-points the hook at the
    copied adapter and tower, and ``torch.save(model)`` can pickle it.
    """

    def __init__(self, adapter: MonaAdapter, tower: nn.Module) -> None:
        self.adapter = adapter
        self.tower = tower

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        context = call_context(self.tower)  # the batch the tower is running now
        if isinstance(self.tower, VisionTower):
            hidden = self.adapter(hidden, grid=context.get("grid"))
        else:
            hidden = self.adapter(hidden, mask=context.get("mask"))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of an HF encoder, found by shape rather than by path.

    Paths move between transformers versions (ViT's ``encoder.layer`` became ``layers``); the
    longest ``ModuleList`` whose blocks own an attention module is stable.
    """
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            first = module[0]
            if any(hasattr(first, name) for name in _ATTENTION_NAMES) and (
                best is None or len(module) > len(best)
            ):
                best = module
    if best is None:
        raise ValueError(f"no transformer layer stack found in {type(model).__name__}")
    return best


def _attention_of(layer: nn.Module) -> nn.Module:
    for name in _ATTENTION_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise ValueError(f"no attention module in {type(layer).__name__}")


def _attach_mona(tower: VisionTower | TextTower, spec: dict[str, Any], text_length: int) -> None:
    spatial = isinstance(tower, VisionTower)
    if spatial:
        config = tower.model.config
        size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
        patch = (
            config.patch_size if isinstance(config.patch_size, (list, tuple)) else (config.patch_size,) * 2
        )
        filter_size: tuple[int, ...] = (size[0] // patch[0], size[1] // patch[1])
    else:
        filter_size = (text_length,)
    adapters = nn.ModuleList()
    hooks = []
    for layer in transformer_layers(tower.model):
        for target in (_attention_of(layer), layer):
            adapter = MonaAdapter(
                tower.hidden_size,
                bottleneck=int(spec["bottleneck"]),
                kernel_sizes=tuple(spec["kernel_sizes"]),
                filter_size=filter_size,
                spatial=spatial,
                prefix_tokens=getattr(tower, "num_prefix_tokens", 0),
                dropout=float(spec["dropout"]),
                use_filter=bool(spec["filter"]),
            )
            hooks.append(target.register_forward_hook(_MonaHook(adapter, tower)))
            adapters.append(adapter)
    device = next(tower.parameters()).device
    tower.mona = adapters.to(device)
    tower._adapter_hooks = hooks


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def _default_lora_targets(model: nn.Module) -> list[str]:
    """q and v projections, under whichever names this architecture uses."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["q", "v"]):
        if set(pair) <= names:
            return pair
    raise ValueError(f"cannot guess LoRA target modules for {type(model).__name__}; set target_modules")


def _attach_lora(tower: nn.Module, spec: dict[str, Any]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = spec["target_modules"] or _default_lora_targets(tower.model)
    was_trainable = {name for name, p in tower.model.named_parameters() if p.requires_grad}
    config = LoraConfig(
        r=int(spec["r"]),
        lora_alpha=float(spec["alpha"]),
        lora_dropout=float(spec["dropout"]),
        target_modules=list(targets),
        bias="none",
    )
    inject_adapter_in_model(config, tower.model)
    # peft freezes everything but LoRA; whether the base weights train is the spec's ``freeze``.
    for name, param in tower.model.named_parameters():
        base_name = name.replace(".base_layer.", ".")
        if not _is_adapter_param(name) and base_name in was_trainable:
            param.requires_grad = True


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _is_adapter_param(name: str) -> bool:
    return "lora_" in name or name.startswith("mona.") or ".mona." in name


def _normalise_spec(tower: str, spec: dict[str, Any]) -> dict[str, Any]:
    if tower not in TOWERS:
        raise ValueError(f"adapter spec key {tower!r} is not a tower; use {TOWERS}")
    kind = spec.get("type")
    if kind not in ADAPTER_TYPES:
        raise ValueError(f"{tower} adapter type must be one of {ADAPTER_TYPES}, got {kind!r}")
    defaults = _LORA_DEFAULTS if kind == "lora" else _MONA_DEFAULTS
    unknown = set(spec) - set(defaults) - {"type"}
    if unknown:
        raise ValueError(f"unknown {kind} options {sorted(unknown)} for {tower}; known: {sorted(defaults)}")
    return {**defaults, **spec}


def check_adapter_tower(tower_name: str, tower: nn.Module, kind: str) -> None:
    """An adapter of ``kind`` fits ``tower``, or a ValueError naming the tower and what to do instead.

    Mona hooks the attention and MLP blocks of medalign's ViT and text towers and convolves on
    their patch grid; LoRA injects into a transformers model's linear layers. Neither has a place
    in a convolutional network, and a silent no-op would train nothing.
    """
    tower_kind = getattr(tower, "kind", type(tower).__name__)
    if kind == "mona" and not isinstance(tower, (VisionTower, TextTower)):
        raise ValueError(
            f"Mona adapters need a transformer tower (clip_vision, vit or a text tower); the {tower_name} "
            f"tower is {tower_kind!r}: "
            + (CNN_TUNING if tower_name == "vision" else "use LoRA or trainable_blocks instead")
        )
    if kind == "lora" and not isinstance(getattr(tower, "model", None), nn.Module):
        raise ValueError(
            f"LoRA adapters go into a transformers model's layers; the {tower_name} tower is {tower_kind!r}, "
            f"a convolutional network: {CNN_TUNING}"
        )


def attach_adapters(model: DualEncoder, spec: dict[str, Any]) -> None:
    """Build the adapter modules of ``spec`` into ``model`` without recording it in the config.

    ``DualEncoder.__init__`` calls this with its own ``config.adapters``; use ``apply_adapters``
    everywhere else so the config (and hence a saved bundle) remembers the adapters.
    """
    for tower_name, raw in spec.items():
        tower_spec = _normalise_spec(tower_name, raw)
        tower = getattr(model, tower_name)
        check_adapter_tower(tower_name, tower, tower_spec["type"])
        if getattr(tower, "adapter_type", None) is not None:
            raise ValueError(f"the {tower_name} tower already has a {tower.adapter_type} adapter")
        if tower_spec["type"] == "lora":
            _attach_lora(tower, tower_spec)
        else:
            _attach_mona(tower, tower_spec, model.config.max_text_length)
        tower.adapter_type = tower_spec["type"]
        if tower_spec["freeze"]:
            _freeze(tower)


def apply_adapters(model: DualEncoder, spec: dict[str, Any]) -> DualEncoder:
    """Attach adapters in place, record them in ``model.config.adapters``, and return the model."""
    for tower_name, raw in spec.items():
        tower_spec = _normalise_spec(tower_name, raw)  # validate everything before changing anything
        check_adapter_tower(tower_name, getattr(model, tower_name), tower_spec["type"])
        if tower_name in model.config.adapters:
            raise ValueError(f"the {tower_name} tower already has an adapter in its config")
    attach_adapters(model, spec)
    model.config.adapters.update(copy.deepcopy(spec))
    return model


def last_blocks(tower: nn.Module, n: int) -> set[str]:
    """Names of the parameters of ``tower``'s last ``n`` repeated blocks and of what follows them.

    Blocks are found as ``optim.layer_decay`` finds them (``medalign.models.param_groups``): numbered
    children of a ``layer``/``layers``/``blocks``/... list, so this is the same "depth" for
    EfficientNet's MBConv blocks, a ViT's and a BERT's layers. What follows the last block (an
    EfficientNet's head convolution and norm, CLIP's post-layernorm) belongs to the top.
    """
    names = [f"t.{name}" for name, _ in tower.named_parameters()]
    depths = layer_depths(names, "t")
    total = next(iter(depths.values()))[1] if depths else 0
    if total == 0:
        raise ValueError(f"{type(tower).__name__} has no numbered blocks to leave trainable")
    if not 1 <= n <= total:
        raise ValueError(f"trainable_blocks must be between 1 and the tower's {total} blocks, got {n}")
    return {name[2:] for name, (depth, _) in depths.items() if depth > total - n}


def _freeze(tower: nn.Module, trainable_blocks: int = 0) -> None:
    keep = last_blocks(tower, trainable_blocks) if trainable_blocks else set()
    for name, param in tower.named_parameters():
        param.requires_grad = _is_adapter_param(name) or name in keep


def freeze_tower(model: nn.Module, tower: str, trainable_blocks: int = 0) -> nn.Module:
    """Stop training a tower's own weights, except its last ``trainable_blocks`` blocks (LiT's
    "locked" tower when 0, a partly tuned one otherwise); its adapters (if any) stay trainable.

    Also sets ``config.freeze_<tower>`` (and ``config.trainable_blocks[tower]`` when the model's
    config has that field) so a model rebuilt from its config freezes the same way.
    """
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    _freeze(getattr(model, tower), trainable_blocks)
    setattr(model.config, f"freeze_{tower}", True)
    blocks = getattr(model.config, "trainable_blocks", None)
    if isinstance(blocks, dict):
        if trainable_blocks:
            blocks[tower] = trainable_blocks
        else:
            blocks.pop(tower, None)
    elif trainable_blocks:
        raise ValueError(f"{type(model.config).__name__} has no trainable_blocks field to record the choice in")
    return model


def check_trainable_blocks(config: Any) -> None:
    """``trainable_blocks`` names frozen towers of the config with a positive block count."""
    for tower, n in config.trainable_blocks.items():
        if tower not in TOWERS:
            raise ValueError(f"trainable_blocks key {tower!r} is not a tower; use {TOWERS}")
        if not getattr(config, f"freeze_{tower}", False):
            raise ValueError(
                f"trainable_blocks.{tower} needs freeze_{tower}: true (it leaves the last blocks of a frozen "
                "tower trainable; an unfrozen tower trains every block already)"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"trainable_blocks.{tower} must be a positive number of blocks, got {n!r}")


def freeze_configured_towers(model: nn.Module) -> None:
    """Apply ``config.freeze_<tower>`` and ``config.trainable_blocks`` to a freshly built model."""
    blocks = getattr(model.config, "trainable_blocks", {}) or {}
    for tower in TOWERS:
        if getattr(model.config, f"freeze_{tower}", False) and getattr(model, tower, None) is not None:
            freeze_tower(model, tower, int(blocks.get(tower, 0)))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(n_trainable, n_total)`` parameter counts (shared tensors counted once)."""
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


__all__ = [
    "FrequencyFilter",
    "MonaAdapter",
    "apply_adapters",
    "attach_adapters",
    "check_adapter_tower",
    "check_trainable_blocks",
    "freeze_configured_towers",
    "freeze_tower",
    "last_blocks",
    "trainable_parameters",
    "transformer_layers",
]
