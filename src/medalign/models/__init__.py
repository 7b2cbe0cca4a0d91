"""Models: a timm-style registry of image-text architectures built from plain-data configs.

Importing this package registers every built-in architecture, so ``create_model(name)`` works
after ``import medalign.models``. A module that adds architectures must be imported here too.
"""

from medalign.models import fusion as _fusion  # noqa: F401  (registers models)
from medalign.models import heads as _heads  # noqa: F401  (registers models)
from medalign.models import instruct as _instruct  # noqa: F401  (registers models)
from medalign.models import mae as _mae  # noqa: F401  (registers models)
from medalign.models import report as _report  # noqa: F401  (registers models)
from medalign.models import segmentation as _segmentation  # noqa: F401  (registers models)
from medalign.models import text_guided as _text_guided  # noqa: F401  (registers models)
from medalign.models.adapters import apply_adapters, freeze_tower, trainable_parameters
from medalign.models.dual_encoder import DualEncoder, DualEncoderConfig
from medalign.models.registry import create_model, list_models, model_entrypoint, register_model
from medalign.models.towers import TowerConfig, build_text_tower, build_tokenizer, build_vision_tower

__all__ = [
    "DualEncoder",
    "DualEncoderConfig",
    "TowerConfig",
    "apply_adapters",
    "build_text_tower",
    "build_tokenizer",
    "build_vision_tower",
    "create_model",
    "freeze_tower",
    "list_models",
    "model_entrypoint",
    "register_model",
    "trainable_parameters",
]
