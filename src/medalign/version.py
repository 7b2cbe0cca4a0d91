"""The package version, in a module of its own so every layer can read it without importing the
root package (whose ``medalign.load`` reaches the inference layer)."""

__version__ = "0.1.0"
