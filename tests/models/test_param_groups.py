"""Per-part learning rates: lr multipliers by parameter prefix and layer-wise decay inside a tower."""

from __future__ import annotations

import pytest
import torch

from medalign.config import OptimConfig, load_config
from medalign.models import create_model
from medalign.models.param_groups import layer_depths, parameter_groups
from medalign.training.engine import build_optimizer, build_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def _lr_of(groups: list[dict], param: torch.nn.Parameter) -> float:
    return next(g["lr"] for g in groups if any(p is param for p in g["params"]))


def test_vit_layers_get_geometric_rates_and_the_rest_full() -> None:
    model = create_model("align_tiny")  # 2-layer CLIP ViT + 2-layer BERT
    groups = parameter_groups(model, 1e-3, 0.05, {"vision": 0.1}, {"vision": 0.5})
    vision = dict(model.vision.named_parameters())
    embed = vision["model.embeddings.patch_embedding.weight"]
    layer0 = vision["model.encoder.layers.0.mlp.fc1.weight"]
    layer1 = vision["model.encoder.layers.1.mlp.fc1.weight"]
    post = vision["model.post_layernorm.weight"]
    # L = 2 blocks: embeddings depth 0 -> 0.5**3, layer i depth i+1, post norm depth 3 -> 1
    assert _lr_of(groups, embed) == pytest.approx(1e-3 * 0.1 * 0.5**3)
    assert _lr_of(groups, layer0) == pytest.approx(1e-3 * 0.1 * 0.5**2)
    assert _lr_of(groups, layer1) == pytest.approx(1e-3 * 0.1 * 0.5)
    assert _lr_of(groups, post) == pytest.approx(1e-3 * 0.1)
    assert _lr_of(groups, model.image_proj.weight) == pytest.approx(1e-3)
    assert _lr_of(groups, next(model.text.parameters())) == pytest.approx(1e-3)
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert any(p is model.logit_scale for g in no_decay for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_efficientnet_blocks_are_layers() -> None:
    model = create_model("align_tiny", vision={"source": "efficientnet-lite0"})
    names = [f"vision.{n}" for n, _ in model.vision.named_parameters()]
    depths = layer_depths(names, "vision")
    blocks = len(model.vision.blocks)
    assert depths["vision.stem.weight"] == (0, blocks)
    assert depths["vision.blocks.0._depthwise_conv.weight"] == (1, blocks)
    assert depths[f"vision.blocks.{blocks - 1}._project_conv.weight"] == (blocks, blocks)
    assert depths["vision.head.weight"] == (blocks + 1, blocks)


def test_typos_and_non_positive_rates_are_errors() -> None:
    model = create_model("align_tiny")
    with pytest.raises(ValueError, match=r"no trainable parameter under 'visoin'.*'vision'"):
        parameter_groups(model, 1e-3, 0.0, {"visoin": 0.1})
    with pytest.raises(ValueError, match="must be > 0"):
        parameter_groups(model, 1e-3, 0.0, {"vision": 0.0})


def test_recipe_keys_reach_the_optimiser_and_the_schedule_keeps_the_ratios() -> None:
    config = load_config(None, ["optim.lr=0.01", "optim.lr_multipliers={vision: 0.1}", "optim.warmup_steps=4"])
    assert config.optim.lr_multipliers == {"vision": 0.1}
    model = create_model("align_tiny")
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, total_steps=10)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    rates = {g["lr_multiplier"]: g["lr"] for g in optimizer.param_groups}
    assert rates[0.1] == pytest.approx(0.1 * rates[1.0])
    assert rates[1.0] == pytest.approx(0.01 * 3 / 4)
    assert isinstance(OptimConfig().lr_multipliers, dict)
