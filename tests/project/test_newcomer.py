"""The README's "Bring your own data: Kvasir-SEG in four commands" path, run as written on a subset.

Import Kvasir-SEG, train the shipped recipe, predict masks for a folder of new frames, open the
run's report. The commands are the README's; only the sizes shrink (40 images, a narrow U-Net,
two steps) so that the path is checked on every run with the data in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from medalign.cli import app
from medalign.data.manifest import read_manifest, write_manifest
from medalign.inference.batch_predict import predict_masks

REPO = Path(__file__).resolve().parents[2]
KEEP = {"train": 32, "test": 8}  # rows kept per split of the imported manifest
SMALL = [  # the README's full-size run, shrunk: the recipe itself is unchanged
    "--data.batch_size", "2",
    "--data.num_workers", "0",
    "--train.max_steps", "2",
    "--train.progress", "false",
    "--train.precision", "32-true",  # bf16 autocast is slow on a CPU
    "--model.overrides.decoder_channels", "[16, 8, 8, 8, 8]",  # the pretrained encoder stays as shipped
]  # fmt: skip


def predict_cli() -> typer.Typer:
    """`medalign predict masks` as the lead registers it on `predict_app`."""
    local = typer.Typer()
    local.callback()(lambda: None)  # a group, so that `masks` is a subcommand name as in the CLI
    local.command("masks")(predict_masks)
    return local


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(application: typer.Typer, args: list[str]) -> str:
    result = CliRunner().invoke(application, args)
    assert result.exit_code == 0, f"{args}\n{result.output}"
    return result.output


@pytest.mark.realdata
def test_readme_kvasir_path(real_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kvasir = real_dataset("kvasir-seg")
    monkeypatch.chdir(REPO)  # the README runs from the repository root (configs/ is relative)

    # 1. import (the README's command) and keep a small subset, splits preserved
    full = tmp_path / "kvasir.csv"
    invoke(
        app, ["data", "import", "kvasir", str(kvasir), "--out", str(full), "--option", "fractions=[0.9, 0, 0.1]"]
    )
    manifest = read_manifest(full)
    assert set(manifest.table["split"]) == {"train", "test"}
    table = manifest.table
    keep = np.zeros(len(table), dtype=bool)
    for split, n in KEEP.items():
        keep[np.flatnonzero(table["split"].to_numpy() == split)[:n]] = True
    small = write_manifest(manifest.subset(keep), tmp_path / "kvasir_small.csv")

    # 2. train the shipped recipe
    run = tmp_path / "run"
    invoke(app, ["train", "--config", "configs/segment/kvasir.yaml", "--data.manifest", str(small),
                 "--out", str(run), *SMALL])  # fmt: skip
    assert (run / "bundle").is_dir() and (run / "metrics.json").is_file()

    # 3. predict masks for a folder of new frames (three test images stand in for them)
    subset = read_manifest(small)
    frames = tmp_path / "new_frames"
    frames.mkdir()
    sources = [Path(subset.resolve(ref)) for ref in subset.split("test").table["image"][:3]]
    for source in sources:
        shutil.copy(source, frames / source.name)
    preds = tmp_path / "preds"
    invoke(predict_cli(), ["masks", "--model", str(run / "bundle"), str(frames), "--out", str(preds)])
    lines = (preds / "results.csv").read_text(encoding="utf-8").strip().splitlines()
    assert len(lines) == 1 + 3 and all(",ok," in line for line in lines[1:])
    for source in sources:
        mask = Image.open(preds / f"{source.stem}.png")
        assert mask.size == Image.open(source).size  # the mask is at the frame's own size

    # 4. open the report (rebuilt by `medalign report`, as the README offers)
    assert (run / "report.html").is_file()
    invoke(app, ["report", str(run)])
    assert "<html" in (run / "report.html").read_text(encoding="utf-8").lower()
