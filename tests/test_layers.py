"""The import contract of docs/ARCHITECTURE.md, checked with import-linter on every test run.

pyproject.toml's ``[tool.importlinter]`` holds two contracts: the stages form layers (each
imports only the stages below it) and no sibling packages or modules import each other in a
cycle. This test is that check inside the README's test command, so CI enforces it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_import_contract_holds() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
         f"sys.exit(lint_imports(config_filename={str(REPO / 'pyproject.toml')!r}, no_cache=True))"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_contract_names_every_stage_package() -> None:
    """A new top-level package must be placed in a layer, or nothing checks what it imports."""
    import tomllib

    layers = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    named = {
        name.strip()
        for contract in layers["contracts"]
        if contract["type"] == "layers"
        for layer in contract["layers"]
        for name in layer.split("|")
    }
    source = REPO / "src" / "medalign"
    packages = {f"medalign.{p.name}" for p in source.iterdir() if (p / "__init__.py").is_file()}
    modules = {f"medalign.{p.stem}" for p in source.glob("*.py") if not p.stem.startswith("_")}
    assert sorted((packages | modules) - named) == []


def test_a_module_above_600_lines_says_why_at_its_top() -> None:
    """Long modules are split by stage or kind; the few that stay whole give their reason."""
    unexplained = []
    for path in sorted((REPO / "src" / "medalign").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        first_import = next((i for i, line in enumerate(lines) if line.startswith(("from ", "import "))), 0)
        if len(lines) > 600 and not any(line.startswith("# Why one module:") for line in lines[:first_import]):
            unexplained.append(f"{path.relative_to(REPO)} ({len(lines)} lines)")
    assert unexplained == []
