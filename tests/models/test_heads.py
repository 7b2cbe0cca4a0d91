"""Clinical model: heads, presence-masked fusion (mean and attention), text token, config checks, bundles."""

from __future__ import annotations

import pytest
import torch

from medalign.bundle import load_bundle, save_bundle
from medalign.models import create_model, list_models
from medalign.models.heads import ClinicalConfig, ClinicalModel, build_clinical_model

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


def images(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(b, 1, 32, 32, generator=g), "b": torch.rand(b, 1, 32, 32, generator=g)}


def tiny(**overrides) -> ClinicalModel:
    torch.manual_seed(0)
    model = create_model("clinical_tiny", modalities=["a", "b"], image_size=32, **overrides)
    return model.eval()


def test_registered_architectures():
    assert {"clinical_tiny", "clinical_small_minilm", "clinical_vit_b16"} <= set(list_models("clinical_*"))


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        ({"num_classes": 3}, {"features", "logits"}),
        ({"num_classes": 0, "survival": "cox"}, {"features", "risk"}),
        ({"survival": "discrete", "time_bins": [0, 12, 24, 60]}, {"features", "logits", "hazard_logits"}),
    ],
)
def test_heads_and_shapes(overrides, keys):
    model = tiny(**overrides)
    out = model(images())
    assert set(out) == keys
    assert out["features"].shape == (3, model.config.hidden_size)
    if "logits" in out:
        assert out["logits"].shape == (3, model.config.num_classes)
    if "risk" in out:
        assert out["risk"].shape == (3,)
    if "hazard_logits" in out:
        assert out["hazard_logits"].shape == (3, 3)


@pytest.mark.parametrize("fusion", ["mean", "attention"])
def test_absent_modality_pixels_never_change_the_output(fusion):
    model = tiny(fusion=fusion, survival="cox")
    x = images()
    present = torch.tensor([[True, False], [True, True], [False, True]])
    out = model(x, present)
    noisy = {k: v.clone() for k, v in x.items()}
    noisy["b"][0] = float("nan")  # absent in case 0
    noisy["a"][2] = 1e6  # absent in case 2
    again = model(noisy, present)
    for key in ("features", "logits", "risk"):
        assert torch.allclose(out[key], again[key], atol=1e-6), key
    # a modality missing from the dict is absent for every case: same as present=False
    only_a = model({"a": x["a"]})
    masked = model(x, torch.tensor([[True, False]] * 3))
    assert torch.allclose(only_a["features"], masked["features"], atol=1e-6)
    # and present modalities do matter
    assert not torch.allclose(out["features"][0], model(x, present.flip(1))["features"][0])


def test_mean_fusion_is_the_masked_mean_of_the_tokens():
    model = tiny()
    x = images(2)
    with torch.no_grad():
        pooled_a, _ = model.vision((x["a"] - 0.5) / 0.25)
        pooled_b, _ = model.vision((x["b"] - 0.5) / 0.25)
        token_a = model.image_proj(pooled_a) + model.modality_embed[0]
        token_b = model.image_proj(pooled_b) + model.modality_embed[1]
        both = model.norm((token_a + token_b) / 2)
        single = model.norm(token_a)
        out = model(x, torch.tensor([[True, True], [True, False]]))
    assert torch.allclose(out["features"][0], both[0], atol=1e-5)
    assert torch.allclose(out["features"][1], single[1], atol=1e-5)


@pytest.mark.parametrize("fusion", ["mean", "attention"])
def test_text_token_joins_the_fusion_only_where_present(fusion):
    model = tiny(text="tiny", fusion=fusion)
    assert model.needs_text and model.tokenizer is not None
    tokens = model.tokenizer(["two solid lesions", "no focal lesion", ""], padding=True, return_tensors="pt")
    x = images()
    with_text = model(x, None, tokens["input_ids"], tokens["attention_mask"])
    without = model(x)
    hidden = model(x, None, tokens["input_ids"], tokens["attention_mask"], torch.tensor([True, True, False]))
    assert not torch.allclose(with_text["features"][0], without["features"][0])
    assert torch.allclose(hidden["features"][2], without["features"][2], atol=1e-6)
    # a report alone can carry a case with no image
    report_only = model(x, torch.zeros(3, 2, dtype=torch.bool), tokens["input_ids"], tokens["attention_mask"])
    assert torch.isfinite(report_only["features"]).all()


def test_cases_without_any_input_are_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="no present modality and no report"):
        model(images(), torch.tensor([[True, True], [False, False], [True, False]]))
    with pytest.raises(ValueError, match="unknown modalities"):
        model({"c": torch.rand(1, 1, 32, 32)})
    with pytest.raises(ValueError, match=r"expected \[B, 1, H, W\]"):
        model({"a": torch.rand(1, 3, 32, 32)})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_classes": 1}, "num_classes must be 0"),
        ({"num_classes": 0}, "needs a head"),
        ({"survival": "discrete"}, "needs time_bins"),
        ({"survival": "discrete", "time_bins": [0, 10, 5]}, "needs time_bins"),
        ({"fusion": "sum"}, "fusion must be one of"),
        ({"modalities": ["a", "a"]}, "distinct"),
        ({"image_mean": [0.1, 0.2]}, "image_mean has 2 values"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("clinical_tiny", **overrides)


def test_image_stats_and_freezing():
    config = ClinicalConfig(vision=tiny().config.vision, in_channels=3, image_mean=[0.4], num_classes=2)
    assert config.image_stats() == ([0.4] * 3, [0.25] * 3)
    model = create_model("clinical_tiny", freeze_vision=True, text="tiny", freeze_text=True).train()
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.text.parameters())
    assert not model.vision.training and not model.text.training and model.classifier.training


def test_portable_config_and_bundle_round_trip(tmp_path):
    model = tiny(text="tiny", survival="discrete", time_bins=[0, 10, 20], fusion="attention")
    rebuilt = build_clinical_model(model.portable_config().to_dict())
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    loaded = load_bundle(save_bundle(model, tmp_path / "bundle"))
    assert isinstance(loaded, ClinicalModel) and loaded.config.time_bins == [0.0, 10.0, 20.0]
    tokens = model.tokenizer(["a report"] * 3, padding=True, return_tensors="pt")
    args = (images(), None, tokens["input_ids"], tokens["attention_mask"])
    for other in (rebuilt.eval(), loaded):
        for key, value in model(*args).items():
            assert torch.allclose(value, other(*args)[key], atol=1e-6), key
