"""A trained model as files: weights, config, tokenizer, input record and model card.

The public way to save and load a bundle is this package: ``medalign.bundle.save_bundle``,
``medalign.bundle.load_bundle`` (the raw model; ``medalign.load`` wraps it in a Predictor).
:mod:`~medalign.bundle.store` reads and writes the files, :mod:`~medalign.bundle.inputs` is the
input record (which columns, channels and preprocessing the model expects) and
:mod:`~medalign.bundle.model_card` writes ``MODEL_CARD.md``.
"""

from __future__ import annotations

from medalign.bundle.store import (
    BUNDLE_FORMAT,
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    TOKENIZER_DIR,
    WEIGHTS_NAME,
    BundleError,
    is_pickle,
    load_bundle,
    read_bundle_config,
    resolve_bundle,
    save_bundle,
)

__all__ = [
    "BUNDLE_FORMAT",
    "CONFIG_NAME",
    "PICKLE_SUFFIXES",
    "TOKENIZER_DIR",
    "WEIGHTS_NAME",
    "BundleError",
    "is_pickle",
    "load_bundle",
    "read_bundle_config",
    "resolve_bundle",
    "save_bundle",
]
