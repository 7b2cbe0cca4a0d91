"""Random-number states of the CPU and of the accelerator a model runs on (CUDA or MPS).

Dropout masks, stochastic depth and random masking draw from the generator of the device their
tensors live on: the CPU generator for a CPU model, the CUDA (or MPS) generator of the model's
GPU otherwise. Two places must put every generator that a forward pass draws from back where it
was, or results that are "identical" on a CPU silently differ on a GPU:

* GradCache replays each micro-batch's forward pass with a graph after the cached pass without
  one; the replay must draw the same dropout masks, so :class:`RngSnapshot` records the states
  before the first pass and :meth:`RngSnapshot.replay` restores them inside
  ``torch.random.fork_rng(devices=...)``, which also gives the generators back afterwards;
* checkpoints: :func:`rng_state` / :func:`load_rng_state` save and restore the CPU state and the
  state of every accelerator device in use, so a resumed run draws what the uninterrupted one
  would have drawn.

With several processes (DDP) each rank's accelerator is its own device; checkpoints are written
by rank 0 and hold rank 0's generators, as they hold rank 0's CPU generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

ACCELERATORS = ("cuda", "mps")


def accelerator(device: torch.device | str) -> tuple[str | None, list[int]]:
    """(device type, device indices) whose generators a model on ``device`` draws from besides the
    CPU's: ``("cuda", [i])`` for ``cuda:i``, ``("mps", [0])`` for MPS, ``(None, [])`` on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda", [device.index if device.index is not None else torch.cuda.current_device()]
    if device.type == "mps":
        return "mps", [0]
    return None, []


def _module(device_type: str) -> Any:
    return torch.cuda if device_type == "cuda" else torch.mps


@dataclass(frozen=True)
class RngSnapshot:
    """The CPU generator and the accelerator generators of one device, at one moment."""

    cpu: torch.Tensor
    device_type: str | None
    devices: tuple[int, ...]
    device_states: tuple[torch.Tensor, ...]

    @classmethod
    def capture(cls, device: torch.device | str) -> RngSnapshot:
        device_type, devices = accelerator(device)
        states = tuple(_module(device_type).get_rng_state(i) for i in devices) if device_type else ()
        return cls(torch.get_rng_state(), device_type, tuple(devices), states)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device_type:
            for index, state in zip(self.devices, self.device_states, strict=True):
                _module(self.device_type).set_rng_state(state, index)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Draw from the snapshot's states inside the block; the generators continue afterwards
        from where they were before it (``torch.random.fork_rng`` on the same devices)."""
        with torch.random.fork_rng(devices=list(self.devices), device_type=self.device_type or "cuda"):
            self.restore()
            yield


def rng_state(device: torch.device | str) -> dict[str, Any]:
    """Checkpoint form: ``{"cpu": state, "<cuda|mps>": {index: state}}`` for the devices in use."""
    snapshot = RngSnapshot.capture(device)
    state: dict[str, Any] = {"cpu": snapshot.cpu}
    if snapshot.device_type:
        state[snapshot.device_type] = dict(zip(snapshot.devices, snapshot.device_states, strict=True))
    return state


def load_rng_state(state: dict[str, Any], device: torch.device | str) -> None:
    """Restore :func:`rng_state`'s output. A checkpoint written on another kind of device restores
    the CPU generator and leaves the accelerator's as seeded (its stream cannot be carried over)."""
    torch.set_rng_state(state["cpu"])
    device_type, devices = accelerator(device)
    saved = state.get(device_type) if device_type else None
    if device_type and saved:
        for index in devices:
            if index in saved:
                _module(device_type).set_rng_state(saved[index], index)
