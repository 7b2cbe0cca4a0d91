"""medalign: multi-modal medical image analysis with contrastive learning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medalign import _aliases
from medalign.version import __version__

if TYPE_CHECKING:
    from medalign.inference.predict import Predictor

_aliases.install()  # old flat import paths (medalign.pipeline.run, medalign.evaluation.metrics, ...) for one release


def load(name_or_path: str, **options: Any) -> Predictor:
    """Load a model bundle (a local folder, or a hub id when online) as a :class:`~medalign.inference.predict.Predictor`.

    ``options`` go to the Predictor (``batch_size``, ``normalisation``). The raw model is
    ``predictor.model``; other attributes and calls are forwarded to it, so code that used the
    model returned by earlier versions keeps working. ``medalign.bundle.load_bundle`` returns
    the raw model.
    """
    from medalign.inference.predict import Predictor

    return Predictor.from_bundle(name_or_path, **options)


__all__ = ["__version__", "load"]
