"""The medalign CLI with one checkpoint write failing, for the fault tests.

``python faulty_cli.py FAULT N train --config ...`` runs ``medalign train ...`` with the Nth
``torch.save`` (the Nth checkpoint: nothing else in a run uses it) failing as FAULT says, or
(FAULT ``kill-at-step``) with the process SIGKILLed right after optimizer step N:

* ``kill``: half of the checkpoint's bytes reach its temporary file, then the process is
  SIGKILLed, as by the OOM killer or a pre-empted node.
* ``full``: the temporary file's descriptor is pointed at /dev/full, so the kernel answers the
  write with a real ENOSPC (disk full), through Python's file object and torch's writer.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch


def faulty_save(fault: str, nth: int) -> Callable[..., Any]:
    """``torch.save`` whose ``nth`` call fails as ``fault`` (``kill`` or ``full``) says."""
    real_save = torch.save
    calls = 0

    def save(obj: Any, file: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls != nth:
            return real_save(obj, file, *args, **kwargs)
        if fault == "full":
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, getattr(file, "handle", file).fileno())
            os.close(full)
            return real_save(obj, file, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        return None

    return save


def kill_at_step(step: int) -> Callable[[int], None]:
    """An ``Engine.after_step`` hook that SIGKILLs the process after optimizer step ``step``."""

    def hook(done: int) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def kill_engines_at(step: int) -> None:
    """Every Engine this process creates gets :func:`kill_at_step` (the CLI builds its own)."""
    from medalign.training.engine import Engine

    init = Engine.__init__

    def patched(self: Engine, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.after_step.append(kill_at_step(step))

    Engine.__init__ = patched  # type: ignore[method-assign]


if __name__ == "__main__":
    from medalign.cli import main

    if sys.argv[1] == "kill-at-step":
        kill_engines_at(int(sys.argv[2]))
    else:
        torch.save = faulty_save(sys.argv[1], int(sys.argv[2]))
    main(sys.argv[3:])
