"""Imports every built-in importer module so that each registers itself."""

from importlib import import_module

BUILTIN_MODULES = (
    "busi",
    "folders",
    "images",
    "kvasir",
    "lgg",
    "llava",
    "lvit",
    "medmnist",
    "medpix",
    "mmendocl",
    "nextgen_uia",
    "r2gen",
)

for _module in BUILTIN_MODULES:
    import_module(f"medalign.data.importers.{_module}")
