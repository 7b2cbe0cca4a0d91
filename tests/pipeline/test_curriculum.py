"""Curriculum chains: stage-to-stage initialisation, reuse, resume after a kill, ablation tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medalign.config import ConfigError
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.pipeline.curriculum import (
    ablation_markdown,
    default_variants,
    load_curriculum,
    parse_stages,
    run_ablation,
    run_curriculum,
    stage_config,
)
from medalign.pipeline.run import build_model

REPO = Path(__file__).resolve().parents[2]

# Stage 1 aligns a tiny dual encoder; stage 2 starts a clip_decoder from its vision tower.
CURRICULUM = """
curriculum:
  out: {out}
  headline: [dice, iou, missing.key]
  shared:
    data: {{manifest: {manifest}, batch_size: 8, num_workers: 0, augment: false}}
    train: {{progress: false, checkpoint_every: 1, precision: 32-true}}
  stages:
    1:
      recipe: {align}
      model: {{name: align_tiny, overrides: {{in_channels: 2, image_size: 64}}}}
      data: {{phantom: null}}
      train: {{max_steps: 2, epochs: 1}}
      eval: {{zeroshot: null, retrieval: false}}
    2:
      task: segment
      model:
        name: clip_decoder
        overrides:
          decoder_dim: 16
          in_channels: 2
          image_size: 64
          vision: {{config: {{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, patch_size: 16}}}}
      data: {{mask: mask, modalities: ["image:a", "image:b"]}}
      seg_loss: {{kind: dice_bce}}
      train: {{max_steps: 4, epochs: 1}}
      eval: {{split: val}}
