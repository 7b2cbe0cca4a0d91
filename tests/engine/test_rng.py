"""CPU and accelerator RNG states for GradCache replays and checkpoints (``medalign.rng``).

No GPU is lent to the test machines, so the CUDA paths run against a fake ``torch.cuda`` generator
(one state per device index, advanced by every draw, as dropout advances the real one): what is
checked is that the right device's state is captured, restored for the replay, given back after
it, and carried through a checkpoint file. The CPU path runs for real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medalign.rng import RngSnapshot, accelerator, load_rng_state, rng_state


class FakeCuda:
    """Per-device generator states as tensors; ``draw`` is what a dropout kernel on device i does."""

    def __init__(self, devices: int = 2) -> None:
        self.states = {i: torch.tensor([100 * (i + 1)], dtype=torch.uint8) for i in range(devices)}

    def get_rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        return self.states[_index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        self.states[_index(device)] = state.clone()

    def draw(self, device: int) -> int:
        value = int(self.states[device])
        self.states[device] = self.states[device] + 1
        return value


def _index(device: int | str | torch.device) -> int:
    if isinstance(device, int):
        return device
    return torch.device(device).index or 0


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return fake


def test_accelerator_names_the_generators_a_device_draws_from(fake_cuda: FakeCuda) -> None:
    assert accelerator("cpu") == (None, [])
    assert accelerator("cuda:1") == ("cuda", [1])
    assert accelerator("cuda") == ("cuda", [0])  # the current device
    assert accelerator("mps") == ("mps", [0])


def test_replay_draws_the_captured_cuda_masks_and_gives_the_generator_back(fake_cuda: FakeCuda) -> None:
    """GradCache: the replay of a micro-batch must draw what its cached pass drew, on the GPU too."""
    snapshot = RngSnapshot.capture("cuda:1")
    cpu_first = torch.rand(3)
    gpu_first = [fake_cuda.draw(1) for _ in range(3)]
    after_cached_pass = (torch.get_rng_state(), fake_cuda.get_rng_state(1), fake_cuda.get_rng_state(0))
    with snapshot.replay():
        assert torch.equal(torch.rand(3), cpu_first)
        assert [fake_cuda.draw(1) for _ in range(3)] == gpu_first
    assert torch.equal(torch.get_rng_state(), after_cached_pass[0])
    assert torch.equal(fake_cuda.get_rng_state(1), after_cached_pass[1])
    assert torch.equal(fake_cuda.get_rng_state(0), after_cached_pass[2])  # other devices untouched


def test_replay_on_the_cpu_restores_the_cpu_stream() -> None:
    snapshot = RngSnapshot.capture("cpu")
    first = torch.nn.functional.dropout(torch.ones(64), 0.5)
    after = torch.get_rng_state()
    with snapshot.replay():
        assert torch.equal(torch.nn.functional.dropout(torch.ones(64), 0.5), first)
    assert torch.equal(torch.get_rng_state(), after)


def test_checkpoint_state_round_trips_cuda_generators(fake_cuda: FakeCuda, tmp_path: Path) -> None:
    """Resume: the saved state of the model's GPU is restored, through a weights_only checkpoint."""
    fake_cuda.draw(1)
    saved = rng_state("cuda:1")
    assert set(saved) == {"cpu", "cuda"} and set(saved["cuda"]) == {1}
    torch.save({"rng": saved}, tmp_path / "ckpt")
    expected_gpu = [fake_cuda.draw(1) for _ in range(4)]
    expected_cpu = torch.rand(4)
    loaded = torch.load(tmp_path / "ckpt", weights_only=True)["rng"]
    load_rng_state(loaded, "cuda:1")
    assert [fake_cuda.draw(1) for _ in range(4)] == expected_gpu
    assert torch.equal(torch.rand(4), expected_cpu)


def test_a_cpu_checkpoint_resumed_on_a_gpu_restores_the_cpu_stream(fake_cuda: FakeCuda) -> None:
    saved = rng_state("cpu")
    expected = torch.rand(2)
    before = fake_cuda.get_rng_state(0)
    load_rng_state(saved, "cuda:0")
    assert torch.equal(torch.rand(2), expected)
    assert torch.equal(fake_cuda.get_rng_state(0), before)
