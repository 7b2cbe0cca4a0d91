"""``python -m medalign.cli``: the console entry point."""

from medalign.cli import main

main()
