"""Every script-written block of README.md and BENCHMARKS.md equals its rendering from the
committed results files (``benchmarks/render_docs.py --check``): a number typed by hand, or a
results file changed without rewriting its block, fails here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def render_docs():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import render_docs

        yield render_docs
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_block_matches_its_results_file(render_docs) -> None:
    assert render_docs.differences() == []


def test_a_changed_number_is_caught(render_docs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchlib

    doc = tmp_path / "DOC.md"
    doc.write_text("intro\n<!-- demo:begin -->\n| a | 0.812 |\n<!-- demo:end -->\nrest\n", encoding="utf-8")
    monkeypatch.setattr(benchlib, "DOCS", (doc,))
    monkeypatch.setattr(render_docs, "all_blocks", lambda: {"demo": "| a | 0.812 |"})
    assert render_docs.differences() == []
    doc.write_text(doc.read_text().replace("0.812", "0.821"), encoding="utf-8")
    assert render_docs.differences() == ["demo (DOC.md): differs from its results file's rendering"]
    benchlib.write_blocks({"demo": "| a | 0.812 |"}, (doc,))
    assert doc.read_text() == "intro\n<!-- demo:begin -->\n| a | 0.812 |\n<!-- demo:end -->\nrest\n"


def test_a_block_no_script_renders_is_caught(render_docs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Numbers between markers with no results file behind them (typed by hand) fail too."""
    import benchlib

    doc = tmp_path / "DOC.md"
    doc.write_text("<!-- typed:begin -->\n| a | 0.9 |\n<!-- typed:end -->\n<!-- quickstart:begin -->\nx\n<!-- quickstart:end -->\n")
    monkeypatch.setattr(benchlib, "DOCS", (doc,))
    monkeypatch.setattr(render_docs, "all_blocks", lambda: {})
    assert render_docs.differences() == [
        "typed (DOC.md): no benchmark script renders it (no results file behind its numbers)"
    ]


def test_publish_fills_a_pending_section(render_docs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A section whose numbers were removed keeps a pending marker; the next run writes its block there."""
    import benchlib

    doc = tmp_path / "DOC.md"
    doc.write_text("## X\n\nWritten by `x.py` (no current results file).\n\n<!-- demo:pending -->\n\n## Y\n")
    monkeypatch.setattr(benchlib, "DOCS", (doc,))
    monkeypatch.setattr(benchlib, "RESULTS", tmp_path / "results")
    body = benchlib.publish("demo", {"value": 0.5}, lambda r: f"| v | {r['value']:.2f} |", "## unused")
    assert body == "| v | 0.50 |"
    assert doc.read_text() == "## X\n\nWritten by `x.py`.\n\n<!-- demo:begin -->\n| v | 0.50 |\n<!-- demo:end -->\n\n## Y\n"
    assert benchlib.load_results("demo") == {"value": 0.5}
