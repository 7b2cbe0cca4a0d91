"""medalign: multi-modal medical image analysis with contrastive learning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(name_or_path: str) -> Any:
    """Load a model bundle (a local folder, or a hub id when online) with no other setup."""
    from medalign.bundle import load_bundle

    return load_bundle(name_or_path)


__all__ = ["__version__", "load"]
