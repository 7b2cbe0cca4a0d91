"""``task: fuse`` through the one engine: train, per-subset metrics, bundle, CLI, resume, real data."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import medalign
from medalign.cli import app
from medalign.config import ConfigError, RunConfig, load_config, validate_ranges
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.run import run_training

REPO = Path(__file__).resolve().parents[1]
IMPORT_LINE = re.compile(r"^# Import first:\s+(medalign data import .+)$", re.MULTILINE)
TINY = [  # a 64 px model that trains a step in well under a second
    "model.overrides.image_size=64",
    "model.overrides.base_width=4",
    "model.overrides.depth=3",
]
FAST = ["train.progress=false", "data.num_workers=0", "train.precision=32-true"]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=40, size=64))


def recipe(name: str) -> Path:
    return REPO / "configs" / "fuse" / f"{name}.yaml"


def phantom_config(cases: Path, out: Path, *overrides: str, name: str = "phantom") -> RunConfig:
    return load_config(
        recipe(name),
        [
            f"out={out}",
            f"data.manifest={cases}",
            "data.phantom=null",
            "data.batch_size=8",
            *FAST,
            *TINY,
            *overrides,
        ],
    )


def test_train_reports_every_subset_and_reloads(cases: Path, tmp_path: Path) -> None:
    run = run_training(phantom_config(cases, tmp_path / "run", "train.max_steps=2"), echo=lambda *_: None)
    metrics = json.loads((run / "metrics.json").read_text())
    n_test = len(read_manifest(cases).split("test"))
    assert metrics["modalities"] == ["a", "b"] and list(metrics["subsets"]) == ["a", "b", "a+b"]
    for row in metrics["subsets"].values():
        assert row["n_images"] == n_test and "per_case" not in row
    assert metrics["dice"] == metrics["subsets"]["a+b"]["dice"] and len(metrics["per_case"]) == n_test
    # the headline is the mean over the per-case rows it reports (every image counted)
    assert metrics["dice"] == pytest.approx(sum(c["dice"] for c in metrics["per_case"]) / n_test)
    assert metrics["hd95"] == pytest.approx(sum(c["hd95"] for c in metrics["per_case"]) / n_test)
    final = metrics["train"]["final"][0]
    assert metrics["train"]["steps"] == 2
    assert {"loss_dice", "loss_mmd", "loss_similarity", "loss_orthogonality", "loss_contrastive"} <= set(
        final
    )
    loaded = medalign.load(str(run / "bundle"))
    assert loaded.config.arch == "fuse_adf" and loaded.config.modalities == ["a", "b"]

    result = CliRunner().invoke(
        app,
        [
            "eval",
            "fuse",
            "--model",
            str(run / "bundle"),
            "--manifest",
            str(cases),
            "--out",
            str(tmp_path / "m.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    *table, wrote = result.output.splitlines()[1:]
    rows = {line.split()[0]: line.split() for line in table}
    assert set(rows) == {"a", "b", "a+b"} and rows["a+b"][1] == str(n_test)
    assert wrote == f"wrote {tmp_path / 'm.html'}" and "<h2>Per modality subset</h2>" in (
        tmp_path / "m.html"
    ).read_text(encoding="utf-8")
    assert json.loads((tmp_path / "m.json").read_text())["subsets"] == metrics["subsets"]
    bad = CliRunner().invoke(
        app,
        ["eval", "fuse", "--model", str(run / "bundle"), "--manifest", str(cases), "--modality", "image:a"],
    )
    assert bad.exit_code == 1 and "name one column per modality, in this order: a, b" in bad.output


def test_a_short_run_beats_the_untrained_model(cases: Path, tmp_path: Path) -> None:
    """Five epochs on 28 phantom cases: fused Dice must clear the same model at its initial weights
    by a wide margin (the lesion masks are small; an untrained model scores about 0.02)."""
    from lightning.fabric.utilities.seed import seed_everything

    from medalign.run import build_model, evaluate_fusion, fusion_columns

    config = phantom_config(cases, tmp_path / "run", "train.epochs=5", "optim.lr=1.0e-2")
    seed_everything(config.train.seed)
    model, manifest = build_model(config), read_manifest(cases)
    untrained = evaluate_fusion(model, manifest, config, fusion_columns(config, manifest, model), "test")
    trained = json.loads((run_training(config, echo=lambda *_: None) / "metrics.json").read_text())
    before, after = untrained["subsets"]["a+b"]["dice"], trained["subsets"]["a+b"]["dice"]
    assert after > 5 * before and after > 0.15, (before, after)


def test_moe_with_report_tokens_and_a_classification_head(cases: Path, tmp_path: Path) -> None:
    config = phantom_config(
        cases,
        tmp_path / "moe",
        "train.max_steps=2",
        "model.overrides.token_dim=16",
        "model.overrides.moe_layers=1",
        "model.overrides.task_head=classify",
        "model.overrides.num_classes=3",
        "data.label=label",
        name="moe_text_seg",
    )
    run = run_training(config, echo=lambda *_: None)
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["subsets"]) == ["a", "b", "a+b"]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "auc"} <= set(metrics["subsets"]["a"])
    assert metrics["class_names"] == ["normal", "benign", "malignant"]
    final = metrics["train"]["final"][0]
    assert {"loss_ce", "loss_balance"} <= set(final)
    assert medalign.load(str(run / "bundle")).needs_text


def test_resume_continues_exactly(cases: Path, tmp_path: Path) -> None:
    """Modality dropout draws from torch's RNG, which the checkpoint restores: 2 + 1 steps == 3 steps."""
    settings = ["optim.schedule=constant", "train.checkpoint_every=1", "data.batch_size=4", "train.keep_checkpoints=true"]
    straight = run_training(
        phantom_config(cases, tmp_path / "straight", "train.max_steps=3", *settings), echo=lambda *_: None
    )
    run_training(
        phantom_config(cases, tmp_path / "resumed", "train.max_steps=2", *settings), echo=lambda *_: None
    )
    resumed = run_training(
        phantom_config(cases, tmp_path / "resumed", "train.max_steps=3", *settings),
        resume=True,
        echo=lambda *_: None,
    )
    a, b = (load_file(run / "bundle" / "model.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_fuse_config_checks() -> None:
    config = load_config(recipe("phantom"), ["data.mask=null"])
    with pytest.raises(ConfigError, match=r"task fuse with a segmentation head needs data\.mask"):
        validate_ranges(config)
    config = load_config(
        recipe("phantom"), ["fuse_loss.mmd_weight=-1", "fuse_loss.contrastive_temperature=0"]
    )
    with pytest.raises(ConfigError, match=r"mmd_weight must be >= 0.*contrastive_temperature must be > 0"):
        validate_ranges(config)


def test_task_fuse_refuses_a_non_fusion_model(cases: Path, tmp_path: Path) -> None:
    config = phantom_config(cases, tmp_path / "bad", "model.name=unet", "model.overrides={in_channels: 2}")
    with pytest.raises(ValueError, match="task fuse needs a fusion model"):
        run_training(config, echo=lambda *_: None)


def import_manifest(path: Path, shared: Path, tmp_path: Path) -> Path:
    """Run the recipe's documented import command with the shared data and a temporary output."""
    (command,) = IMPORT_LINE.findall(path.read_text(encoding="utf-8"))
    args = shlex.split(command)[1:]  # without "medalign"
    args[3] = str(shared / Path(args[3]).relative_to("../shared/data"))
    out = tmp_path / Path(args[args.index("--out") + 1]).name
    args[args.index("--out") + 1] = str(out)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("name", "dataset", "subsets"),
    [
        ("lgg_sequences", "lgg_mri", 7),
        ("lgg_pretrained", "lgg_mri", 7),
        ("mmendocl_wli_nbi", "wli-nbi-demo", 3),
    ],
)
def test_recipe_trains_on_real_data(
    name: str, dataset: str, subsets: int, shared_data: Path, real_dataset, tmp_path: Path
) -> None:
    real_dataset(dataset)
    manifest = import_manifest(recipe(name), shared_data, tmp_path)
    overrides = [
        f"out={tmp_path / 'run'}",
        f"data.manifest={manifest}",
        "data.batch_size=2",
        "train.max_steps=2",
    ]
    overrides += [*FAST, *TINY, "data.image_size=64"]
    if name.startswith("lgg"):  # evaluate on the val split's few patients to keep the smoke test short
        overrides.append("eval.split=val")
    if name == "lgg_pretrained":  # the pretrained encoder stays, the decoder shrinks
        overrides.append("model.overrides.decoder_channels=[16, 8, 8, 8]")
    config = load_config(recipe(name), overrides)
    run = run_training(config, echo=lambda *_: None)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == config.eval.split and metrics["train"]["steps"] == 2
    assert len(metrics["subsets"]) == subsets
    full = list(metrics["subsets"].values())[-1]
    assert full["dice"] == metrics["dice"] and full["n_images"] == len(metrics["per_case"]) > 0
    assert metrics["dice"] == pytest.approx(sum(c["dice"] for c in metrics["per_case"]) / full["n_images"])