"""


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=40, size=64))


def _write(tmp_path: Path, manifest: Path, name: str = "curriculum.yaml") -> Path:
    path = tmp_path / name
    text = CURRICULUM.format(out=tmp_path / "runs", manifest=manifest, align=REPO / "configs/align/phantom.yaml")
    path.write_text(text)
    return path


def test_stage_recipes_merge_shared_file_inline_and_overrides(tmp_path: Path, phantom: Path) -> None:
    curriculum = load_curriculum(_write(tmp_path, phantom), ["train.seed=3", "stage2.train.max_steps=7"])
    first, second = stage_config(curriculum, [1]), stage_config(curriculum, [1, 2])
    assert first.task == "align" and first.loss.kind == "clip"  # from the recipe file
    assert first.data.batch_size == 8 and first.data.phantom is None  # shared, then inline
    assert first.train.seed == 3 and second.train.seed == 3  # a plain override reaches every stage
    assert first.train.max_steps == 2 and second.train.max_steps == 7  # stageN. reaches one stage
    assert first.model.init_from is None
    assert second.model.init_from == str(tmp_path / "runs" / "stages_1" / "bundle")
    assert second.out == str(tmp_path / "runs" / "stages_1-2")
    assert stage_config(curriculum, [2]).model.init_from is None  # a chain that skips stage 1


def test_bad_curricula_are_clear_errors(tmp_path: Path, phantom: Path) -> None:
    curriculum = load_curriculum(_write(tmp_path, phantom))
    assert parse_stages(None, curriculum) == [1, 2] and parse_stages("2, 1", curriculum) == [1, 2]
    with pytest.raises(ConfigError, match="defines stages \\[1, 2\\]"):
        parse_stages("1,3", curriculum)
    with pytest.raises(ConfigError, match="stage\\(s\\) \\[5\\]"):
        load_curriculum(_write(tmp_path, phantom), ["stage5.train.epochs=1"])
    with pytest.raises(ConfigError, match="stage 2: train: unknown key"):
        stage_config(load_curriculum(_write(tmp_path, phantom), ["stage2.train.epoch=1"]), [1, 2])
    bad = tmp_path / "bad.yaml"
    bad.write_text("curriculum: {stages: {one: {task: align}}}\n")
    with pytest.raises(ConfigError, match="positive integers"):
        load_curriculum(bad)


def test_default_variants_skip_each_earlier_stage() -> None:
    assert default_variants([1, 2, 3]) == [[1, 2, 3], [2, 3], [1, 3], [3]]
    assert default_variants([1, 2]) == [[1, 2], [2]]
    table = ablation_markdown([{"stages": "1-2", "dice": 0.5, "iou": None}], ["dice", "iou"])
    assert table.splitlines()[2] == "| 1-2 | 0.5000 | — |"


def test_chain_initialises_each_stage_from_the_previous_and_reuses_finished_stages(
    tmp_path: Path, phantom: Path
) -> None:
    curriculum = load_curriculum(_write(tmp_path, phantom))
    lines: list[str] = []
    first, second = run_curriculum(curriculum, [1, 2], echo=lines.append)
    aligned = load_file(first / "bundle" / "model.safetensors")
    tower = {k: v for k, v in aligned.items() if k.startswith("vision.")}
    # stage 2 starts with every tensor of stage 1's tower, and its own training then moves them
    start = build_model(stage_config(curriculum, [1, 2])).state_dict()
    trained = load_file(second / "bundle" / "model.safetensors")
    assert tower and all(torch.equal(start[k], v) for k, v in tower.items())
    assert all(not torch.equal(trained[k], v) for k, v in tower.items() if k.endswith("patch_embedding.weight"))
    decoder_config = json.loads((second / "bundle" / "config.json").read_text())["model"]
    assert decoder_config["in_channels"] == 2 and decoder_config["image_size"] == 64
    assert json.loads((second / "metrics.json").read_text())["n_images"] > 0

    lines.clear()
    run_curriculum(curriculum, [1, 2], echo=lines.append)
    assert sum("finished earlier with this recipe" in line for line in lines) == 2

    lines.clear()
    changed = load_curriculum(_write(tmp_path, phantom), ["stage1.train.max_steps=1"])
    run_curriculum(changed, [1, 2], echo=lines.append)
    assert sum("recipe changed" in line for line in lines) == 2  # stage 2 follows its retrained parent

    lines.clear()
    result = run_ablation(changed, echo=lines.append)
    assert [row["stages"] for row in result["rows"]] == ["1-2", "2"]
    assert result["rows"][0]["missing.key"] is None and isinstance(result["rows"][1]["dice"], float)
    assert (changed.out / "ablation.md").read_text().startswith("| stages run | dice | iou | missing.key |")


def test_a_killed_stage_resumes_and_matches_an_uninterrupted_chain(tmp_path: Path, phantom: Path) -> None:
    """The CLI chain killed (SIGKILL) in stage 2, rerun: stage 1 is reused, stage 2 resumes."""

    def run(folder: Path, kill_at: int | None = None) -> subprocess.CompletedProcess[str]:
        folder.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cli = [str(REPO / "tests" / "training" / "faulty_cli.py"), "kill-at-step", str(kill_at)] if kill_at else [
            "-m", "medalign.cli"]  # fmt: skip
        args = [sys.executable, *cli, "train", "--config", str(_write(folder, phantom)),
                "--stages", "1,2"]  # fmt: skip
        return subprocess.run(args, env=env, timeout=600, capture_output=True, text=True)

    assert run(tmp_path / "straight").returncode == 0
    killed = run(tmp_path / "killed", kill_at=3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    config = tmp_path / "killed" / "curriculum.yaml"
    resumed = subprocess.run(
        [sys.executable, "-m", "medalign.cli", "train", "--config", str(config), "--stages", "1,2"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "stage 1 (align) of chain 1: finished earlier" in resumed.stdout
    assert "stage 2 (segment) of chain 1-2: resuming" in resumed.stdout
    expected = load_file(tmp_path / "straight" / "runs" / "stages_1-2" / "bundle" / "model.safetensors")
    got = load_file(tmp_path / "killed" / "runs" / "stages_1-2" / "bundle" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "medalign.cli", *args]
    return subprocess.run(command, env=env, cwd=cwd, timeout=600, capture_output=True, text=True)


def test_ablate_over_seeds_reports_mean_and_spread(tmp_path: Path, phantom: Path) -> None:
    """--seeds 2: each seed in its own folder, every headline metric as mean ± sample std."""
    import statistics

    result = _cli("ablate", "--config", str(_write(tmp_path, phantom)), "--variants", "1,2;2", "--seeds", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "runs"
    ablation = json.loads((out / "ablation.json").read_text())
    assert ablation["seeds"] == [0, 1] and [row["stages"] for row in ablation["rows"]] == ["1-2", "2"]
    for row in ablation["rows"]:
        dice = row["per_seed"]["dice"]
        assert row["runs"] == [str(out / f"seed_{s}" / f"stages_{row['stages']}") for s in (0, 1)]
        weights = [load_file(Path(run) / "bundle" / "model.safetensors") for run in row["runs"]]
        assert any(not torch.equal(v, weights[1][k]) for k, v in weights[0].items())  # seeded differently
        assert row["dice"] == pytest.approx(statistics.fmean(dice))
        assert row["std"]["dice"] == pytest.approx(statistics.stdev(dice))
        assert row["missing.key"] is None and row["std"]["missing.key"] is None
        assert f"{row['dice']:.4f} ± {row['std']['dice']:.4f}" in result.stdout
    assert "mean ± std, 2 seeds" in (out / "ablation.md").read_text()
    page = (out / "ablation.html").read_text()
    assert "chain comparison with error bars" in page and "data:image/png;base64," in page
    assert "http" not in page.replace("<!DOCTYPE html>", "")  # self-contained


def test_the_phantom_chain_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    """The same command and seed twice give identical metrics for every stage of the shipped chain.

    The shipped recipe at a tiny size with its own precision (bf16 autocast) and data loader
    workers, each run in a fresh process, as a user would repeat it (~30 s: three stages twice).
    """
    config = REPO / "configs" / "curriculum" / "phantom.yaml"
    tiny = ["--data.phantom", "{n: 40, seed: 0, size: 64}", "--train.max_steps", "3", "--train.progress", "false",
            "--data.batch_size", "8", "--data.eval_batch_size", "16"]  # fmt: skip
    metrics = []
    for attempt in ("first", "second"):
        run = _cli("train", "--config", str(config), "--stages", "1,2,3", "--out", str(tmp_path / attempt), *tiny)
        assert run.returncode == 0, run.stderr[-2000:]
        stages = ("stages_1", "stages_1-2", "stages_1-2-3")
        metrics.append({stage: json.loads((tmp_path / attempt / stage / "metrics.json").read_text()) for stage in stages})
    for stage, first in metrics[0].items():
        second = metrics[1][stage]
        first.pop("train"), second.pop("train")  # wall-clock seconds differ
        assert first == second, stage
    assert metrics[0]["stages_1-2-3"]["diagnosis"]["n"] > 0
