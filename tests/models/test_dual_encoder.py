"""DualEncoder config, channels, preprocessing, rebuilding from a saved config, pretrained towers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medalign.models import DualEncoder, DualEncoderConfig, TowerConfig, create_model
from medalign.models.pretrained import adapt_patch_embedding
from medalign.models.towers import (
    MINILM,
    build_text_tower,
    build_tokenizer,
    build_vision_tower,
    resolve_source,
)

TINY_VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 8,
}


def test_config_round_trips_through_json() -> None:
    config = create_model("align_tiny").config.replace(
        init_logit_bias=-10.0,
        image_mean=[0.5],
        adapters={"vision": {"type": "lora", "r": 4}},
        text={"config": {"num_hidden_layers": 1}},
    )
    data = json.loads(json.dumps(config.to_dict()))
    again = DualEncoderConfig.from_dict(data)
    assert again == config
    assert again.text.config["num_hidden_layers"] == 1
    assert again.text.config["hidden_size"] == 64  # merged, not replaced
    with pytest.raises(ValueError, match="unknown DualEncoderConfig keys"):
        DualEncoderConfig.from_dict({**data, "embed_dims": 3})


def test_config_validates_channel_statistics() -> None:
    base = create_model("align_tiny").config
    assert base.image_stats()[0] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    mean, std = base.replace(in_channels=4).image_stats()
    assert len(mean) == len(std) == 4
    assert base.replace(in_channels=2, image_std=[0.3]).image_stats()[1] == [0.3, 0.3]
    with pytest.raises(ValueError, match="image_mean has 3 values"):
        base.replace(in_channels=1, image_mean=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="unknown tower kind"):
        TowerConfig("resnet")


@pytest.mark.parametrize("channels", [1, 4])
def test_grayscale_and_multichannel_inputs(channels: int) -> None:
    model = create_model("align_tiny", in_channels=channels, image_size=32).eval()
    tokens = model.tokenize(["a", "b"])
    out = model(torch.rand(2, channels, 32, 32), **tokens, return_tokens=True)
    assert out["image_embeds"].shape == (2, 64)
    assert out["image_tokens"].shape == (2, 4, 64)
    with pytest.raises(ValueError, match=f"expected pixel_values \\[B, {channels}"):
        model.encode_image(torch.rand(2, 3 if channels != 3 else 1, 32, 32))


def test_pixel_normalisation_happens_inside_the_model() -> None:
    model = create_model("align_tiny", image_mean=[0.2, 0.3, 0.4], image_std=[0.5, 0.6, 0.7]).eval()
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    pooled, _ = model.vision((x - mean) / std)
    torch.testing.assert_close(model.encode_image(x), F.normalize(model.image_proj(pooled), dim=-1))


def test_forward_outputs_and_temperature_clamp() -> None:
    model = create_model("align_tiny").eval()
    tokens = model.tokenize(["short", "a somewhat longer caption"])
    out = model(torch.rand(2, 3, 64, 64), **tokens, return_tokens=True)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["logit_bias"] is None
    assert out["text_mask"].dtype == torch.bool
    assert out["text_mask"].sum(1).tolist() == tokens["attention_mask"].sum(1).tolist()
    torch.testing.assert_close(out["text_embeds"], model.encode_text(**tokens))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model(torch.rand(1, 3, 64, 64), **model.tokenize(["x"]))["logit_scale"].item() == pytest.approx(
        100.0
    )


def test_tokenizer_is_lazy_and_not_in_state_dict() -> None:
    model = create_model("align_tiny")
    assert model._tokenizer is None
    assert model.tokenizer is model.tokenizer
    assert len(model.tokenizer) == 30522 == model.text.model.config.vocab_size
    assert not any("tokenizer" in key for key in model.state_dict())


def test_portable_config_rebuilds_without_sources(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = tmp_path / "vision"
    _save_clip_vision(source)
    model = create_model(
        "align_tiny",
        in_channels=1,
        image_size=32,
        vision={"source": str(source)},
        adapters={"text": {"type": "mona", "bottleneck": 8}},
    ).eval()
    portable = model.portable_config()
    assert portable.vision.source is None and portable.vision.config["num_channels"] == 1
    data = json.loads(json.dumps(portable.to_dict()))
    rebuilt = DualEncoder(DualEncoderConfig.from_dict(data)).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    batch = {"pixel_values": torch.rand(2, 1, 32, 32), **model.tokenize(["a cyst", "no cyst"])}
    expected, actual = model(**batch), rebuilt(**batch)
    torch.testing.assert_close(actual["image_embeds"], expected["image_embeds"])
    torch.testing.assert_close(actual["text_embeds"], expected["text_embeds"])


def test_minilm_from_package_folder_gives_sentence_embeddings() -> None:
    config = TowerConfig("bert", source=MINILM)
    tower = build_text_tower(config).eval()
    tokenizer = build_tokenizer(config)
    assert tower.hidden_size == 384
    batch = tokenizer(
        ["cyst in the left upper zone", "left upper zone cyst", "normal study"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        pooled, tokens = tower(batch["input_ids"], batch["attention_mask"])
    assert tokens.shape[:2] == batch["input_ids"].shape
    emb = F.normalize(pooled, dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def _save_clip_vision(folder: Path, kind: str = "clip_vision", image_size: int = 32) -> None:
    tower = build_vision_tower(TowerConfig(kind, config=TINY_VISION), in_channels=3, image_size=image_size)
    tower.model.save_pretrained(folder)


@pytest.mark.parametrize("kind", ["clip_vision", "vit"])
def test_pretrained_rgb_patch_embedding_adapts_to_gray_and_multichannel(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    _save_clip_vision(tmp_path, kind)
    config = TowerConfig(kind, source=str(tmp_path))
    rgb = build_vision_tower(config, in_channels=3).eval()
    gray = build_vision_tower(config, in_channels=1).eval()
    six = build_vision_tower(config, in_channels=6).eval()
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = rgb(image.repeat(1, 3, 1, 1))
        for tower, channels in ((gray, 1), (six, 6)):
            actual = tower(image.repeat(1, channels, 1, 1))
            torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-4)
    assert gray.model.config.num_channels == 1 and gray.hf_config_dict()["num_channels"] == 1


def test_gray_model_matches_rgb_model_on_replicated_image(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _save_clip_vision(tmp_path)
    stats = {"image_mean": [0.5], "image_std": [0.25], "image_size": 32}
    vision = {"source": str(tmp_path)}
    rgb = create_model("align_tiny", vision=vision, **stats).eval()
    gray = create_model("align_tiny", vision=vision, in_channels=1, **stats).eval()
    gray.image_proj.load_state_dict(rgb.image_proj.state_dict())
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray.encode_image(image), rgb.encode_image(image.repeat(1, 3, 1, 1)))


def test_pretrained_position_embeddings_follow_image_size(tmp_path: Path) -> None:
    _save_clip_vision(tmp_path, image_size=32)
    tower = build_vision_tower(TowerConfig("clip_vision", source=str(tmp_path)), in_channels=3, image_size=64)
    _, tokens = tower(torch.rand(1, 3, 64, 64))
    assert tokens.shape == (1, 64, 32)
    assert tower.hf_config_dict()["image_size"] == 64


def test_patch_embedding_adaptation_rules() -> None:
    weight = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(adapt_patch_embedding(weight, 1), weight.sum(1, keepdim=True))
    four = adapt_patch_embedding(weight, 4)
    assert four.shape == (5, 4, 4, 4)
    torch.testing.assert_close(four[:, 3], weight[:, 0] * 0.75)
    assert adapt_patch_embedding(weight, 3) is weight


def test_sources_resolve_without_network(tmp_path: Path) -> None:
    assert Path(resolve_source(MINILM), "config.json").is_file()
    assert resolve_source(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_source("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"


def test_random_clip_text_tower_follows_its_tokenizer() -> None:
    config = TowerConfig(
        "clip_text",
        config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    )
    tower = build_text_tower(config).eval()
    tokenizer = build_tokenizer(config)
    assert tower.model.config.vocab_size == len(tokenizer)
    assert tower.model.config.eos_token_id == tokenizer.sep_token_id  # CLIP pools at [SEP]
    batch = tokenizer(["one", "two words here"], padding=True, return_tensors="pt")
    pooled, tokens = tower(batch["input_ids"], batch["attention_mask"])
    sep_at = (batch["input_ids"] == tokenizer.sep_token_id).int().argmax(1)
    torch.testing.assert_close(pooled, tokens[torch.arange(2), sep_at])


def test_full_clip_checkpoint_feeds_both_towers(tmp_path: Path) -> None:
    """The layout of openai/clip-vit-base-patch16 (one CLIPModel folder) serves vision and text sources."""
    from transformers import CLIPConfig, CLIPModel

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    text_ids = {"vocab_size": 30522, "bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}
    clip = CLIPModel(
        CLIPConfig(
            text_config={**small, **text_ids}, vision_config={**small, "patch_size": 16, "image_size": 32}
        )
    ).eval()
    clip.save_pretrained(tmp_path)
    model = create_model(
        "align_clip_b16",
        image_size=32,
        vision={"source": str(tmp_path)},
        text={"source": str(tmp_path), "tokenizer": MINILM},
    ).eval()
    assert model.vision.hidden_size == model.text.hidden_size == 32
    tokens = model.tokenize(["a cyst", "normal study"])
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        text_pooled, _ = model.text(**tokens)
        image_pooled, _ = model.vision(pixels)
        torch.testing.assert_close(text_pooled, clip.text_model(**tokens).pooler_output)
        torch.testing.assert_close(image_pooled, clip.vision_model(pixel_values=pixels).pooler_output)


def test_checkpoint_of_the_wrong_kind_fails_loudly(tmp_path: Path) -> None:
    _save_clip_vision(tmp_path)
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        build_vision_tower(TowerConfig("vit", source=str(tmp_path)), in_channels=3)


def test_frozen_tower_stays_in_eval_mode_while_training() -> None:
    from medalign.models import create_model

    model = create_model("align_tiny", freeze_text=True)
    model.train()
    assert model.training and model.vision.training and not model.text.training
    tokens = model.tokenizer(["a cyst in the left upper zone"], return_tensors="pt")
    first = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    second = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    assert torch.equal(first, second)  # no dropout in the locked tower


def test_late_fusion_reads_each_modality_with_the_shared_tower() -> None:
    """image_modalities=2: one tower per modality image, pooled features averaged, tokens side by side."""
    torch.manual_seed(0)
    model = create_model("align_tiny", in_channels=2, image_modalities=2, image_size=32, image_mean=[0.3, 0.6])
    assert model.tower_channels == 1 and model.vision.model.config.num_channels == 1
    pixels = torch.rand(3, 2, 32, 32)
    pooled, tokens = model.image_features(pixels)
    first, first_tokens = model.vision((pixels[:, :1] - 0.3) / model.pixel_std[:, :1])
    second, second_tokens = model.vision((pixels[:, 1:] - 0.6) / model.pixel_std[:, 1:])
    torch.testing.assert_close(pooled, (first + second) / 2)
    torch.testing.assert_close(tokens, torch.cat([first_tokens, second_tokens], dim=1))
    swapped = model.encode_image(pixels.flip(1))  # modalities are read alike: order changes nothing
    assert not torch.allclose(swapped, model.encode_image(pixels))  # (their statistics differ here)
    with pytest.raises(ValueError, match="image_modalities=2 must be >= 1 and divide in_channels=3"):
        create_model("align_tiny", in_channels=3, image_modalities=2)


def test_a_frozen_text_tower_encodes_each_text_once() -> None:
    torch.manual_seed(0)
    frozen = create_model("align_tiny", freeze_text=True).train()
    calls = []
    frozen.text.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    ids = torch.randint(1000, 2000, (4, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding is not part of a text's identity
    first = frozen.encode_text(ids, mask)
    ids[0, 9] = 5  # a padded position: the same text
    again = frozen.encode_text(ids, mask)
    assert calls == [4] and torch.equal(first, again)
    trainable = create_model("align_tiny").eval()
    trainable.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(trainable.encode_text(ids, mask), first)
    frozen.load_state_dict(trainable.state_dict())
    assert not frozen._frozen_text_cache  # loading weights empties the cache
    frozen.encode_text(ids[:2], mask[:2])
    assert calls[-1] == 2
