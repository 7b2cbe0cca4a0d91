"""Progress bars for every long loop (evaluation, embedding, generation, prediction).

One helper so every bar looks alike: count, rate and ETA on stderr, and switched off where
stderr is not a terminal, so CI logs and redirected output stay clean.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, unit: str = "batch", total: int | None = None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, dynamic_ncols=True, disable=None, leave=False)


def progress_bar(*, total: int, initial: int = 0, desc: str, unit: str = "it") -> Any:
    """A bar updated by hand (``.update(n)``), with the same look and the same terminal-only rule."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=None, leave=False)
