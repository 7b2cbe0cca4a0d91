from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from medalign.training.engine import CHECKPOINT_NAME, ResumableSampler, split_batch

sys.path.insert(0, str(Path(__file__).parent))
from toy import ToyData, collate, train

TOY = Path(__file__).parent / "toy.py"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grad_cache_matches_the_whole_batch_step(tmp_path: Path) -> None:
    whole, _ = train(tmp_path / "a", steps=3, accumulate=1)
    cached, _ = train(tmp_path / "b", steps=3, accumulate=4, grad_cache=True)
    plain, _ = train(tmp_path / "c", steps=3, accumulate=4, grad_cache=False)
    for key, value in _weights(whole).items():
        torch.testing.assert_close(_weights(cached)[key], value, rtol=1e-5, atol=1e-6)
    # plain accumulation sees 4 small contrastive batches: a different objective, different weights
    assert any(not torch.allclose(_weights(plain)[k], v, atol=1e-4) for k, v in _weights(whole).items())


def test_sigkill_then_resume_reaches_the_same_weights(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(TOY.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, str(TOY), str(reference)], check=True, env=env, timeout=300)
    killed = tmp_path / "killed"
    first = subprocess.run(
        [sys.executable, str(TOY), str(killed), "--kill-at", "5"], env=env, timeout=300
    )
    assert first.returncode == -9  # SIGKILL after step 5; the last checkpoint is step 4
    assert not (killed / "final.pt").exists()
    subprocess.run([sys.executable, str(TOY), str(killed), "--resume"], check=True, env=env, timeout=300)
    expected = torch.load(reference / "final.pt", weights_only=True)
    resumed = torch.load(killed / "final.pt", weights_only=True)
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
    logged = pd.read_csv(killed / "logs" / "metrics.csv")
    assert logged[logged["key"] == "train/loss"]["step"].tolist() == [
        1,
        2,
        3,
        4,
        5,
        5,
        6,
        7,
        8,
        9,
    ]  # step 5 redone


def test_checkpoint_write_failure_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(tmp_path, steps=2, checkpoint_every=2)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    before = checkpoint.read_bytes()
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RuntimeError, match=r"cannot write checkpoint .*No space left"):
        train(tmp_path, steps=4, checkpoint_every=2, resume=True)
    assert checkpoint.read_bytes() == before
    assert not list(checkpoint.parent.glob("*.tmp"))
    assert torch.load(checkpoint, weights_only=True)["step"] == 2


def test_logs_and_bf16(tmp_path: Path) -> None:
    _, state = train(tmp_path, steps=4, precision="bf16-mixed")
    assert state.step == 4 and len(state.history) == 4
    metrics = pd.read_csv(tmp_path / "logs" / "metrics.csv")
    assert {"train/loss", "train/lr"} <= set(metrics["key"])
    assert metrics[metrics["key"] == "train/loss"]["step"].tolist() == [1, 2, 3, 4]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_sampler_is_seeded_rank_split_and_resumable() -> None:
    full = ResumableSampler(10, seed=1)
    full.set_epoch(2)
    order = [i for i, _ in full]
    assert sorted(order) == list(range(10))
    again = ResumableSampler(10, seed=1)
    again.set_epoch(2, start=4)
    assert list(again) == list(full)[4:]
    ranks = [ResumableSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(2)
    assert sorted(i for s in ranks for i, _ in s)[:10] == sorted(order + order[:2])[:10]
    assert len({seed for s in ranks for _, seed in s}) == 12


def test_split_batch_chunks_tensors_and_lists() -> None:
    batch = {"x": torch.arange(10), "t": list("abcdefghij"), "flag": True}
    chunks = split_batch(batch, 3)
    assert [len(c["x"]) for c in chunks] == [3, 3, 4]
    assert "".join("".join(c["t"]) for c in chunks) == "abcdefghij"
    assert all(c["flag"] is True for c in chunks)
    assert len(ToyData()) == 48 and collate([ToyData()[0], ToyData()[1]])["image"].shape == (2, 12)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(
    tmp_path: Path, accumulate: int
) -> None:
    """torchrun, 2 CPU processes (gloo): negatives are gathered across ranks, so 2 x 8 equals 1 x 16."""
    env = {
        **os.environ,
        "PYTHONPATH": str(TOY.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--gathered", "--accumulate", str(accumulate)]
    subprocess.run([sys.executable, str(TOY), str(single), *common], check=True, env=env, timeout=300)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
    ]
    subprocess.run(
        [*torchrun, str(TOY), str(ddp), *common, "--devices", "2"], check=True, env=env, timeout=300
    )
    expected = torch.load(single / "final.pt", weights_only=True)
    distributed = torch.load(ddp / "final.pt", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-4, atol=1e-5)


def test_compiled_training_matches_eager_and_resumes_from_plain_checkpoints(tmp_path: Path) -> None:
    """train.compile changes how the forward runs, not what is learnt or what a checkpoint holds:
    a compiled run killed midway resumes without compiling and ends where an eager run ends."""
    eager, _ = train(tmp_path / "eager", steps=3, gathered=True)  # gathered: no dropout (its RNG differs)
    compiled, _ = train(tmp_path / "compiled", steps=3, gathered=True, compile=True)
    for key, value in _weights(eager).items():
        torch.testing.assert_close(_weights(compiled)[key], value, rtol=1e-4, atol=1e-5)

    env = {**os.environ, "PYTHONPATH": str(TOY.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([sys.executable, str(TOY), str(reference), "--gathered"], check=True, env=env, timeout=300)
    first = subprocess.run(
        [sys.executable, str(TOY), str(killed), "--gathered", "--compile", "--kill-at", "5"],
        env=env,
        timeout=600,
    )
    assert first.returncode == -9
    checkpoint = torch.load(killed / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    assert set(checkpoint["model"]) == set(_weights(eager))  # no "_orig_mod." prefixes
    subprocess.run(
        [sys.executable, str(TOY), str(killed), "--gathered", "--resume"], check=True, env=env, timeout=300
    )
    expected = torch.load(reference / "final.pt", weights_only=True)
    resumed = torch.load(killed / "final.pt", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-5)
