"""Rewrite (or ``--check``) every script-written block of README.md and BENCHMARKS.md.

Each ``benchmarks/bench_*.py`` (and ``fuzz.py``) that defines ``blocks()`` renders its blocks from the committed
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

# Marker blocks that hold no measured numbers and so are written by no benchmark script.
NOT_MEASURED = {
    "install": "the install command CI reads from the README",
    "quickstart": "the quickstart command the README gives (CI runs it tiny)",
    "tests": "the test command CI reads from the README",
    "browser": "the command that installs the browser for the demo test",
}
# Blocks whose script has not been converted to results files yet (owned by other work in
# flight); listed so that they are not forgotten: remove an entry when its script defines blocks().
AWAITING_CONVERSION = {
    "bench_pretrain": "benchmarks/bench_pretrain.py (issue 20)",
    "bench_curriculum_ablation": "benchmarks/bench_curriculum.py (issue 20)",
    "bench_curriculum_label_efficiency": "benchmarks/bench_curriculum.py (issue 20)",
}


def all_blocks() -> dict[str, str]:
    """marker name -> rendered markdown, from every script that defines ``blocks()``."""
    blocks: dict[str, str] = {}
    folder = Path(benchlib.REPO / "benchmarks")
    for script in [*sorted(folder.glob("bench_*.py")), folder / "fuzz.py"]:
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
    """One line per block whose committed text differs from its rendering (or has no markers), and
    per doc block that no script renders (its numbers would have no results file behind them)."""
    existing = benchlib.doc_blocks()
    rendered = all_blocks()
    problems = [
        f"{name} ({path.name}): no benchmark script renders it (no results file behind its numbers)"
        for name, (path, _) in existing.items()
        if name not in rendered and name not in NOT_MEASURED and name not in AWAITING_CONVERSION
    ]
    problems += [f"{name}: listed as awaiting conversion but its script renders it now" for name in AWAITING_CONVERSION if name in rendered]
    for name, body in rendered.items():
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
