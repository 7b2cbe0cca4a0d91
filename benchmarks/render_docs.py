"""Rewrite (or ``--check``) every script-written block of README.md and BENCHMARKS.md.

Each ``benchmarks/bench_*.py`` that defines ``blocks()`` renders its blocks from the committed
``benchmarks/results/*.json`` files alone (see ``benchlib``); this script collects them all.

    python benchmarks/render_docs.py           # rewrite every block from the results files
    python benchmarks/render_docs.py --check   # exit 1 listing every block that differs
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import benchlib


def all_blocks() -> dict[str, str]:
    """marker name -> rendered markdown, from every script that defines ``blocks()``."""
    blocks: dict[str, str] = {}
    for script in sorted(Path(benchlib.REPO / "benchmarks").glob("bench_*.py")):
        module = importlib.import_module(script.stem)
        render = getattr(module, "blocks", None)
        if render is None:
            continue
        for name, body in render().items():
            if name in blocks:
                raise ValueError(f"block {name!r} is rendered by two scripts (the second: {script.name})")
            blocks[name] = body
    return blocks


def differences() -> list[str]:
    """One line per block whose committed text differs from its rendering (or has no markers)."""
    existing = benchlib.doc_blocks()
    problems = []
    for name, body in all_blocks().items():
        if name not in existing:
            problems.append(f"{name}: rendered but no markers in README.md or BENCHMARKS.md")
        elif existing[name][1] != body.strip("\n"):
            problems.append(f"{name} ({existing[name][0].name}): differs from its results file's rendering")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on any difference")
    args = parser.parse_args()
    if args.check:
        problems = differences()
        print("\n".join(problems) or "every block matches its results file")
        sys.exit(1 if problems else 0)
    benchlib.write_blocks(all_blocks())


if __name__ == "__main__":
    main()
