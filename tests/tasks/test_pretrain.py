"""Stage I through the engine: views, the contrastive term, run_training, recipes, init_from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medalign.bundle import load_bundle, save_bundle
from medalign.config import ConfigError, PretrainLossConfig, RunConfig, build, load_config, validate_ranges
from medalign.losses import clip_loss
from medalign.models import DualEncoder, create_model
from medalign.models.mae import HybridMAE
from medalign.pipeline.run import run_training
from medalign.tasks.pretrain import PretrainTask, augment_views, paired_infonce, pooled_images

REPO = Path(__file__).resolve().parents[2]


def unit(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1
    )


def test_paired_infonce_is_clip_loss_on_the_valid_rows() -> None:
    a, b = unit(6, seed=1), unit(6, seed=2)
    every = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(paired_infonce(a, b, every, 0.1), clip_loss(a, b, 10.0, gather=False))
    valid = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(
        paired_infonce(a, b, valid, 0.1), clip_loss(a[valid], b[valid], 10.0, gather=False)
    )
    zero = paired_infonce(a.requires_grad_(), b, torch.zeros(6, dtype=torch.bool), 0.1)
    assert zero.item() == 0.0 and zero.requires_grad


def test_augment_views_are_seeded_and_in_range() -> None:
    images = torch.rand(4, 1, 32, 32)
    first = augment_views(images, generator=torch.Generator().manual_seed(0))
    again = augment_views(images, generator=torch.Generator().manual_seed(0))
    other = augment_views(images, generator=torch.Generator().manual_seed(1))
    assert first.shape == images.shape and torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1
    torch.manual_seed(7)
    global_a = augment_views(images)
    torch.manual_seed(7)
    assert torch.equal(global_a, augment_views(images))  # torch's RNG, which the engine seeds


def batch_of(present: list[list[bool]], size: int = 64) -> dict:
    rows = len(present)
    return {
        "image:a": torch.rand(rows, 1, size, size),
        "image:b": torch.rand(rows, 1, size, size),
        "modalities_present": torch.tensor(present),
    }


def test_modalities_views_pool_present_images_and_skip_unpaired_cases() -> None:
    torch.manual_seed(0)
    model = create_model("mae_tiny", in_channels=1)
    task = PretrainTask(
        model, PretrainLossConfig(views="modalities", contrastive_weight=0.5), ["image:a", "image:b"]
    )
    batch = batch_of([[True, True], [True, False], [True, True], [False, True], [True, True]])
    torch.manual_seed(3)
    out, first, second, valid = task.views(batch)
    assert out["mask"].shape[0] == 8  # every present image is reconstructed (pooled modalities)
    assert valid.tolist() == [True, False, True, False, True]  # unpaired cases: reconstruction only
    assert not second[1].any() and not first[3].any() and first[1].any()  # missing views stay empty
    torch.manual_seed(3)
    logs = task.training_step(batch)
    expected = logs["reconstruction"] + 0.5 * paired_infonce(first, second, valid, 0.1)
    torch.testing.assert_close(logs["loss"].detach(), expected.detach())


def test_full_views_contrast_the_unmasked_embeddings() -> None:
    """contrast_on: full -- the InfoNCE compares model.embed of the whole views, not the masked ones."""
    torch.manual_seed(0)
    model = create_model("mae_tiny", in_channels=1).eval()  # no dropout: embed() is deterministic
    batch = batch_of([[True, True], [True, False], [True, True]])
    task = PretrainTask(
        model, PretrainLossConfig(views="modalities", contrast_on="full"), ["image:a", "image:b"]
    )
    _, first, second, valid = task.views(batch)
    assert valid.tolist() == [True, False, True]
    torch.testing.assert_close(first[valid], model.embed(batch["image:a"][valid]))
    torch.testing.assert_close(second[valid], model.embed(batch["image:b"][valid]))
    augment = PretrainTask(model, PretrainLossConfig(views="augment", contrast_on="full"), ["image:a", "image:b"])
    torch.manual_seed(4)
    out, first, _, present = augment.views(batch)
    torch.manual_seed(4)
    views = torch.cat([augment_views(pooled_images(batch, ["image:a", "image:b"])[0]) for _ in range(2)])
    torch.testing.assert_close(first[present], model.embed(views[:5]))  # the 5 present images' first views
    assert out["mask"].shape[0] == 10  # both views are still reconstructed


def test_augment_views_and_plain_mae() -> None:
    torch.manual_seed(0)
    model = create_model("mae_tiny", in_channels=1)
    batch = batch_of([[True, True], [True, False], [True, True]])
    hybrid = PretrainTask(model, PretrainLossConfig(views="augment"), ["image:a", "image:b"])
    out, _, _, valid = hybrid.views(batch)
    assert out["mask"].shape[0] == 2 * 5 and valid.tolist() == [True, True, True, False, True, True]
    plain = PretrainTask(
        model, PretrainLossConfig(views="augment", contrastive_weight=0.0), ["image:a", "image:b"]
    )
    logs = plain.training_step(batch)
    torch.testing.assert_close(logs["loss"].detach(), logs["reconstruction"])
    logs["loss"].backward()
    assert model.projection[0].weight.grad is not None  # still in the graph (DDP needs every parameter)


def test_modalities_views_need_two_columns() -> None:
    model = create_model("mae_tiny", in_channels=1)
    with pytest.raises(ValueError, match="two image columns"):
        PretrainTask(model, PretrainLossConfig(views="modalities"), ["image:a"])
    raw = {
        "task": "pretrain",
        "data": {"phantom": {}, "modalities": ["image:a"]},
        "mae_loss": {"views": "modalities"},
    }
    with pytest.raises(ConfigError, match="at least two image columns"):
        validate_ranges(build(RunConfig, raw, ""))
    with pytest.raises(ConfigError, match="temperature"):
        validate_ranges(
            build(
                RunConfig, {"task": "pretrain", "data": {"phantom": {}}, "mae_loss": {"temperature": 0}}, ""
            )
        )


@pytest.mark.parametrize("views", ["modalities", "augment"])
def test_run_pretrain_writes_bundle_and_metrics(views: str, tmp_path: Path) -> None:
    config = load_config(
        REPO / "configs" / "pretrain" / "phantom.yaml",
        [
            f"out={tmp_path / views}",
            "data.phantom={n: 40, seed: 0, size: 64}",
            "data.batch_size=8",
            "data.num_workers=0",
            "data.eval_batch_size=16",
            "model.name=mae_tiny",
            "model.overrides={in_channels: 1, image_size: 64}",
            f"mae_loss.views={views}",
            "train.max_steps=2",
            "train.progress=false",
            "train.precision=32-true",  # bf16 autocast is slow on a CPU
        ],
    )
    run = run_training(config, echo=lambda *_: None)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["split"] == "test" and metrics["views"] == views
    assert metrics["reconstruction"] > 0 and metrics["mask_seed"] == 0
    assert 0 <= metrics["retrieval"]["R@1"] <= 1 and 0 <= metrics["retrieval_masked"]["R@1"] <= 1
    # modalities: a and b of each test case; augment: two views of each of the 2 images of a case
    assert metrics["n_reconstructed"] == 2 * metrics["n_pairs"]
    assert {"C", "test", "n_train"} <= set(metrics["probe"]) and metrics["probe"]["n_train"] > 0
    model = load_bundle(run / "bundle")
    assert isinstance(model, HybridMAE) and model.config.in_channels == 1
    log = (run / "logs" / "metrics.csv").read_text()
    assert "train/contrastive" in log and "train/reconstruction" in log


def test_pretrain_bundle_starts_an_alignment_model(tmp_path: Path) -> None:
    """init_from: the MAE's tower, channels, size and stats move to a dual encoder, weights included."""
    from medalign.pipeline.run import build_model

    torch.manual_seed(0)
    mae = create_model("mae_tiny", in_channels=1, image_mean=[0.3], image_std=[0.2])
    save_bundle(mae, tmp_path / "mae")
    config = build(RunConfig, {"model": {"name": "align_tiny", "init_from": str(tmp_path / "mae")}}, "")
    aligned = build_model(config)
    assert isinstance(aligned, DualEncoder) and aligned.config.in_channels == 1
    assert aligned.config.image_stats() == ([0.3], [0.2])
    for key, value in mae.vision.state_dict().items():
        torch.testing.assert_close(aligned.vision.state_dict()[key], value)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("clip_decoder", {"decoder_dim": 16}),  # segmentation
        ("clinical_tiny", {"modalities": ["a", "b"], "num_classes": 3, "survival": "cox"}),  # Stage III fusion
        ("report_tiny", {}),  # report generation
    ],
)
def test_pretrain_bundle_starts_segmentation_fusion_and_report_models(
    name: str, overrides: dict, tmp_path: Path
) -> None:
    from medalign.pipeline.run import build_model

    torch.manual_seed(0)
    mae = create_model("mae_tiny", in_channels=1, image_size=32, image_mean=[0.3], image_std=[0.2])
    save_bundle(mae, tmp_path / "mae")
    config = build(RunConfig, {"model": {"name": name, "overrides": overrides, "init_from": str(tmp_path / "mae")}}, "")
    model = build_model(config)
    assert model.config.in_channels == 1 and model.config.image_size == 32
    assert model.config.image_stats() == ([0.3], [0.2])
    for key, value in mae.vision.state_dict().items():
        torch.testing.assert_close(model.vision.state_dict()[key], value)


def test_pretrain_bundle_cannot_start_a_conv_fusion_model(tmp_path: Path) -> None:
    """The conv fusion models have no ViT tower: a clear error instead of a silent random start."""
    from medalign.pipeline.run import build_model

    save_bundle(create_model("mae_tiny", in_channels=1), tmp_path / "mae")
    config = build(RunConfig, {"model": {"name": "fuse_adf", "init_from": str(tmp_path / "mae")}}, "")
    with pytest.raises(ValueError, match=r"pretrain bundle, which cannot initialise 'fuse_adf'.*share no vision tower"):
        build_model(config)


@pytest.mark.parametrize("name", ["phantom", "medpix", "kvasir", "busi"])
def test_recipes_load_and_build(name: str) -> None:
    config = load_config(REPO / "configs" / "pretrain" / f"{name}.yaml")
    validate_ranges(config)
    assert config.task == "pretrain" and config.out == f"runs/pretrain_{name}"
    model = create_model(config.model.name, **config.model.overrides)
    assert isinstance(model, HybridMAE) and model.config.in_channels == config.data.channels
