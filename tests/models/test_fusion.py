"""Fusion models: the shared call on every modality subset, absent modalities ignored, dropout, bundles."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from medalign.bundle import load_bundle, read_bundle_config, save_bundle
from medalign.config import FuseLossConfig, SegLossConfig
from medalign.models import create_model, list_models
from medalign.models.fusion import FUSION_MODELS, FusionModel, build_fusion_model, modality_dropout
from medalign.tasks.fuse import FuseTask

MODALITIES = ["pre", "flair", "post"]
TINY_TEXT = {  # random BERT with MiniLM's tokenizer ids
    "source": None,
    "config": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
}
TINY: dict[str, dict[str, Any]] = {
    "fuse_adf": {},
    "fuse_moe": {"text": TINY_TEXT, "token_dim": 16, "num_heads": 2, "moe_layers": 2},
    "fuse_early": {},
    "fuse_late": {},
}
SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


def tiny(name: str, head: str = "segment", **overrides: Any) -> FusionModel:
    torch.manual_seed(0)
    classes = {"num_classes": 3} if head == "classify" else {}
    settings = {"in_channels": 3, "image_size": 16, "base_width": 4, "depth": 2, **TINY[name], **overrides}
    model = create_model(name, modalities=MODALITIES, task_head=head, **classes, **settings)
    assert isinstance(model, FusionModel)
    return model.eval()


def images(batch: int = 2, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(batch, 1, size, size, generator=g) for m in MODALITIES}


def text_inputs(model: FusionModel) -> dict[str, torch.Tensor]:
    if not model.needs_text:
        return {}
    return model.tokenize(["a cyst in the left upper zone", "no focal lesion"])


def test_every_fusion_model_is_registered() -> None:
    assert set(FUSION_MODELS) <= set(list_models("fuse_*"))
    assert set(TINY) == set(FUSION_MODELS)


@pytest.mark.parametrize("head", ["segment", "classify"])
@pytest.mark.parametrize("name", FUSION_MODELS)
def test_any_subset_works_and_absent_pixels_are_ignored(name: str, head: str) -> None:
    model = tiny(name, head)
    text = text_inputs(model)
    x = images()
    expected = (2, 1, 16, 16) if head == "segment" else (2, 3)
    with torch.no_grad():
        for subset in SUBSETS:
            present = torch.zeros(2, 3, dtype=torch.bool)
            present[:, list(subset)] = True
            out = model(x, present, **text)
            assert out["logits"].shape == expected and torch.isfinite(out["logits"]).all()
            assert torch.equal(out["present"], present)
            scrambled = {
                m: v if i in subset else torch.randn_like(v) * 100 for i, (m, v) in enumerate(x.items())
            }
            again = model(scrambled, present, **text)
            assert torch.equal(out["logits"], again["logits"]), subset  # exactly, not approximately
            omitted = model({m: x[m] for i, m in enumerate(MODALITIES) if i in subset}, **text)
            torch.testing.assert_close(omitted["logits"], out["logits"])  # a missing key = absent


@pytest.mark.parametrize("name", FUSION_MODELS)
def test_presence_is_per_case(name: str) -> None:
    """Case 0 with every modality, case 1 with FLAIR only: case 1 equals FLAIR alone run on its own."""
    model = tiny(name)
    x = images()
    present = torch.tensor([[True, True, True], [False, True, False]])
    with torch.no_grad():
        both = model(x, present)["logits"]
        alone = model({"flair": x["flair"][1:]})["logits"]
        full = model({m: v[:1] for m, v in x.items()})["logits"]
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:1], full, atol=1e-5, rtol=1e-5)


def test_adf_features_for_the_losses() -> None:
    model = tiny("fuse_adf")
    out = model(images())
    features = out["features"]
    assert len(features["multiscale"]) == 3 and len(features["multiscale"][0]) == 3  # depth 2: 3 scales
    assert [f.shape[1] for f in features["multiscale"][0]] == [4, 8, 16]
    # default adf_scales: the two deepest (1, 2): halves of widths 8 and 16, concatenated
    assert all(v.shape == (2, 4 + 8) for v in features["shared"] + features["specific"])


def test_moe_text_is_optional_and_masked() -> None:
    model = tiny("fuse_moe")
    x = images()
    tokens = text_inputs(model)
    with torch.no_grad():
        without = model(x)["logits"]
        hidden = model(x, **tokens, text_present=torch.tensor([False, False]))["logits"]
        with_text = model(x, **tokens)["logits"]
        out = model(x, **tokens)
    torch.testing.assert_close(hidden, without, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_text, without)
    assert out["balance_loss"].ndim == 0 and float(out["balance_loss"]) >= 1.0 - 1e-5
    assert out["features"]["tokens"].shape == (2, 3, 16, 16)  # [B, M, L = (16 / 4)^2, token_dim]


def test_modality_dropout_never_drops_every_modality() -> None:
    present = torch.tensor(
        [[True, True, True], [True, False, False], [False, False, False], [False, True, True]]
    )
    present = present.repeat(500, 1)
    torch.manual_seed(0)
    kept = modality_dropout(present, 0.9)
    assert not (kept & ~present).any()  # never adds a modality
    assert torch.equal(kept.any(dim=1), present.any(dim=1))  # every case keeps one (if it had one)
    assert 0.05 < (kept.sum() / present.sum()).item() < 0.6  # and it does drop
    torch.manual_seed(0)
    assert torch.equal(modality_dropout(present, 0.9), kept)  # seeded through torch's RNG
    assert modality_dropout(present, 0.0) is present


def test_training_applies_modality_dropout() -> None:
    model = tiny("fuse_adf", modality_dropout=0.7).train()
    torch.manual_seed(0)
    out = model(images(batch=64), torch.ones(64, 3, dtype=torch.bool))
    assert out["present"].any(dim=1).all() and not out["present"].all()
    model.eval()
    assert model(images(batch=4))["present"].all()  # inference uses what it is given


def test_fuse_task_losses_train_every_part() -> None:
    model = tiny("fuse_adf").train()
    batch = {
        **{f"image:{m}": v for m, v in images(batch=4).items()},
        "modalities_present": torch.tensor([[True] * 3, [True] * 3, [True, True, False], [True] * 3]),
        "mask": (torch.rand(4, 1, 16, 16) > 0.7).float(),
    }
    task = FuseTask(model, FuseLossConfig(), SegLossConfig(), [f"image:{m}" for m in MODALITIES], "mask")
    result = task.training_step(batch)
    names = {"loss_mmd", "loss_similarity", "loss_dissimilarity", "loss_orthogonality", "loss_contrastive"}
    assert names <= set(result) and all(torch.isfinite(v) for v in result.values())
    result["loss"].backward()
    for name in ("shared_heads", "specific_heads", "fuse_convs", "decoder"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads), name


@pytest.mark.parametrize("name", FUSION_MODELS)
def test_bundle_round_trip(name: str, tmp_path: Path) -> None:
    model = tiny(name)
    save_bundle(model, tmp_path / "bundle")
    assert read_bundle_config(tmp_path / "bundle")["kind"] == "fusion"
    loaded = load_bundle(tmp_path / "bundle")
    assert type(loaded) is type(model) and loaded.config.modalities == MODALITIES
    present = torch.tensor([[True, False, True], [False, True, False]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(images(), present, **text_inputs(model))["logits"],
            model(images(), present, **text_inputs(model))["logits"],
        )
    assert build_fusion_model(loaded.config.to_dict()).config == loaded.config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"in_channels": 4}, "not divisible by 3 modalities"),
        ({"task_head": "classify"}, "num_classes >= 2"),
        ({"modalities": ["a", "a", "b"]}, "distinct"),
        ({"modality_dropout": 1.0}, "modality_dropout"),
        ({"adf_scales": [5]}, "adf_scales"),
    ],
)
def test_bad_configs_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("fuse_adf", **{"modalities": MODALITIES, "in_channels": 3, **overrides})


def test_bad_inputs_name_the_problem() -> None:
    model = tiny("fuse_early")
    with pytest.raises(TypeError, match="dict"):
        model(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="'t1'"):
        model({"t1": torch.rand(2, 1, 16, 16)})
    with pytest.raises(ValueError, match="divisible by 4"):
        model({"pre": torch.rand(2, 1, 18, 18)})


# -- image towers as encoders ------------------------------------------------------------------------

TINY_VIT = {  # 4 layers at patch 8 -> a pyramid at strides 2, 4, 8, 16
    "kind": "clip_vision",
    "source": None,
    "config": {"hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 32, "patch_size": 8},
}


@pytest.mark.parametrize("name", FUSION_MODELS)
def test_an_image_tower_encodes_every_modality(name: str, tmp_path: Path) -> None:
    model = tiny(name, vision=TINY_VIT, image_size=32, decoder_channels=[16, 8, 8])
    assert model.widths == [4, 8, 16, 16] and model.size_multiple == 16
    x, text = images(size=32), text_inputs(model)
    present = torch.tensor([[True, False, True], [False, True, False]])
    with torch.no_grad():
        out = model(x, present, **text)["logits"]
        scrambled = {m: v if present[:, i].all() else torch.randn_like(v) * 100 for i, (m, v) in enumerate(x.items())}
        scrambled = {m: torch.where(present[:, i, None, None, None], x[m], scrambled[m]) for i, m in enumerate(x)}
        again = model(scrambled, present, **text)["logits"]
    assert out.shape == (2, 1, 32, 32)
    torch.testing.assert_close(again, out)  # absent pixels never reach the output
    save_bundle(model, tmp_path / "bundle")
    stored = read_bundle_config(tmp_path / "bundle")["model"]["vision"]
    assert stored["source"] is None and stored["config"]["num_hidden_layers"] == 4
    loaded = load_bundle(tmp_path / "bundle")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, present, **text)["logits"], out)


def test_early_fusion_feeds_three_sequences_to_the_pretrained_rgb_stem() -> None:
    from medalign.models.cnn_towers import load_efficientnet_state

    model = tiny("fuse_early", vision={"source": "efficientnet-lite0"}, image_size=64, freeze_vision=True)
    stem = model.encoder.tower.stem.weight
    torch.testing.assert_close(stem, load_efficientnet_state("efficientnet-lite0")["_conv_stem.weight"])
    assert not any(p.requires_grad for p in model.encoder.tower.parameters())
    assert model.widths == [16, 24, 40, 112, 1280]
    assert model(images(size=64))["logits"].shape == (2, 1, 64, 64)  # stride-2 logits upsampled
    adf = tiny("fuse_adf", vision={"source": "efficientnet-lite0"}, image_size=64, shared_encoder=True)
    assert sorted(adf.shared_heads) == ["3", "4"]  # the two deepest of the tower's five scales
    with pytest.raises(ValueError, match="adf_scales"):
        tiny("fuse_adf", vision={"source": "efficientnet-lite0"}, image_size=64, adf_scales=[5])


def test_early_fusion_on_a_frozen_pretrained_tower_learns_a_toy_mask() -> None:
    """The lesion shows in FLAIR only; the decoder on frozen ImageNet features finds it in 20 steps."""
    from medalign.losses import SegmentationLoss

    torch.manual_seed(0)
    model = tiny("fuse_early", vision={"source": "efficientnet-lite0"}, image_size=64, freeze_vision=True)

    def toy(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
        centres = torch.randint(16, 48, (8, 2), generator=g).tolist()
        masks = torch.stack([(((yy - cy) ** 2 + (xx - cx) ** 2) <= 64).float() for cy, cx in centres])[:, None]
        x = {m: 0.4 + 0.15 * torch.rand(8, 1, 64, 64, generator=g) for m in MODALITIES}
        x["flair"] = x["flair"] + 0.3 * masks
        return x, masks

    criterion = SegmentationLoss(kind="dice_bce")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 3e-3)
    x, masks = toy(0)
    model.train()
    for _ in range(20):
        loss = criterion(model(x)["logits"], masks, [])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, masks = toy(1)
    with torch.no_grad():
        predicted = (model(x)["logits"] > 0).float()
    dice = 2 * (predicted * masks).sum() / (predicted.sum() + masks.sum())
    assert float(dice) > 0.85
