from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import typer
from PIL import Image
from typer.testing import CliRunner

from medalign.cli import app
from medalign.data.manifest import read_manifest

runner = CliRunner()


def _class_folders(root: Path) -> Path:
    for label in ("benign", "malignant"):
        (root / label).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(root / label / f"{label}{i}.png")
    return root


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every registered command and group, depth first, with the words that call it."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_command_has_a_description_an_example_and_helped_options() -> None:
    commands = list(_commands(typer.main.get_command(app)))
    assert {("data", "validate"), ("eval", "zeroshot"), ("predict", "masks"), ("export", "onnx")} <= {
        p for p, _ in commands
    }  # the walk reaches the sub-apps, including the ones registered from other modules
    for path, command in commands:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Example" in result.output, f"`medalign {' '.join(path)} --help` shows no example"
        assert len((command.help or "").split()) >= 5, f"`medalign {' '.join(path)}` has no description"
        unhelped = [p.name for p in command.params if not getattr(p, "help", None)]
        assert not unhelped, f"`medalign {' '.join(path)}`: no help for {unhelped}"


def test_formats_lists_every_importer() -> None:
    result = runner.invoke(app, ["data", "formats"])
    names = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    assert {
        "lvit",
        "mmendocl",
        "busi",
        "kvasir",
        "medpix",
        "lgg",
        "nextgen-uia",
        "medmnist",
        "r2gen",
        "llava",
        "folders",
    } <= names


def test_import_split_summary_validate_chain(tmp_path: Path) -> None:
    src = _class_folders(tmp_path / "src")
    manifest = tmp_path / "out" / "cases.jsonl"
    result = runner.invoke(app, ["data", "import", "folders", str(src), "--out", str(manifest)])
    assert result.exit_code == 0, result.output
    assert "cases: 10" in result.output
    split = tmp_path / "out" / "split.parquet"
    result = runner.invoke(
        app,
        [
            "data",
            "split",
            str(manifest),
            "--out",
            str(split),
            "--fractions",
            "0.6,0.2,0.2",
            "--stratify",
            "label",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "train=6, val=2, test=2" in result.output
    result = runner.invoke(app, ["data", "summary", str(split), "--json"])
    summary = json.loads(result.output)
    assert summary["labels"]["label"] == {"benign": 5, "malignant": 5}
    assert runner.invoke(app, ["data", "validate", str(split)]).exit_code == 0
    assert read_manifest(split).root == src.resolve()


def test_import_reports_bad_format_and_option(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "import", "nope", str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert result.exit_code == 1 and "unknown import format 'nope'" in result.output
    result = runner.invoke(
        app, ["data", "import", "folders", str(tmp_path), "--out", str(tmp_path / "m.csv"), "-O", "sed=1"]
    )
    assert result.exit_code == 1
    assert "unknown option 'sed' for the 'folders' importer; did you mean seed?" in result.output
    assert "valid options: seed, fractions, force, group_by, group_regex" in result.output
    result = runner.invoke(
        app, ["data", "import", "folders", str(tmp_path), "--out", str(tmp_path / "m.csv"), "--option", "force"]
    )
    assert result.exit_code == 1 and "is not name=value: write -O force=true" in result.output


def test_quickstart_small(tiny_quickstart) -> None:
    output, out = tiny_quickstart.output, tiny_quickstart.out
    assert "validated manifest.csv: 0 errors" in output
    assert "validated prompts.csv: 0 errors" in output
    assert "example report" in output and "example segmentation prompt" in output
    assert "zero-shot diagnosis on test: accuracy" in output and "R@10" in output
    assert (out / "align" / "bundle" / "model.safetensors").is_file()
    assert "Dice with text" in output and "image-only" in output
    assert "another case's prompt" in output
    for run in ("segment_text", "segment_image_only"):
        assert (out / run / "bundle" / "model.safetensors").is_file()
    assert "lesion segmentation from two modalities" in output
    assert "Dice a alone" in output and "b alone" in output and "fused a+b" in output
    assert (out / "fuse" / "bundle" / "model.safetensors").is_file()
    fused = json.loads((out / "fuse" / "metrics.json").read_text())
    assert list(fused["subsets"]) == ["a", "b", "a+b"] and fused["train"]["steps"] == 2
    assert "quickstart finished in" in output and " MB)" in output


def test_quickstart_leaves_a_light_clean_output(tiny_quickstart) -> None:
    """Finished runs keep bundle + metrics, not optimiser checkpoints; a piped log has no progress
    bars; every bundle file has one mode; the align bundle records both modalities it was trained on."""
    out = tiny_quickstart.out
    assert not list(out.rglob("*.ckpt")) and not list(out.rglob("checkpoints"))
    assert "\r" not in tiny_quickstart.output and "it/s" not in tiny_quickstart.output
    for weights in out.rglob("model.safetensors"):
        assert weights.stat().st_mode & 0o777 == (weights.parent / "config.json").stat().st_mode & 0o777
    align = json.loads((out / "align" / "bundle" / "config.json").read_text())["inputs"]
    assert (align["layout"], align["modalities"], align["channels"]) == ("stacked", ["a", "b"], 1)
    fuse = json.loads((out / "fuse" / "bundle" / "config.json").read_text())["inputs"]
    assert (fuse["layout"], fuse["modalities"], fuse["missing_allowed"]) == ("modalities", ["a", "b"], True)


def test_main_turns_errors_into_one_line_unless_debug(tmp_path, capsys) -> None:
    import pytest

    from medalign.bundle import BundleError
    from medalign.cli import main

    args = ["eval", "clinical", "--model", str(tmp_path / "missing"), "--manifest", str(tmp_path / "m.csv")]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"error: BundleError: bundle '{tmp_path / 'missing'}' does not exist" in err
    assert "Traceback" not in err and "--debug" in err
    with pytest.raises(BundleError):
        main([*args, "--debug"])
    with pytest.raises(SystemExit) as ok:
        main(["--help"])
    assert ok.value.code == 0 and "--debug" in capsys.readouterr().out


def test_quickstart_keeps_checkpoints_only_when_asked(tmp_path: Path) -> None:
    from medalign.pipeline.quickstart import QuickstartContext

    assert QuickstartContext(tmp_path, 8, 0, print).checkpoint_override == "train.keep_checkpoints=false"
    assert QuickstartContext(tmp_path, 8, 0, print, keep_checkpoints=True).checkpoint_override == "train.keep_checkpoints=true"
    assert "--keep-checkpoints" in runner.invoke(app, ["quickstart", "--help"]).output
