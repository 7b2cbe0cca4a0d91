"""The shared progress bar: every item passes through, and it stays silent off a terminal."""

from __future__ import annotations

import io
import sys

import pytest

from medalign.progress import progress, progress_bar


def test_items_pass_through_and_no_bar_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    captured = io.StringIO()  # not a TTY, like CI logs and redirected output
    monkeypatch.setattr(sys, "stderr", captured)
    bar = progress(iter(range(5)), desc="evaluate", total=5)
    assert list(bar) == [0, 1, 2, 3, 4]
    assert bar.disable and captured.getvalue() == ""


def test_a_terminal_gets_count_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    assert list(progress(range(3), desc="predict", unit="image")) == [0, 1, 2]
    shown = screen.getvalue()
    assert "predict:" in shown and "/3 [" in shown and "image/s" in shown  # count of total, elapsed<ETA, rate
    assert shown.endswith("\r")  # leave=False: the finished bar clears its line


def test_the_training_bar_is_silent_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's bar (updated by hand): no carriage returns in a piped log."""
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    bar = progress_bar(total=3, desc="train")
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert bar.disable and captured.getvalue() == ""
