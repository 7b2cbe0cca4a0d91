"""Shared fixtures: real datasets live in ../shared/data and tests that need them skip without it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TinyQuickstart:
    """A finished tiny quickstart: ``workdir`` holds ``quickstart_out/`` (the README's paths are
    relative to it) and ``output`` is everything the command printed."""

    workdir: Path
    output: str

    @property
    def out(self) -> Path:
        return self.workdir / "quickstart_out"


TINY_QUICKSTART = ["quickstart", "--n", "60", "--steps", "2"]


@pytest.fixture(scope="session")
def tiny_quickstart(tmp_path_factory: pytest.TempPathFactory) -> TinyQuickstart:
    """``medalign quickstart --n 60 --steps 2`` run once per session (about 40 s on 2 cores), as a
    user runs it: the console command in a fresh folder, output piped as in a CI log. Tests of the
    quickstart and of the README's examples share it."""
    workdir = tmp_path_factory.mktemp("quickstart")
    result = subprocess.run(
        [sys.executable, "-m", "medalign.cli", *TINY_QUICKSTART], cwd=workdir, capture_output=True, text=True,
        timeout=900, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    if result.returncode:
        pytest.fail(f"`medalign {' '.join(TINY_QUICKSTART)}` failed ({result.returncode}):\n{output[-4000:]}")
    return TinyQuickstart(workdir, output)
