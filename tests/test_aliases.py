"""The flat layout's import paths keep working for one release, each with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys

import pytest

from medalign._aliases import MOVED_MODULES, MOVED_NAMES


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_warns_and_forwards(old: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED_MODULES[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED_MODULES[old])
    public = [n for n in vars(new) if not n.startswith("_")]
    assert public and all(getattr(module, n) is getattr(new, n) for n in public)


@pytest.mark.parametrize(("old", "name"), sorted(MOVED_NAMES))
def test_a_function_that_left_its_module_is_found_at_the_old_path(old: str, name: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(MOVED_NAMES[old, name]), name)


def test_the_old_sliding_window_module_names_resolve_from_the_inference_package() -> None:
    from medalign.inference import sliding_window

    with pytest.warns(DeprecationWarning, match="sliding_window"):
        from medalign.inference import overlay
    assert overlay is sliding_window.overlay


def test_an_unknown_old_name_is_an_attribute_error() -> None:
    sys.modules.pop("medalign.run", None)
    with pytest.warns(DeprecationWarning):
        module = importlib.import_module("medalign.run")
    with pytest.raises(AttributeError):
        _ = module.no_such_function
