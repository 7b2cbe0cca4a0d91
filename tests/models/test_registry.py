"""The registry contract, and every registered architecture building and training one step."""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.nn.functional as F

from medalign.models import DualEncoder, create_model, list_models, register_model
from medalign.models import registry as registry_module
from medalign.models.adapters import trainable_parameters
from medalign.models.registry import model_entrypoint

EXPECTED = {"align_tiny", "align_small_minilm", "align_vit_b16_minilm", "align_clip_b16", "siglip_tiny"}
HEAVY_PARAMS = 50_000_000


def test_builtin_names_registered() -> None:
    assert set(list_models()) >= EXPECTED
    assert list_models("align_*minilm*") == ["align_effnet_minilm", "align_small_minilm", "align_vit_b16_minilm"]
    assert list_models("mae_*") == ["mae_small", "mae_tiny", "mae_vit_b16"]
    assert list_models("nothing*") == []


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(KeyError, match="align_tiny"):
        create_model("align_tiyn")


def test_registering_a_name_twice_fails() -> None:
    def registry_test_dummy() -> torch.nn.Module:
        return torch.nn.Identity()

    register_model(registry_test_dummy)
    try:
        assert model_entrypoint("registry_test_dummy") is registry_test_dummy
        with pytest.raises(ValueError, match="already registered"):
            register_model(registry_test_dummy)
    finally:
        registry_module._ENTRYPOINTS.pop("registry_test_dummy")


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(TypeError, match="embed_dims"):
        create_model("align_tiny", embed_dims=32)


def _batch(model: DualEncoder, batch_size: int = 3) -> dict[str, torch.Tensor]:
    size, channels = model.config.image_size, model.config.in_channels
    tokens = model.tokenize(
        ["left upper zone cyst", "normal study", "two nodules, right lower zone"][:batch_size]
    )
    return {"pixel_values": torch.rand(batch_size, channels, size, size), **tokens}


@pytest.mark.parametrize("name", list_models("align_*") + list_models("siglip_*"))
def test_registered_model_builds_and_trains(name: str) -> None:
    """Dual encoders; the other families (segmentation, fusion, MAE, heads) have their own tests."""
    start = time.perf_counter()
    model = create_model(name)
    build_s = time.perf_counter() - start
    assert isinstance(model, DualEncoder)
    _, total = trainable_parameters(model)
    if total > HEAVY_PARAMS:
        # Too slow to run on CPU in the unit suite; building it proves the config is consistent.
        assert build_s < 20, f"{name} took {build_s:.1f}s to build"
        return

    torch.manual_seed(0)
    batch = _batch(model)
    out = model(**batch, return_tokens=True)
    dim = model.config.embed_dim
    # ViT towers give one token per patch; CNN towers one per cell of their stride-32 map
    stride = getattr(model.vision, "patch_size", None) or model.vision.feature_strides[-1]
    grid = (model.config.image_size // stride) ** 2
    assert out["image_embeds"].shape == (3, dim) and out["text_embeds"].shape == (3, dim)
    assert out["image_tokens"].shape == (3, grid, dim)
    assert out["text_tokens"].shape == (3, batch["input_ids"].shape[1], dim)
    torch.testing.assert_close(out["image_embeds"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_embeds"].norm(dim=-1), torch.ones(3))

    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    if out["logit_bias"] is not None:
        logits = logits + out["logit_bias"]
    target = torch.arange(3)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    loss = loss + out["image_tokens"].mean() + out["text_tokens"].mean()
    loss.backward()
    for param_name in ("logit_scale", "image_proj.weight", "text_proj.weight", "image_token_proj.weight"):
        grad = model.get_parameter(param_name).grad
        assert grad is not None and grad.abs().sum() > 0, param_name
    trainable_vision = [p for p in model.vision.parameters() if p.requires_grad]
    if trainable_vision:  # LiT towers may be locked
        assert trainable_vision[0].grad is not None and trainable_vision[0].grad.abs().sum() > 0


def test_overrides_reach_the_model() -> None:
    model = create_model("align_tiny", in_channels=1, image_size=32, embed_dim=16, projection="mlp")
    assert model.vision.model.config.num_channels == 1
    assert model.vision.model.config.image_size == 32
    out = model(**_batch(model, 2))
    assert out["image_embeds"].shape == (2, 16)


def test_siglip_tiny_has_bias_and_temperature() -> None:
    model = create_model("siglip_tiny")
    out = model(**_batch(model, 2))
    assert out["logit_bias"] is not None
    assert out["logit_bias"].item() == pytest.approx(-10.0)
    assert out["logit_scale"].item() == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("name", "field", "kind", "message"),
    [
        ("align_tiny", "vision", "bert", "vision tower has text kind 'bert'"),
        ("align_tiny", "text", "clip_vision", "text tower has vision kind 'clip_vision'"),
        ("mae_tiny", "vision", "bert", "vision tower has text kind 'bert'"),
        ("clinical_tiny", "text", "vit", "text tower has vision kind 'vit'"),
        ("report_tiny", "text", "vit", "text tower has vision kind 'vit'"),
        ("clip_decoder", "vision", "bert", "vision tower has text kind 'bert'"),
        ("text_unet", "text", "vit", "text tower has vision kind 'vit'"),
        ("fuse_moe", "text", "vit", "text tower has vision kind 'vit'"),
    ],
)
def test_every_family_refuses_a_tower_of_the_wrong_kind(name: str, field: str, kind: str, message: str) -> None:
    """One check (ConfigRecord.check_towers) serves every model family, dict or TowerConfig input."""
    from medalign.models.towers import TowerConfig

    for tower in (TowerConfig(kind), {"kind": kind, "source": None, "config": {}}):
        with pytest.raises(ValueError, match=re.escape(message)):
            create_model(name, **{field: tower})
