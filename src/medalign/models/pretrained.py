"""Loading pretrained weights into a tower: loudly, and adapted to the data's channels and size.

Shared by every tower family (``towers`` for transformers ViT/text models, ``cnn_towers`` for
EfficientNet-Lite, ``hf_vision`` for any other transformers vision model):

* ``from_pretrained_checked`` loads a transformers checkpoint and fails when weights are
  missing or mismatched (a "pretrained" tower that silently stayed random would train and
  evaluate with no visible error);
* ``adapt_patch_embedding`` turns a pretrained RGB first layer (patch embedding or stem
  convolution) into one for 1 or C channels without throwing its filters away;
* ``resample_position_embeddings`` moves a ViT's position table to another patch grid.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medalign.models.tower_config import resolve_source

NON_ARCH_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
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


OFFLINE_VISION = (
    "with no network use a shipped one (vision.source: efficientnet-lite0 | efficientnet-lite1 | "
    "efficientnet-lite2) or a local folder written by save_pretrained"
)


def unavailable_message(source: str | None, err: Exception, hint: str) -> str:
    """One line: which model could not be loaded, the first line of why, and what works offline."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"model {source!r} could not be loaded ({first}); {hint}"


def from_pretrained_checked(
    model_cls: Any, source: str, *, offline_hint: str | None = None, **kwargs: Any
) -> nn.Module:
    """``from_pretrained`` that fails loudly when the checkpoint does not cover the model.

    A "pretrained" tower whose weights silently stayed random (wrong ``kind`` for the checkpoint,
    a renamed key) would train and evaluate without any visible error. A checkpoint that cannot
    be fetched (no network, not cached) is one line naming it, plus ``offline_hint``.
    """
    path = resolve_source(source)
    try:
        with quiet_transformers():
            model, info = model_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except OSError as err:
        if offline_hint is None:
            raise
        raise OSError(unavailable_message(source, err, offline_hint)) from None
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ValueError(
            f"{model_cls.__name__} from {source!r} does not match the checkpoint: "
            + "; ".join(f"{k}: {v[:8]}{' ...' if len(v) > 8 else ''}" for k, v in problems.items() if v)
        )
    return model


def hf_config_dict(config: Any) -> dict[str, Any]:
    """The full HF config as JSON-safe data (int label keys and dtypes become strings)."""
    data = json.loads(config.to_json_string(use_diff=False))
    for key in NON_ARCH_KEYS:
        data.pop(key, None)
    return data



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
