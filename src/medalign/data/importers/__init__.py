"""Importers for the dataset layouts people have; ``IMPORTERS[name]`` is the registry.

Importing this package registers every built-in importer.
"""

from medalign.data.importers import _builtin  # noqa: F401  (registers importers)
from medalign.data.importers.registry import (
    IMPORTERS,
    DatasetImportError,
    ImporterSpec,
    get_importer,
    import_dataset,
    list_importers,
    load_dataset,
    register_importer,
)

__all__ = [
    "IMPORTERS",
    "DatasetImportError",
    "ImporterSpec",
    "get_importer",
    "import_dataset",
    "list_importers",
    "load_dataset",
    "register_importer",
]
