"""The text-guided segmenter: it learns to let the prompt pick the target, and its parts behave."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medalign.bundle import load_bundle, save_bundle
from medalign.losses import SegmentationLoss
from medalign.models import create_model
from medalign.models.text_guided import (
    LegacyTextUNet,
    LegacyTextUNetConfig,
    TextGuidedSegmenter,
    sinusoidal_2d,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
TINY_TEXT = {"source": None, "config": TINY_BERT}  # random BERT with MiniLM's tokenizer ids
TINY = {"text": TINY_TEXT, "base_width": 8, "context_dim": 32, "image_size": 32, "depth": 2}
ATTRS = {"side": ["left", "right"], "zone": ["upper", "middle", "lower"]}


def tiny(**overrides: Any) -> TextGuidedSegmenter:
    torch.manual_seed(0)
    model = create_model("text_guided", **{**TINY, **overrides})
    assert isinstance(model, TextGuidedSegmenter)
    return model


# -- the toy: two identical objects, only the prompt says which one is the target -------------

TOY_SIZE = 48  # the U-Net's receptive field does not span it: a position must be told, not inferred
QUADRANTS = (("upper", "left"), ("upper", "right"), ("lower", "left"), ("lower", "right"))
TOY_TEMPLATES = (
    "the object in the {v} {h}",
    "segment the {v} {h} one",
    "{v} {h} quadrant",
    "find the spot in the {h} {v} part of the image",
)


def two_object_toy(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` images, each with two identical discs in two different quadrants.

    Each image comes with both prompts (a template naming the quadrant of one disc) and both
    masks, so an image-only model can do no better than segmenting both discs (Dice ~0.67).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:TOY_SIZE, 0:TOY_SIZE]
    half = TOY_SIZE / 2
    cases = []
    for _ in range(n):
        image = rng.normal(0.0, 0.05, (TOY_SIZE, TOY_SIZE))
        prompts, masks = [], []
        for q in rng.choice(len(QUADRANTS), size=2, replace=False):
            v, h = QUADRANTS[q]
            r = rng.uniform(3, 5) * TOY_SIZE / 32
            cy = rng.uniform(r + 1, half - r - 1) + (half if v == "lower" else 0)
            cx = rng.uniform(r + 1, half - r - 1) + (half if h == "right" else 0)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            image[mask] += 1.0
            masks.append(mask)
            prompts.append(TOY_TEMPLATES[int(rng.integers(len(TOY_TEMPLATES)))].format(v=v, h=h))
        cases.append({"image": image, "prompts": prompts, "masks": masks})
    return cases


def toy_batch(cases: list[dict[str, Any]], which: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    pixels = torch.tensor(np.stack([c["image"] for c in cases]), dtype=torch.float32)[:, None]
    masks = torch.tensor(np.stack([c["masks"][w] for c, w in zip(cases, which, strict=True)]))[:, None]
    return pixels, masks.float(), [c["prompts"][w] for c, w in zip(cases, which, strict=True)]


def dice_per_image(probabilities: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    p, g = probabilities > 0.5, masks > 0.5
    return 2 * (p & g).sum((1, 2, 3)) / (p.sum((1, 2, 3)) + g.sum((1, 2, 3))).clamp(min=1)


def train_on_toy(model: torch.nn.Module, steps: int, seed: int = 0) -> float:
    """Adam on batches that hold each image twice, once per prompt; returns the seconds taken
    (not asserted: a busy CI machine must not fail a test that measures learning)."""
    data, rng = two_object_toy(512, seed), np.random.default_rng(seed + 1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    criterion = SegmentationLoss("dice_bce")
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        cases = [data[i] for i in rng.integers(len(data), size=8)] * 2
        pixels, masks, prompts = toy_batch(cases, [0] * 8 + [1] * 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(pixels, **model.tokenize(prompts))["logits"]
        loss = criterion(logits.float(), masks)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


@torch.no_grad()
def toy_scores(model: torch.nn.Module) -> dict[str, float]:
    """Mean Dice with the named disc and with the other one, for the first prompt of each image
    and for the other disc's prompt; ``picked``: the share of images whose prediction is on the
    named disc alone (Dice > 0.5 with it, < 0.5 with the other: not both, not neither)."""
    model.eval()
    cases = two_object_toy(64, seed=99)
    scores = {}
    for which, name in ((0, "first prompt"), (1, "other prompt")):
        pixels, masks, prompts = toy_batch(cases, [which] * len(cases))
        probabilities = torch.sigmoid(model(pixels, **model.tokenize(prompts))["logits"].float())
        _, other, _ = toy_batch(cases, [1 - which] * len(cases))
        named, wrong = dice_per_image(probabilities, masks), dice_per_image(probabilities, other)
        scores[f"{name}: named disc"] = float(named.mean())
        scores[f"{name}: other disc"] = float(wrong.mean())
        scores[f"{name}: picked"] = float(((named > 0.5) & (wrong < 0.5)).float().mean())
    return scores


TOY_MODEL = {
    "base_width": 4,
    "depth": 2,
    "context_dim": 32,
    "image_size": TOY_SIZE,
    "in_channels": 1,
    "encoder_fusion": [],
    "decoder_fusion": [1, 2],
}
TOY_STEPS = 150


def test_the_prompt_picks_which_of_two_identical_objects_is_segmented() -> None:
    """Deliver 5 of issue 19: only the prompt tells the two discs apart.

    The default text tower (frozen pretrained MiniLM) reads four phrasings of a quadrant
    ("upper left", ...); trained for TOY_STEPS steps the model must segment the named disc
    (Dice >= 0.8) and, given the other disc's prompt, move to that disc (Dice >= 0.7), in at
    least 90% of the images alone. A model that learned only left/right or only upper/lower
    segments both discs whenever they share a side: about 0.83 and 0.29 mean Dice, a third of
    the images not picked. ~30 s on one core: the only way to test that a model learned to read
    its text. The former text_unet fails it (no positions: the receptive field of its 48 px
    U-Net cannot tell where a disc is; see issue 19's notes).
    """
    torch.manual_seed(0)
    model = create_model("text_guided", **TOY_MODEL)
    train_on_toy(model, TOY_STEPS)
    scores = toy_scores(model)
    assert scores["first prompt: named disc"] >= 0.8, scores
    assert scores["other prompt: named disc"] >= 0.7, scores
    # the prediction moves: the other disc's prompt leaves the first disc in (almost) every image
    assert scores["first prompt: picked"] >= 0.9 and scores["other prompt: picked"] >= 0.9, scores


# -- parts ----------------------------------------------------------------------------------------


def test_positions_are_fractions_of_the_side_and_tell_left_from_right() -> None:
    cpu = torch.device("cpu")
    small, large = sinusoidal_2d(4, 4, 32, cpu), sinusoidal_2d(12, 12, 32, cpu)
    assert small.shape == (16, 32) and large.shape == (144, 32)
    # the same fraction of the image gets the same code at every resolution: pixel centres
    # (1.5 / 4, 2.5 / 4) and (4.5 / 12, 7.5 / 12) are the same point
    torch.testing.assert_close(small.view(4, 4, 32)[1, 2], large.view(12, 12, 32)[4, 7])
    grid = large.view(12, 12, 32)
    left, right = grid[:, :6].mean((0, 1)), grid[:, 6:].mean((0, 1))
    assert torch.nn.functional.cosine_similarity(left, right, dim=0) < 0.9


def test_output_depends_on_words_not_on_padding() -> None:
    model = tiny().eval()
    pixels = torch.rand(2, 1, 32, 32)
    batch = model.tokenize(["the lesion in the left lower zone", "a lesion on the right"])
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # row 1 is padded
    base = model(pixels, **batch)["logits"]
    swapped = model.tokenize(["the lesion in the right lower zone", "a lesion on the right"])
    assert not torch.allclose(model(pixels, **swapped)["logits"][0], base[0])
    padded = {k: v.clone() for k, v in batch.items()}
    padded["input_ids"][1, -1] = 4242  # a padded position changes
    torch.testing.assert_close(model(pixels, **padded)["logits"], base, rtol=0, atol=1e-6)


def test_default_text_tower_is_frozen_minilm_and_top_layers_can_train() -> None:
    model = create_model("text_guided", base_width=8, image_size=32, depth=2)
    assert model.config.text.source is not None and not any(p.requires_grad for p in model.text.parameters())
    model.train()
    assert not model.text.training
    tuned = tiny(text_trainable_layers=1)
    layers = tuned.text.model.encoder.layer
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in tuned.text.model.embeddings.parameters())
    tuned.train()
    assert tuned.text.training
    with pytest.raises(ValueError, match="has 2 layers"):
        tiny(text_trainable_layers=3)


def test_attributes_alone_or_with_text() -> None:
    model = tiny(text=None, attributes_vocab=ATTRS).eval()
    assert not model.needs_text and model.takes_attributes and model.tokenizer is None
    pixels = torch.rand(1, 1, 32, 32).repeat(3, 1, 1, 1)
    attributes = model.encode_attributes(
        [{"side": "left", "zone": "lower"}, {"side": "right", "zone": "lower"}, {"side": "", "zone": None}]
    )
    assert attributes.tolist() == [[0, 2], [1, 2], [-1, -1]]
    logits = model(pixels, attributes=attributes)["logits"]
    assert not torch.allclose(logits[0], logits[1]) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        model.encode_attributes([{"side": "bilateral"}])
    with pytest.raises(ValueError, match="out of range"):
        model(pixels[:1], attributes=torch.tensor([[2, 0]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(pixels)
    both = tiny(attributes_vocab=ATTRS).eval()
    text = both.tokenize(["the lesion"] * 3)
    assert not torch.allclose(
        both(pixels, **text, attributes=attributes)["logits"], both(pixels, **text)["logits"]
    )


def test_without_text_or_attributes_it_is_the_image_only_control() -> None:
    control, guided = tiny(text=None), tiny()
    assert not control.needs_text and not control.takes_attributes and control.context is None
    assert len(control.encoder_fusion) == len(control.decoder_fusion) == 0
    text_parts = ("text.", "context.", "encoder_fusion.", "decoder_fusion.")
    shared = {k for k in guided.state_dict() if not k.startswith(text_parts)}
    assert shared == set(control.state_dict())  # the same network, minus the text
    assert control(torch.rand(2, 1, 32, 32))["logits"].shape == (2, 1, 32, 32)


def test_side_outputs_coarse_to_fine() -> None:
    model = tiny(side_outputs=True, num_classes=2)
    out = model(torch.rand(2, 1, 32, 32), **model.tokenize(["a", "b"]))
    assert [s.shape[-1] for s in out["side_logits"]] == [8, 16]
    assert all(s.shape[:2] == (2, 2) for s in out["side_logits"])


def test_text_unet_is_an_alias_and_old_bundles_keep_their_architecture(tmp_path: Path) -> None:
    model = create_model("text_unet", **TINY)
    assert isinstance(model, TextGuidedSegmenter) and model.config.arch == "text_guided"
    torch.manual_seed(0)
    config = LegacyTextUNetConfig().replace(
        text=TINY_TEXT, base_width=8, context_dim=32, image_size=32, depth=2, fuse_scales=[0, 1]
    )
    legacy = LegacyTextUNet(config).eval()
    save_bundle(legacy, tmp_path / "old")
    loaded = load_bundle(tmp_path / "old")
    assert isinstance(loaded, LegacyTextUNet) and loaded.config.arch == "text_unet"
    pixels, text = torch.rand(2, 1, 32, 32), legacy.tokenize(["left", "the right lower zone"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels, **text)["logits"], legacy(pixels, **text)["logits"])


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="encoder_fusion"):
        tiny(encoder_fusion=[8])
    with pytest.raises(ValueError, match="decoder_fusion"):
        tiny(decoder_fusion=[4])
    with pytest.raises(ValueError, match="divisible by num_heads"):
        tiny(context_dim=30)
    with pytest.raises(ValueError, match="attributes without values"):
        tiny(attributes_vocab={"side": []})


def test_frozen_word_features_are_computed_once_per_prompt() -> None:
    model = tiny().eval()
    prompts = ["the lesion in the left lower zone", "right", "the lesion in the left lower zone"]
    tokens = model.tokenize(prompts)
    with torch.no_grad():
        _, direct, _ = model._encode_text(tokens["input_ids"], tokens["attention_mask"])
        cached, mask = model._word_features(tokens["input_ids"], tokens["attention_mask"])
        assert len(model._text_cache) == 2  # two distinct prompts
        again, _ = model._word_features(tokens["input_ids"], tokens["attention_mask"])
    valid = mask[..., None].float()
    torch.testing.assert_close(cached * valid, direct * valid)
    torch.testing.assert_close(again, cached)
    model.load_state_dict(model.state_dict())
    assert not model._text_cache  # new weights: features are recomputed
    assert not tiny(text_trainable_layers=1)._text_cache  # a training tower is never cached
