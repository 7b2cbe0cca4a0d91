"""`medalign train` under torchrun (2 CPU processes, gloo) gives one process's weights.

The real alignment and segmentation tasks, tiny models, no augmentation and nothing random
that could differ by rank (align_tiny's text tower frozen, so it runs without dropout; the
U-Net has no dropout and instance norm, so a sample's output does not depend on its batch).
Alignment gathers embeddings across ranks, so 2 x 4 samples see the same negatives as 1 x 8;
segmentation's loss is a mean of per-image terms, which DDP's gradient average reproduces.

Tolerance: gloo sums the ranks' gradients in another order than one process sums the batch
(relative differences ~1e-7). With AdamW's default eps (1e-8) a first step is +-lr whatever
the gradient's size, so a gradient that is zero in exact arithmetic (a conv bias feeding an
instance norm) gets a random +-lr from that float noise; ``optim.eps`` 1e-3 makes such steps
proportional to the gradient (noise-sized) while real gradients still move weights ~1e-4 per
step. Two steps then agree within atol 1e-5 / rtol 1e-4, and a wrong batch or a missing
gather is ~10x outside it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medalign.data.phantom import PhantomConfig, generate_phantom

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "--data.phantom", "null", "--data.batch_size", "8", "--data.augment", "false",
    "--data.num_workers", "0", "--train.epochs", "1", "--train.max_steps", "2",
    "--train.precision", "32-true", "--train.progress", "false", "--train.accelerator", "cpu",
    "--train.keep_checkpoints", "true",
    "--optim.warmup_steps", "0", "--optim.eps", "1e-3",
]  # fmt: skip
TASKS = {
    "align": [
        "--config", str(REPO / "configs" / "align" / "phantom.yaml"), "--model.name", "align_tiny",
        "--model.overrides", "{in_channels: 2, image_size: 64, freeze_text: true}",
        "--eval.zeroshot", "null", "--eval.retrieval", "false",
    ],
    "segment": [
        "--config", str(REPO / "configs" / "segment" / "phantom_text.yaml"), "--model.name", "unet",
        "--model.overrides", "{in_channels: 2, image_size: 64, channels: [8, 16, 32, 64]}",
        "--seg_loss.side_weight", "0",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=24, size=64))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(out: Path, manifest: Path, task: str, processes: int) -> dict[str, torch.Tensor]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    launcher = [sys.executable, "-m", "medalign.cli"]
    if processes > 1:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "medalign.cli",
        ]  # fmt: skip
    distributed = ["--train.devices", str(processes), "--train.strategy", "ddp" if processes > 1 else "auto"]
    command = [*launcher, "train", *TASKS[task], "--out", str(out), "--data.manifest", str(manifest)]
    subprocess.run([*command, *COMMON, *distributed], check=True, env=env, timeout=300)
    payload = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert payload["step"] == 2
    return payload["model"]


@pytest.mark.parametrize("task", ["align", "segment"])
def test_two_processes_match_one_with_the_same_global_batch(phantom: Path, tmp_path: Path, task: str) -> None:
    manifest = phantom if task == "align" else phantom.with_name("prompts.csv")
    single = _train(tmp_path / "single", manifest, task, 1)
    ddp = _train(tmp_path / "ddp", manifest, task, 2)
    assert sorted(ddp) == sorted(single)
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-5, msg=key)
