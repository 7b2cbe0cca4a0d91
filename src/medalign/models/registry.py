"""Model registry: one function per architecture, named after it (the timm convention).

``@register_model`` on ``def align_tiny(**overrides) -> nn.Module`` makes ``create_model("align_tiny")``
work everywhere a name is accepted (YAML recipes, the CLI, bundles), so adding an architecture never
means editing a factory ``if/elif``. Entry functions take keyword overrides only, which keeps every
architecture constructible from a name plus data.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

EntryPoint = Callable[..., nn.Module]
F = TypeVar("F", bound=EntryPoint)

_ENTRYPOINTS: dict[str, EntryPoint] = {}


def register_model(fn: F) -> F:
    """Register ``fn`` under its own ``__name__``; a second registration of a name is an error.

    Silently replacing an entry would let two modules disagree about what a name means, and a
    bundle saved under that name would load a different architecture depending on import order.
    """
    name = fn.__name__
    if name in _ENTRYPOINTS:
        existing = _ENTRYPOINTS[name]
        raise ValueError(
            f"model {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
        )
    _ENTRYPOINTS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern`` (``"*minilm*"``), sorted."""
    return sorted(name for name in _ENTRYPOINTS if fnmatch.fnmatchcase(name, pattern))


def is_model(name: str) -> bool:
    return name in _ENTRYPOINTS


def model_entrypoint(name: str) -> EntryPoint:
    """The registered function; unknown names raise ``KeyError`` naming the closest matches."""
    try:
        return _ENTRYPOINTS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_ENTRYPOINTS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (registered: {', '.join(list_models())})") from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered architecture; ``overrides`` replace fields of its default config."""
    return model_entrypoint(name)(**overrides)
