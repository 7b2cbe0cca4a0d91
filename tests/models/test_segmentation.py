"""Segmentation models: the shared call and configs that rebuild the model (text guidance: test_text_guided)."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import torch

from medalign.models import create_model, list_models
from medalign.models.segmentation import (
    SEGMENTATION_MODELS,
    ClipDecoder,
    SegmentationModel,
    build_segmentation_model,
)

TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
TINY_TEXT = {"source": None, "config": TINY_BERT}  # random BERT with MiniLM's tokenizer ids
TINY_CLIP = {
    "config": {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "patch_size": 8,
    }
}
TINY: dict[str, dict[str, Any]] = {
    "unet": {"channels": [8, 16, 32], "num_res_units": 1},
    "attention_unet": {"channels": [8, 16, 32]},
    "swin_unetr": {"feature_size": 12, "depths": [1, 1, 1, 1]},
    "clip_decoder": {"vision": TINY_CLIP, "decoder_dim": 16, "image_size": 64},
    "text_guided": {"text": TINY_TEXT, "base_width": 8, "context_dim": 32, "image_size": 64},
    "text_unet": {"text": TINY_TEXT, "base_width": 8, "context_dim": 32, "image_size": 64},
}
HAS_EINOPS = importlib.util.find_spec("einops") is not None


def tiny(name: str, **overrides: Any) -> SegmentationModel:
    if name == "swin_unetr" and not HAS_EINOPS:
        pytest.skip("MONAI's SwinUNETR needs einops")
    torch.manual_seed(0)
    model = create_model(name, **{**TINY[name], **overrides})
    assert isinstance(model, SegmentationModel)
    return model


def text_inputs(batch: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 2000, (batch, length))
    ids[:, 0] = 101  # [CLS]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_every_segmentation_model_is_registered() -> None:
    assert set(SEGMENTATION_MODELS) <= set(list_models())
    assert set(TINY) == set(SEGMENTATION_MODELS)


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
@pytest.mark.parametrize("channels", [1, 2])
def test_forward_shapes_and_gradients(name: str, channels: int) -> None:
    model = tiny(name, in_channels=channels, num_classes=2)
    assert (model.in_channels, model.num_classes) == (channels, 2)
    pixels = torch.rand(2, channels, 64, 64, requires_grad=True)
    text = text_inputs() if model.needs_text else {}
    out = model(pixels, **text)
    assert out["logits"].shape == (2, 2, 64, 64)
    assert out["side_logits"] == []
    out["logits"].square().mean().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and sum(p.grad.abs().sum() for p in trainable if p.grad is not None) > 0


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_config_round_trip_rebuilds_the_architecture(name: str) -> None:
    model = tiny(name, in_channels=2)
    data = json.loads(json.dumps(model.config.to_dict()))
    again = build_segmentation_model(data)
    assert type(again) is type(model)
    assert again.config == model.config
    again.load_state_dict(model.state_dict(), strict=True)
    model.eval(), again.eval()
    pixels = torch.rand(1, 2, 64, 64)
    text = text_inputs(1) if model.needs_text else {}
    torch.testing.assert_close(again(pixels, **text)["logits"], model(pixels, **text)["logits"])


def test_wrong_inputs_fail_with_a_hint() -> None:
    model = tiny("unet")
    with pytest.raises(ValueError, match="expected pixel_values"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 1, 66, 66))
    with pytest.raises(TypeError, match="unknown override"):
        create_model("unet", chanels=[8, 16])
    assert not model.needs_text and model.tokenizer is None


# -- clip_decoder ---------------------------------------------------------------------------------


def test_clip_decoder_frozen_tower_has_no_trainable_parameters() -> None:
    model = tiny("clip_decoder", freeze_vision=True)
    assert isinstance(model, ClipDecoder)
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.vision.training and model.decoder.training
    assert model.layers == [1, 2, 3]


def test_clip_decoder_text_conditioning_depends_on_text() -> None:
    text = {"kind": "bert", "source": None, "config": TINY_BERT}
    model = tiny("clip_decoder", text=text).eval()
    assert model.needs_text and model.tokenizer is not None
    pixels = torch.rand(1, 1, 64, 64).repeat(2, 1, 1, 1)
    batch = model.tokenize(["left kidney", "polyp in the upper right"])
    logits = model(pixels, **batch)["logits"]
    assert not torch.allclose(logits[0], logits[1])
    with pytest.raises(ValueError, match="input_ids"):
        model(pixels)


def test_clip_decoder_from_dual_encoder_copies_the_vision_tower() -> None:
    encoder = create_model("align_tiny", in_channels=1)
    model = ClipDecoder.from_dual_encoder(encoder, decoder_dim=16)
    for key, value in encoder.vision.state_dict().items():
        torch.testing.assert_close(model.vision.state_dict()[key], value)
    assert model(torch.rand(1, 1, 64, 64))["logits"].shape == (1, 1, 64, 64)


def test_unet_logits_are_free_to_move() -> None:
    """Regression: MONAI's UNet ends in a normalised output channel, which made BCE stall."""
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, image_size=32, channels=[8, 16, 32])
    optimizer = torch.optim.AdamW(model.parameters(), 1e-2)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    mask = (((xx - 16) ** 2 + (yy - 16) ** 2) < 36).float()[None, None].repeat(4, 1, 1, 1)
    image = 0.3 + 0.4 * mask
    for _ in range(40):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(pixel_values=image)["logits"], mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
