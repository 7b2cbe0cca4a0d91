"""Faults through the real CLI: a kill at any step, a kill or a full disk during a checkpoint
write, and a sample or a DataLoader worker that fails.

Each run is a tiny phantom task (48 px, 4 per batch, 6 steps, a checkpoint every 2 steps, so
a kill between checkpoints also redoes a step). The reference run is made in this process;
killed and resumed runs are separate ``python -m medalign.cli train`` processes.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medalign.cli import main
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.training.engine import DataLoadingError, ResumableSampler

sys.path.insert(0, str(Path(__file__).parent))
from faulty_cli import faulty_save
from toy import ToyData, train

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py

REPO = Path(__file__).resolve().parents[2]
FAULTY_CLI = Path(__file__).parent / "faulty_cli.py"
STEPS, CHECKPOINT_EVERY, SEED = 6, 2, 20240609
TINY = ["--data.phantom", "null", "--data.image_size", "48", "--data.batch_size", "4",
        "--train.max_steps", str(STEPS), "--train.epochs", "2", "--train.checkpoint_every", str(CHECKPOINT_EVERY),
        "--train.progress", "false", "--data.num_workers", "0", "--train.precision", "32-true",
        "--train.deterministic", "true"]  # fmt: skip
TASKS = {  # recipe, manifest, tiny model
    "align": ("align/phantom.yaml", "manifest.csv", ["--model.name", "align_tiny",
              "--model.overrides", "{in_channels: 2, image_size: 48}", "--eval.zeroshot", "null",
              "--eval.retrieval", "false"]),
    "segment": ("segment/phantom_text.yaml", "prompts.csv", ["--model.name", "unet",
                "--model.overrides", "{in_channels: 2, image_size: 48, channels: [4, 8, 16]}"]),
    "fuse": ("fuse/phantom.yaml", "manifest.csv", ["--model.overrides.image_size", "48",
             "--model.overrides.base_width", "4", "--model.overrides.depth", "3"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=24, size=64)).parent


def train_args(task: str, phantom: Path, out: Path, *extra: str) -> list[str]:
    recipe, manifest, model = TASKS[task]
    return ["train", "--config", str(REPO / "configs" / recipe), "--out", str(out),
            "--data.manifest", str(phantom / manifest), *TINY, *model, *extra]  # fmt: skip


def cli(args: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m medalign.cli ARGS`` (or ``faulty_cli.py`` when ARGS start with it), one thread."""
    command = args if args[0] == str(FAULTY_CLI) else ["-m", "medalign.cli", *args]
    return subprocess.run(
        [sys.executable, *command],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def in_process(args: list[str]) -> int:
    """The console entry point in this process: its exit code."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0)


@pytest.fixture(scope="module")
def reference(phantom: Path, tmp_path_factory: pytest.TempPathFactory):
    """``reference(task)``: the weights of an uninterrupted run, trained once per task."""
    done: dict[str, dict[str, torch.Tensor]] = {}

    def get(task: str) -> dict[str, torch.Tensor]:
        if task not in done:
            out = tmp_path_factory.mktemp(f"straight_{task}")
            assert in_process(train_args(task, phantom, out)) == 0
            done[task] = load_file(out / "bundle" / "model.safetensors")
        return done[task]

    return get


def assert_same_weights(expected: dict[str, torch.Tensor], run: Path, context: str) -> None:
    got = load_file(run / "bundle" / "model.safetensors")
    assert got.keys() == expected.keys(), context
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"{context}: {key} differs"


@pytest.mark.parametrize("task", list(TASKS))
def test_sigkill_at_a_random_step_then_resume_gives_the_same_weights(
    task: str, phantom: Path, reference, tmp_path: Path
) -> None:
    kill_at = random.Random(f"{SEED}:{task}").randint(1, STEPS - 1)
    context = f"{task}: SIGKILL after step {kill_at} (random.Random('{SEED}:{task}'))"
    args = train_args(task, phantom, tmp_path)
    killed = cli([str(FAULTY_CLI), "kill-at-step", str(kill_at), *args])
    assert killed.returncode == -9, f"{context}\n{killed.stderr[-2000:]}"
    assert not (tmp_path / "bundle").exists(), context
    resumed = cli([*args, "--resume"])
    assert resumed.returncode == 0, f"{context}\n{resumed.stderr[-2000:]}"
    saved = kill_at - kill_at % CHECKPOINT_EVERY
    if saved:
        assert f"at step {saved}" in resumed.stdout + resumed.stderr, context
    assert_same_weights(reference(task), tmp_path, context)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(
    phantom: Path, reference, tmp_path: Path
) -> None:
    args = train_args("align", phantom, tmp_path)
    killed = cli([str(FAULTY_CLI), "kill", "2", *args])  # the 2nd checkpoint: step 4
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoints = tmp_path / "checkpoints"
    partial = list(checkpoints.glob("last.ckpt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the half-written file is there
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["step"] == CHECKPOINT_EVERY
    resumed = cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {CHECKPOINT_EVERY}" in resumed.stdout + resumed.stderr
    assert not list(checkpoints.glob("*.tmp"))
    assert_same_weights(reference("align"), tmp_path, "killed while writing the step-4 checkpoint")


def test_a_full_disk_fails_loudly_and_keeps_the_last_checkpoint(
    phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch, "save", faulty_save("full", 2))  # a real ENOSPC from /dev/full
    assert in_process(train_args("segment", phantom, tmp_path)) == 1
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    error = capsys.readouterr().err.splitlines()[0]
    assert error.startswith("error: ") and f"cannot write checkpoint {checkpoint}" in error
    assert "No space left on device" in error and "previous checkpoint is kept" in error
    monkeypatch.undo()
    assert torch.load(checkpoint, weights_only=True)["step"] == CHECKPOINT_EVERY
    assert not list(checkpoint.parent.glob("*.tmp")) and not (tmp_path / "bundle").exists()


def test_a_corrupt_file_in_a_worker_ends_the_run_naming_case_and_file(
    phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shutil.copytree(phantom, tmp_path / "data")
    sampler = ResumableSampler(len(read_manifest(data / "manifest.csv").split("train")), seed=0)
    first = next(iter(sampler))[0]  # the first sample of the run: what fails is known
    row = read_manifest(data / "manifest.csv").split("train").table.iloc[first]
    image = data / row["image:b"]
    image.write_bytes(image.read_bytes()[:300])  # truncated, as by an interrupted copy
    args = train_args("align", data, tmp_path / "run", "--data.num_workers", "1")
    assert in_process(args) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("error: DataLoadingError: cannot load training batch 1 of epoch 1")
    assert "DataLoader worker 0" in lines[0] and f"case '{row['case_id']}'" in lines[0]
    assert f"'{image}'" in lines[0] and "truncated" in lines[0]
    assert "Traceback" not in "\n".join(lines)


class KillsItsWorker(ToyData):
    """Loading sample ``fatal`` kills the DataLoader worker, as the OOM killer would."""

    def __init__(self, fatal: int) -> None:
        super().__init__()
        self.fatal = fatal

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        if index == self.fatal and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), 9)
        return super().__getitem__(key)

    def case_id(self, index: int) -> str:
        return f"toy{index:02d}"


def test_a_killed_worker_is_reported_with_the_batch_it_was_loading(tmp_path: Path) -> None:
    first_batch = [i for i, _ in ResumableSampler(48, seed=3)][:16]  # toy.train: seed 3, batch 16
    with pytest.raises(DataLoadingError) as info:
        train(tmp_path, steps=3, data=KillsItsWorker(first_batch[5]), num_workers=1)
    message = str(info.value)
    assert message.startswith("cannot load training batch 1 of epoch 1: DataLoader worker (pid")
    assert str([f"toy{i:02d}" for i in first_batch]) in message and "out of memory" in message
    assert "\n" not in message


def test_an_unreadable_checkpoint_is_named_on_resume(tmp_path: Path) -> None:
    train(tmp_path, steps=2, checkpoint_every=2)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated by a copy, not by the engine
    with pytest.raises(
        RuntimeError, match=rf"cannot resume: checkpoint {checkpoint} is unreadable .*delete it"
    ):
        train(tmp_path, steps=4, checkpoint_every=2, resume=True)
