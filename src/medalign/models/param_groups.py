"""Optimiser parameter groups: weight decay where it belongs and a learning rate per part of the model.

Fine-tuning a pretrained tower wants smaller steps than the new layers on top of it (LiT,
ULMFiT, BEiT's layer-wise decay): the recipe says so with two ``optim`` keys, both keyed by a
parameter-name prefix (a dotted module path such as ``vision``, ``text``, ``encoder.stem``):

* ``lr_multipliers: {vision: 0.1, text: 0.05}`` scales the learning rate of every parameter
  under that prefix (the longest matching prefix wins);
* ``layer_decay: {vision: 0.75}`` scales it further by ``decay ** (L + 1 - depth)`` inside that
  module, where the module's repeated blocks (``layers.3``, ``blocks.7``, ``stages.2``, ...) have
  depth 1..L in order, what comes before the first block (embeddings, stem) depth 0 and what
  comes after the last (final norm, head) depth L + 1, i.e. the full rate.

A prefix that matches no trainable parameter is an error naming the top-level modules, so a
typo cannot silently leave a tower at the full rate. Biases, norms, the logit scale/bias and
other 1-D parameters get no weight decay.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from torch import nn

BLOCK_NAMES = frozenset({"layer", "layers", "block", "blocks", "stages", "resblocks", "h"})


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _longest_prefix(name: str, prefixes: dict[str, float]) -> str | None:
    found = [p for p in prefixes if _matches(name, p)]
    return max(found, key=len) if found else None


def _block_index(relative: str) -> int | None:
    """Index of the repeated block a parameter sits in (``encoder.layers.3.mlp.fc1`` -> 3), if any."""
    parts = relative.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in BLOCK_NAMES and re.fullmatch(r"\d+", parts[i + 1]):
            return int(parts[i + 1])
    return None


def layer_depths(names: list[str], prefix: str) -> dict[str, tuple[int, int]]:
    """``name -> (depth, L)`` for the parameters under ``prefix`` (see the module doc)."""
    under = [n for n in names if _matches(n, prefix)]
    indices = {n: _block_index(n[len(prefix) + 1 :]) for n in under}
    blocks = sorted({i for i in indices.values() if i is not None})
    rank = {index: depth for depth, index in enumerate(blocks, start=1)}
    total = len(blocks)
    depths: dict[str, tuple[int, int]] = {}
    seen_block = False
    for name in under:  # registration order: what precedes the first block is the input side
        index = indices[name]
        if index is not None:
            seen_block = True
            depths[name] = (rank[index], total)
        else:
            depths[name] = (total + 1 if seen_block else 0, total)
    return depths


def lr_multiplier(
    name: str,
    multipliers: dict[str, float],
    depths: dict[str, dict[str, tuple[int, int]]],
    decays: dict[str, float],
) -> float:
    factor = 1.0
    prefix = _longest_prefix(name, multipliers)
    if prefix is not None:
        factor *= multipliers[prefix]
    prefix = _longest_prefix(name, decays)
    if prefix is not None:
        depth, total = depths[prefix][name]
        factor *= decays[prefix] ** (total + 1 - depth)
    return factor


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def check_prefixes(model: nn.Module, multipliers: dict[str, float], decays: dict[str, float]) -> None:
    names = [n for n, _ in _trainable(model)]
    for key, table in (("lr_multipliers", multipliers), ("layer_decay", decays)):
        for prefix, value in table.items():
            if not value > 0:
                raise ValueError(f"optim.{key}.{prefix} must be > 0 (freeze a tower instead), got {value}")
            if not any(_matches(n, prefix) for n in names):
                top = sorted({n.split(".")[0] for n in names})
                raise ValueError(
                    f"optim.{key}: no trainable parameter under {prefix!r}; top-level modules: {top}"
                )


def parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    multipliers: dict[str, float] | None = None,
    decays: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups, one per (learning-rate multiplier, decay or not); each records its multiplier."""
    multipliers, decays = dict(multipliers or {}), dict(decays or {})
    check_prefixes(model, multipliers, decays)
    trainable = list(_trainable(model))
    names = [n for n, _ in trainable]
    depths = {prefix: layer_depths(names, prefix) for prefix in decays}
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in trainable:
        factor = lr_multiplier(name, multipliers, depths, decays)
        no_decay = param.ndim < 2 or "logit" in name
        group = groups.setdefault(
            (factor, no_decay),
            {
                "params": [],
                "lr": lr * factor,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_multiplier": factor,
            },
        )
        group["params"].append(param)
    return sorted(groups.values(), key=lambda g: (-g["lr_multiplier"], g["weight_decay"] == 0.0))
