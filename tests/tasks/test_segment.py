"""Segmentation through the one engine: train, evaluate with the paper metrics, bundle, reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import medalign
from medalign.config import ConfigError, RunConfig, load_config
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.pipeline.run import build_model, run_training
from medalign.tasks.segment import evaluate_segmentation, predict_probabilities, segmentation_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cases = generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=40, size=64))
    return cases.with_name("prompts.csv")


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("unet", "{in_channels: 2, image_size: 64, channels: [8, 16, 32, 64]}"),
        ("text_unet", "{in_channels: 2, image_size: 64, base_width: 8, side_outputs: true}"),
    ],
)
def test_train_evaluate_bundle_reload(prompts: Path, tmp_path: Path, name: str, overrides: str) -> None:
    config = load_config(
        REPO / "configs" / "segment" / "phantom_text.yaml",
        [
            f"out={tmp_path / name}",
            f"data.manifest={prompts}",
            "data.phantom=null",
            f"model.name={name}",
            f"model.overrides={overrides}",
            "train.epochs=2",
            "train.progress=false",
            "data.num_workers=0",
            "data.batch_size=8",
            "seg_loss.side_weight=0.3",
            "train.precision=32-true",  # bf16 autocast is slow on a CPU
        ],
    )
    run = run_training(config)
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    assert {"dice", "iou", "pooled_dice", "hd95", "hd95_worst", "nsd", "per_case"} <= set(metrics)
    assert metrics["n_images"] == len(read_manifest(prompts).split("test"))
    loaded = medalign.load(str(run / "bundle"))
    assert loaded.needs_text == (name == "text_unet")
    manifest = read_manifest(prompts)
    dataset = segmentation_dataset(config, manifest, loaded, ["image:a", "image:b"], "test", augment=False)
    from medalign.data.dataset import Collator

    batch = Collator(loaded.tokenizer)([dataset[0], dataset[1]])
    torch.manual_seed(0)
    probabilities = predict_probabilities(loaded, batch, ["image:a", "image:b"])
    assert probabilities.shape == (2, 64, 64) and ((probabilities >= 0) & (probabilities <= 1)).all()


def test_a_short_run_beats_the_untrained_unet(prompts: Path, tmp_path: Path) -> None:
    """Four epochs on 28 phantom cases: the test metrics must clear the same model at its initial
    weights by a wide margin (not just land in [0, 1])."""
    import json

    from lightning.fabric.utilities.seed import seed_everything

    config = load_config(
        REPO / "configs" / "segment" / "phantom_text.yaml",
        [
            f"out={tmp_path / 'run'}",
            f"data.manifest={prompts}",
            "data.phantom=null",
            "model.name=unet",
            "model.overrides={in_channels: 2, image_size: 64, channels: [8, 16, 32, 64]}",
            "train.epochs=4",
            "train.progress=false",
            "data.num_workers=0",
            "data.batch_size=8",
            "train.precision=32-true",
        ],
    )
    seed_everything(config.train.seed)
    keys = ["image:a", "image:b"]
    untrained = evaluate_segmentation(build_model(config), read_manifest(prompts), config, keys, "test")
    trained = json.loads((run_training(config, echo=lambda *_: None) / "metrics.json").read_text())
    for key in ("dice", "pooled_dice", "nsd"):
        assert trained[key] > 2 * untrained[key] + 0.02, (key, untrained[key], trained[key])
    assert trained["hd95"] < untrained["hd95"]


def test_segment_task_requires_a_mask_column() -> None:
    from medalign.config import validate_ranges

    config = load_config(REPO / "configs" / "segment" / "phantom_text.yaml", ["data.mask=null"])
    with pytest.raises(ConfigError, match=r"task segment needs data\.mask"):
        validate_ranges(config)


def test_cli_eval_segment(prompts: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from medalign.bundle import save_bundle
    from medalign.cli import app
    from medalign.models import create_model

    save_bundle(create_model("unet", in_channels=2, image_size=64, channels=[4, 8, 16]), tmp_path / "b")
    args = ["eval", "segment", "--model", str(tmp_path / "b"), "--manifest", str(prompts),
            "--modality", "image:a", "--modality", "image:b", "--out", str(tmp_path / "m.json")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    # the CLI reports exactly what the evaluation computes on the same bundle and split
    config = load_config(REPO / "configs" / "segment" / "phantom_text.yaml", ["data.phantom=null"])
    direct = evaluate_segmentation(
        medalign.load(str(tmp_path / "b")), read_manifest(prompts), config, ["image:a", "image:b"], "test"
    )
    assert metrics["n_images"] == len(read_manifest(prompts).split("test")) == direct["n_images"]
    for key in ("dice", "iou", "pooled_dice", "hd95", "hd95_worst", "nsd"):
        assert metrics[key] == pytest.approx(direct[key]), key
    bad = CliRunner().invoke(app, [*args[:6], "--modality", "image:z"])
    assert bad.exit_code == 1 and "image:z" in bad.output


def _phantom_config(prompts: Path, out: Path, *overrides: str) -> RunConfig:
    return load_config(
        REPO / "configs" / "segment" / "phantom_text.yaml",
        [
            f"out={out}",
            f"data.manifest={prompts}",
            "data.phantom=null",
            "train.progress=false",
            "data.num_workers=0",
            "data.batch_size=4",
            *overrides,
        ],
    )


def test_clip_decoder_starts_from_an_alignment_bundle(prompts: Path, tmp_path: Path) -> None:
    """NextGen-UIA's path: the aligned vision tower (and its preprocessing) becomes the decoder's backbone."""
    import json

    from medalign.bundle import save_bundle
    from medalign.models import create_model

    torch.manual_seed(1)
    encoder = create_model("align_tiny", in_channels=2, image_size=64)
    save_bundle(encoder, tmp_path / "aligned")
    config = _phantom_config(
        prompts,
        tmp_path / "run",
        "model.name=clip_decoder",
        f"model.init_from={tmp_path / 'aligned'}",
        "model.overrides={decoder_dim: 16}",
        "train.max_steps=1",
        "optim.lr=1.0e-9",
        "seg_loss.side_weight=0",
    )
    run = run_training(config)
    loaded = medalign.load(str(run / "bundle"))
    assert loaded.config.decoder_dim == 16 and loaded.config.vision.config["hidden_size"] == 64
    expected = encoder.vision.state_dict()
    assert expected.keys() == loaded.vision.state_dict().keys()
    for key, value in loaded.vision.state_dict().items():  # lr 1e-9: one step leaves them in place
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=0)
    assert json.loads((run / "metrics.json").read_text())["n_images"] == len(read_manifest(prompts).split("test"))


def test_unet_pretrained_starts_from_an_alignment_bundle_with_an_efficientnet_tower(
    prompts: Path, tmp_path: Path
) -> None:
    """A LiT-style bundle's CNN tower becomes the U-Net's encoder (weights, channels, statistics)."""
    from medalign.bundle import save_bundle
    from medalign.models import create_model

    lite0 = {"kind": "efficientnet_lite", "source": None, "config": {"variant": "efficientnet-lite0"}}
    torch.manual_seed(1)
    encoder = create_model("align_tiny", vision=lite0, in_channels=2, image_size=64)
    save_bundle(encoder, tmp_path / "aligned")
    config = _phantom_config(
        prompts,
        tmp_path / "run",
        "model.name=unet_pretrained",
        f"model.init_from={tmp_path / 'aligned'}",
        "model.overrides={decoder_channels: [32, 16, 8, 8]}",
        "train.max_steps=1",
        "optim.lr=1.0e-9",
        "seg_loss.side_weight=0",
    )
    loaded = medalign.load(str(run_training(config) / "bundle"))
    assert loaded.config.in_channels == 2 and loaded.config.image_mean == encoder.config.image_stats()[0]
    expected = dict(encoder.vision.named_parameters())  # (BatchNorm statistics move in a training step)
    for key, value in loaded.vision.named_parameters():  # lr 1e-9: one step leaves them in place
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=0)


def test_segmentation_init_from_loads_a_segmentation_bundle(prompts: Path, tmp_path: Path) -> None:
    from medalign.bundle import save_bundle
    from medalign.models import create_model
    from medalign.pipeline.run import build_model

    tiny = "{in_channels: 2, image_size: 64, channels: [4, 8, 16]}"
    torch.manual_seed(2)
    source = create_model("unet", in_channels=2, image_size=64, channels=[4, 8, 16])
    save_bundle(source, tmp_path / "seg")
    config = _phantom_config(
        prompts,
        tmp_path / "run",
        "model.name=unet",
        f"model.overrides={tiny}",
        f"model.init_from={tmp_path / 'seg'}",
    )
    torch.manual_seed(3)
    model = build_model(config)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)

    wider = _phantom_config(
        prompts,
        tmp_path / "r2",
        "model.name=unet",
        f"model.init_from={tmp_path / 'seg'}",
        "model.overrides={in_channels: 2, image_size: 64, channels: [8, 16, 32]}",
    )
    with pytest.raises(ValueError, match="do not fit model 'unet'"):
        build_model(wider)
    other = _phantom_config(
        prompts,
        tmp_path / "r3",
        f"model.init_from={tmp_path / 'seg'}",
        "model.overrides={in_channels: 2, image_size: 64, base_width: 8}",
    )
    with pytest.raises(ValueError, match="none of its weights fit model 'text_guided'"):
        build_model(other)


def test_init_from_refuses_a_bundle_of_the_other_kind(tmp_path: Path) -> None:
    from medalign.bundle import save_bundle
    from medalign.models import create_model
    from medalign.pipeline.run import build_model

    save_bundle(create_model("align_tiny", in_channels=1), tmp_path / "aligned")
    save_bundle(create_model("unet", in_channels=1, image_size=64, channels=[4, 8, 16]), tmp_path / "seg")
    unet = load_config(
        REPO / "configs" / "segment" / "phantom_text.yaml",
        [
            "model.name=unet",
            "model.overrides={in_channels: 1, channels: [4, 8, 16]}",
            f"model.init_from={tmp_path / 'aligned'}",
        ],
    )
    with pytest.raises(
        ValueError, match=r"DualEncoder bundle, which cannot initialise 'unet' \(segmentation\)"
    ):
        build_model(unet)
    align = load_config(
        REPO / "configs" / "align" / "phantom.yaml",
        ["model.name=align_tiny", "model.overrides={in_channels: 1}", f"model.init_from={tmp_path / 'seg'}"],
    )
    with pytest.raises(ValueError, match=r"segmentation bundle, which cannot initialise 'align_tiny' \(DualEncoder\)"):
        build_model(align)


def test_init_from_refuses_a_partial_load_unless_the_recipe_accepts_it() -> None:
    """Weights of the model the bundle lacks (missing) and weights of the bundle the model has no
    place for (unexpected) are listed and refused; init_from_partial: true loads what fits."""
    from medalign.models import create_model
    from medalign.pipeline.run import load_matching_weights

    model = create_model("unet", in_channels=2, image_size=64, channels=[4, 8, 16])
    weights = dict(create_model("unet", in_channels=2, image_size=64, channels=[4, 8, 16]).state_dict())
    dropped = sorted(weights)[0]
    del weights[dropped]
    weights["head.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"loads partially: 1 weights of the model are not in the bundle") as err:
        load_matching_weights(model, weights, "seg", "unet")
    assert dropped in str(err.value) and "head.extra.weight" in str(err.value)
    assert "init_from_partial: true" in str(err.value)
    before = model.state_dict()[dropped].clone()
    loaded = load_matching_weights(model, weights, "seg", "unet", partial=True)
    assert loaded.missing == (dropped,) and loaded.unexpected == ("head.extra.weight",)
    torch.testing.assert_close(model.state_dict()[dropped], before)  # kept its fresh initialisation
    for key, value in weights.items():
        if key != "head.extra.weight":
            torch.testing.assert_close(model.state_dict()[key], value)
