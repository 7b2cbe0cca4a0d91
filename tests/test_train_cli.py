"""End to end through the CLI: train a tiny aligner on the phantom, then every eval command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medalign.cli import app
from medalign.data.phantom import PhantomConfig, generate_phantom

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    manifest = generate_phantom(root / "phantom", PhantomConfig(n=80, size=64))
    run = root / "run"
    args = [
        "train", "--config", str(REPO / "configs" / "align" / "phantom.yaml"),
        "--out", str(run), "--data.manifest", str(manifest), "--data.phantom", "null",
        "--model.name", "align_tiny", "--model.overrides", "{in_channels: 2, image_size: 64}",
        "--data.batch_size", "16", "--train.accumulate", "2", "--train.epochs", "2", "--train.progress", "false",
        "--data.num_workers", "0", "--eval.probe", "true", "--train.keep_checkpoints", "true",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return run, manifest


def test_run_folder_holds_everything(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["name"] == "align_tiny" and config["train"]["accumulate"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"zeroshot", "retrieval", "probe", "train"} <= set(metrics)
    assert metrics["train"]["steps"] == 2 * (56 // 16)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "bundle" / "model.safetensors").is_file()


def test_eval_commands_write_metrics(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, manifest = trained
    common = ["--model", str(run / "bundle"), "--manifest", str(manifest)]
    result = runner.invoke(
        app,
        ["eval", "zeroshot", *common, "--templates", "phantom_diagnosis", "--out", str(tmp_path / "z.json")],
    )
    assert result.exit_code == 0, result.output
    zeroshot = json.loads((tmp_path / "z.json").read_text())
    assert zeroshot["class_names"] == ["normal", "benign", "malignant"] and 0 <= zeroshot["accuracy"] <= 1
    assert len(zeroshot["per_case"]) == zeroshot["n"]  # the file keeps the rows ROC curves need ...
    assert "per_case" not in result.output  # ... the terminal gets the summary
    result = runner.invoke(app, ["eval", "retrieval", *common])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)) == {"image_to_text", "text_to_image"}
    result = runner.invoke(app, ["eval", "probe", *common])
    assert result.exit_code == 0, result.output
    assert "C" in json.loads(result.output)


def test_resume_flag_continues_from_checkpoint(trained: tuple[Path, Path]) -> None:
    run, manifest = trained
    config = REPO / "configs" / "align" / "phantom.yaml"
    args = ["train", "--config", str(config), "--resume", "--out", str(run), "--data.manifest", str(manifest),
            "--data.phantom", "null", "--model.name", "align_tiny", "--model.overrides", "{in_channels: 2, image_size: 64}",
            "--data.batch_size", "16", "--train.accumulate", "2", "--train.epochs", "3", "--train.progress", "false",
            "--data.num_workers", "0"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "at step 6" in result.output
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 9
    assert not (run / "checkpoints").exists()  # finished without --train.keep_checkpoints: dropped
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "has finished and kept no checkpoint" in again.output
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 9  # not retrained from 0


def test_bad_override_is_a_clear_error() -> None:
    result = runner.invoke(
        app, ["train", "--config", str(REPO / "configs" / "align" / "phantom.yaml"), "--train.lr", "1"]
    )
    assert result.exit_code == 1 and "train: unknown key(s) ['lr']" in result.output
