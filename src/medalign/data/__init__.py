"""Data contract: manifest, readers, importers, phantom, datasets and transforms."""
