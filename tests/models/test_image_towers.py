"""Pretrained image towers that load offline (EfficientNet-Lite) and any transformers vision model
(``hf_vision``): real weights, channel adaptation, multi-scale features, portable rebuilds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medalign.models import create_model
from medalign.models.cnn_towers import imagenet_logits
from medalign.models.dual_encoder import DualEncoder
from medalign.models.tower_config import EFFICIENTNET_MEAN, EFFICIENTNET_STD
from medalign.models.towers import TowerConfig, build_vision_tower

pytestmark = pytest.mark.usefixtures("one_thread")

# ImageNet-1k classes of buildings like the temple in scikit-learn's china.jpg
BUILDINGS = {442: "bell cote", 449: "boathouse", 483: "castle", 497: "church", 538: "dome", 698: "palace", 832: "stupa"}
DAISY = 985


def _sample(name: str, size: int = 224) -> torch.Tensor:
    """A real photograph shipped with scikit-learn, RGB in [0, 1], resized to ``size``."""
    from sklearn.datasets import load_sample_image

    image = torch.tensor(load_sample_image(name)).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(EFFICIENTNET_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(EFFICIENTNET_STD).view(1, -1, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def lite0():
    return build_vision_tower(TowerConfig("efficientnet_lite", source="efficientnet-lite0"), 3, 224).eval()


@pytest.mark.parametrize("variant", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_shipped_weights_are_the_imagenet_ones(variant: str) -> None:
    """A random network puts ~0.1% on its top class and picks an arbitrary one; the shipped
    weights must recognise a building in a photograph of a temple."""
    tower = build_vision_tower(TowerConfig("efficientnet_lite", source=variant), 3, 224).eval()
    with torch.no_grad():
        probs = imagenet_logits(tower, _normalise(_sample("china.jpg"))).softmax(-1)[0]
    top = int(probs.argmax())
    assert top in BUILDINGS, f"{variant}: top class {top}"
    assert float(probs[top]) > 0.15


def test_daisy_and_random_weights_differ(lite0) -> None:
    with torch.no_grad():
        probs = imagenet_logits(lite0, _normalise(_sample("flower.jpg"))).softmax(-1)[0]
    assert int(probs.argmax()) == DAISY
    random_tower = build_vision_tower(TowerConfig("efficientnet_lite", config={"variant": "efficientnet-lite0"}), 3, 224)
    sd, rd = lite0.state_dict(), random_tower.state_dict()
    assert set(sd) == set(rd)
    assert not torch.equal(sd["stem.weight"], rd["stem.weight"])


def test_grayscale_stem_equals_the_rgb_network_on_a_repeated_image(lite0) -> None:
    """Summing the stem's RGB kernels: a 1-channel tower sees exactly what the RGB one sees on (g, g, g)."""
    gray_tower = build_vision_tower(TowerConfig("efficientnet_lite", source="efficientnet-lite0"), 1, 224).eval()
    gray = _normalise(_sample("china.jpg").mean(1, keepdim=True).repeat(1, 3, 1, 1))[:, :1]
    with torch.no_grad():
        pooled_gray, _ = gray_tower(gray)
        pooled_rgb, _ = lite0(gray.repeat(1, 3, 1, 1))
    torch.testing.assert_close(pooled_gray, pooled_rgb, atol=1e-4, rtol=1e-4)
    four = build_vision_tower(TowerConfig("efficientnet_lite", source="efficientnet-lite0"), 4, 64)
    assert four.stem.weight.shape[1] == 4


def test_multi_scale_features_and_tokens(lite0) -> None:
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        maps = lite0.feature_maps(x)
        pooled, tokens = lite0(x)
    assert lite0.feature_strides == [2, 4, 8, 16, 32]
    assert [m.shape[1] for m in maps] == lite0.feature_channels == [16, 24, 40, 112, 1280]
    assert [tuple(m.shape[-2:]) for m in maps] == [(96 // s, 128 // s) for s in lite0.feature_strides]
    assert pooled.shape == (2, 1280) and tokens.shape == (2, 3 * 4, 1280)
    torch.testing.assert_close(pooled, maps[-1].mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="divisible by 32"):
        lite0(torch.rand(1, 3, 100, 100))


def test_source_alone_selects_the_efficientnet_kind() -> None:
    cfg = TowerConfig("clip_vision", source="efficientnet_lite1")
    assert (cfg.kind, cfg.source) == ("efficientnet_lite", "efficientnet-lite1")
    assert cfg.weights_image_stats() == (EFFICIENTNET_MEAN, EFFICIENTNET_STD)
    with pytest.raises(ValueError, match=r"config\.variant"):
        build_vision_tower(TowerConfig("efficientnet_lite"), 3, 64)


def test_a_model_with_a_pretrained_tower_rebuilds_from_its_portable_config() -> None:
    model = create_model("align_tiny", vision={"source": "efficientnet-lite0"}, in_channels=1).eval()
    assert model.config.image_stats() == ([EFFICIENTNET_MEAN[0]], [EFFICIENTNET_STD[0]])
    portable = model.portable_config()
    assert portable.vision.source is None and portable.vision.config["variant"] == "efficientnet-lite0"
    rebuilt = DualEncoder(portable).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(x), model.encode_image(x))


def _save_tiny_hf_models(folder: Path) -> dict[str, Path]:
    from transformers import (
        CLIPConfig,
        CLIPModel,
        ConvNextConfig,
        ConvNextModel,
        Dinov2Config,
        Dinov2Model,
        SiglipConfig,
        SiglipModel,
    )

    vit = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 99}
    models = {
        "convnext": ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])),
        "dinov2": Dinov2Model(Dinov2Config(**vit, patch_size=8, image_size=64)),
        "clip": CLIPModel(CLIPConfig(text_config=text, vision_config={**vit, "patch_size": 8, "image_size": 64})),
        "siglip": SiglipModel(SiglipConfig(text_config=text, vision_config={**vit, "patch_size": 8, "image_size": 64})),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = folder / name
        model.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _save_tiny_hf_models(tmp_path_factory.mktemp("hf"))


@pytest.mark.parametrize(
    ("name", "strides"), [("convnext", [4, 8, 16, 32]), ("dinov2", [8] * 4), ("clip", [8] * 4), ("siglip", [8] * 4)]
)
def test_any_transformers_vision_model_is_a_tower(hf_models, name: str, strides: list[int]) -> None:
    tower = build_vision_tower(TowerConfig("hf_vision", source=str(hf_models[name])), 1, 64).eval()
    assert tower.feature_strides == strides
    x = torch.rand(2, 1, 96, 96)  # another size than built for: positions interpolate
    with torch.no_grad():
        pooled, tokens = tower(x)
        maps = tower.feature_maps(x)
    assert pooled.shape == (2, tower.hidden_size)
    assert tokens.shape[1] == (96 // max(strides)) ** 2
    assert [m.shape[1] for m in maps] == tower.feature_channels
    assert [m.shape[-1] for m in maps] == [96 // s for s in strides]
    rebuilt = build_vision_tower(TowerConfig("hf_vision", None, tower.hf_config_dict()), 1, 64).eval()
    rebuilt.load_state_dict(tower.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], pooled)


def test_a_hub_model_offline_is_one_line_naming_the_offline_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for kind in ("hf_vision", "clip_vision"):
        with pytest.raises(OSError) as info:
            build_vision_tower(TowerConfig(kind, source="no-such-org/no-such-vision-model"), 3, 64)
        message = str(info.value)
        assert "\n" not in message
        assert "no-such-org/no-such-vision-model" in message and "efficientnet-lite0" in message
