"""Figures written beside a run's metrics: reliability diagrams and Kaplan-Meier curves (PNG).

Headless: matplotlib's Agg backend through the object API (``Figure``), never ``pyplot``, so
plotting works on servers and inside worker processes and never touches global figure state.
Inputs are the JSON-ready dicts of :mod:`medalign.evaluation.metrics` (``reliability_curve``,
``kaplan_meier``), so a figure can be redrawn from a ``metrics.json`` alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _figure(width: float = 4.5, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def reliability_diagram(curve: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Bars of per-bin accuracy against the diagonal of perfect calibration; ECE in the legend.

    ``curve`` is :func:`medalign.evaluation.metrics.reliability_curve`'s dict; empty bins draw no bar.
    """
    edges = curve["edges"]
    width = edges[1] - edges[0]
    lefts = [e for e, a in zip(edges[:-1], curve["accuracy"], strict=True) if a is not None]
    heights = [a for a in curve["accuracy"] if a is not None]
    confidences = [c for c in curve["confidence"] if c is not None]
    figure = _figure()
    ax = figure.add_subplot()
    ax.bar(lefts, heights, width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.scatter(confidences, heights, color="tab:red", s=12, zorder=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"reliability (n={curve['n']}, ECE={curve['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def kaplan_meier_plot(
    groups: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    p_value: float | None = None,
    title: str = "Kaplan-Meier by predicted risk group",
    time_label: str = "time",
) -> Path:
    """One survival step curve per group (``{name: kaplan_meier(...) dict}``), censorings as ticks.

    The log-rank ``p_value``, when given, goes into the title.
    """
    figure = _figure(5.0, 4.0)
    ax = figure.add_subplot()
    for name, km in groups.items():
        times = [0.0, *km["time"]]
        survival = [1.0, *km["survival"]]
        (line,) = ax.step(times, survival, where="post", label=f"{name} (n={km['at_risk'][0]})")
        ticks = [(t, s) for t, s, c in zip(km["time"], km["survival"], km["censored"], strict=True) if c]
        if ticks:
            ax.plot(*zip(*ticks, strict=True), "|", color=line.get_color(), markersize=8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(time_label)
    ax.set_ylabel("survival probability")
    ax.set_title(title + (f"\nlog-rank p = {p_value:.3g}" if p_value is not None else ""), fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    return _save(figure, path)
