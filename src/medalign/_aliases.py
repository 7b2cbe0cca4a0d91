"""Old import paths of the flat layout (before 0.2), kept working for one release with a warning.

``import medalign.run`` or ``from medalign.metrics import classification_metrics`` still work:
one meta-path finder answers every old module name with a stand-in module that forwards
attribute access to the new home (and, for the few functions that moved to another module,
to theirs) and raises a :class:`DeprecationWarning` naming the new path. No file sits at an
old path, so the package tree shows only the new layout. Remove this module in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# old module -> new module
MOVED_MODULES: dict[str, str] = {
    "medalign.inputs": "medalign.bundle.inputs",
    "medalign.model_card": "medalign.bundle.model_card",
    "medalign.engine": "medalign.training.engine",
    "medalign.param_groups": "medalign.models.param_groups",
    "medalign.zeroshot": "medalign.evaluation.zeroshot",
    "medalign.probe": "medalign.evaluation.probe",
    "medalign.textmetrics": "medalign.evaluation.textmetrics",
    "medalign.evaluate": "medalign.evaluation.alignment",
    "medalign.plots": "medalign.evaluation.plots",
    "medalign.html_report": "medalign.reporting.html_report",
    "medalign.run": "medalign.pipeline.run",
    "medalign.curriculum": "medalign.pipeline.curriculum",
    "medalign.quickstart": "medalign.pipeline.quickstart",
    "medalign.predict": "medalign.inference.predict",
    "medalign.batch_predict": "medalign.inference.batch_predict",
    "medalign.export": "medalign.inference.export",
    "medalign.routing": "medalign.inference.routing",
    "medalign.retrieval": "medalign.inference.case_index",
    "medalign.metrics": "medalign.evaluation.metrics",
}

# (old module, name) -> module that holds it now, for functions that left their module
MOVED_NAMES: dict[tuple[str, str], str] = {
    **{("medalign.run", n): "medalign.data.run_manifest" for n in
       ("manifest_file", "load_run_manifest", "modality_rows", "subsample_train")},
    **{("medalign.run", n): "medalign.tasks.columns" for n in
       ("image_columns", "fusion_columns", "per_modality_data", "check_num_classes", "modality_subsets")},
    **{("medalign.run", n): "medalign.tasks.align" for n in ("texts_from_labels", "evaluate_alignment")},
    **{("medalign.run", n): "medalign.tasks.segment" for n in ("segmentation_dataset", "evaluate_segmentation")},
    **{("medalign.run", n): "medalign.tasks.fuse" for n in ("fusion_dataset", "evaluate_fusion")},
    ("medalign.html_report", "run_manifest_path"): "medalign.data.run_manifest",
    ("medalign.html_report", "flatten_scalars"): "medalign.bundle.model_card",
}

# names of the old ``medalign.inference.sliding_window`` module, which is now the inference package
SLIDING_WINDOW_NAMES = ("SW_BATCH_SIZE", "predict_probabilities", "overlay", "save_mask")


class _Forward(types.ModuleType):
    """A stand-in for an old module: attributes come from the new home."""

    def __init__(self, old: str, new: str) -> None:
        super().__init__(old, f"Deprecated alias of {new}.")
        self.__dict__["_new"] = new

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        home = MOVED_NAMES.get((self.__name__, name), self.__dict__["_new"])
        return getattr(importlib.import_module(home), name)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(importlib.import_module(self.__dict__["_new"]))))


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path works until medalign 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return _Forward(spec.name, new)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader())
        return None


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``import medalign`` does this)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
