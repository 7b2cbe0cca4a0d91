"""Shared fixtures: real datasets live in ../shared/data and tests that need them skip without it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDALIGN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real public datasets; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set MEDALIGN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_dataset(shared_data: Path):
    """``real_dataset("busi")`` -> path of that dataset, skipping the test when it is missing."""

    def get(name: str) -> Path:
        path = shared_data / name
        if not path.is_dir():
            pytest.skip(f"dataset {name!r} not present in {shared_data}")
        return path

    return get


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module's tests, restored after it.

    Tiny tensors: a second OpenMP thread only adds barrier waits, which stall on a busy machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
