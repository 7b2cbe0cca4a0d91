"""The README's "Your own data" walk-through, run as written on the shared Kvasir-SEG copy.

A folder laid out as a user has it (``Original/`` and ``Ground Truth/``, here links to
Kvasir-SEG's ``images/`` and ``masks/``) goes through the generic importer, validation and a
short training run of the shipped recipe, whose bundle then predicts a mask for one frame. Only
sizes shrink (a subset of the imported rows, a narrow U-Net, two steps) so that the path is
checked in seconds whenever the data is present.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medalign.cli import app
from medalign.data.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]
KEEP = {"train": 12, "test": 6}
SMALL = [
    "--data.batch_size", "2",
    "--data.num_workers", "0",
    "--train.max_steps", "2",
    "--train.progress", "false",
    "--train.precision", "32-true",
    "--model.overrides.decoder_channels", "[16, 8, 8, 8, 8]",  # the pretrained encoder stays as shipped
    "--model.overrides.image_size", "64",
]  # fmt: skip


def readme_commands() -> list[list[str]]:
    """The `medalign ...` lines of the README's "Your own data" walk-through, as argument lists."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Your own data") :]
    block = section[
        section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)
    ]
    return [shlex.split(line)[1:] for line in block.splitlines() if re.match(r"^medalign ", line)]


@pytest.mark.realdata
def test_readme_own_data_walkthrough(real_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kvasir = real_dataset("kvasir-seg")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "Original").symlink_to(kvasir.resolve() / "images", target_is_directory=True)
    (tmp_path / "mydata" / "Ground Truth").symlink_to(kvasir.resolve() / "masks", target_is_directory=True)
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    runner = CliRunner()
    formats, imports, validate, summary, train, predict = readme_commands()

    assert "  masks  text; default: none" in runner.invoke(app, formats).output
    result = runner.invoke(app, imports)
    assert result.exit_code == 0, result.output
    assert "  image files in 'Original': 1000, imported 1000, not imported 0" in result.output
    assert "  mask files in 'Ground Truth': 1000, imported 1000, not imported 0" in result.output
    assert "allow_outside_root" in result.output  # the links point outside mydata/, and it says so
    manifest = read_manifest(tmp_path / "data" / "polyps.csv")
    assert manifest.meta.mask_threshold == 127.0 and manifest.meta.allow_outside_root

    table = manifest.table
    keep = np.zeros(len(table), dtype=bool)
    for split, n in KEEP.items():
        keep[np.flatnonzero(table["split"].to_numpy() == split)[:n]] = True
    write_manifest(manifest.subset(keep), tmp_path / "data" / "polyps.csv")
    checked = runner.invoke(app, validate)
    assert checked.exit_code == 0 and "18 rows, 0 errors, 0 warnings" in checked.output, checked.output
    assert "masks: mask=18" in runner.invoke(app, summary).output

    trained = runner.invoke(app, [*train, *SMALL])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "runs" / "polyps" / "bundle").is_dir() and (
        tmp_path / "runs" / "polyps" / "metrics.json"
    ).is_file()
    predicted = runner.invoke(app, predict)
    assert predicted.exit_code == 0, predicted.output
    assert len(list((tmp_path / "preds" / "polyps").glob("*.png"))) == 1
