"""Using a trained bundle: the Predictor, batch prediction, sliding windows, ONNX export,
modality routing and similar-case search.

``medalign.inference`` was the sliding-window module before 0.2; its names (``overlay``,
``save_mask``, ``predict_probabilities``) still resolve here for one release, with a
DeprecationWarning, from :mod:`medalign.inference.sliding_window`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    from medalign._aliases import SLIDING_WINDOW_NAMES

    if name in SLIDING_WINDOW_NAMES:
        warnings.warn(
            f"medalign.inference.{name} moved to medalign.inference.sliding_window.{name}; "
            "the old path works until medalign 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("medalign.inference.sliding_window"), name)
    raise AttributeError(f"module 'medalign.inference' has no attribute {name!r}")
