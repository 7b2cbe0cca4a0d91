"""medalign."""
