"""Every trainable model family learns a toy it cannot solve untrained.

Each test builds a tiny synthetic task whose answer is known, trains the model for a few seconds
with the loss medalign trains it with, and checks a held-out score against a floor the untrained
model does not reach (and, where a shortcut exists, against the shortcut): a model that stops
learning, or a loss whose gradient goes nowhere, fails here. Families: the U-Net, the fusion
models (align-disentangle-fuse, MoE cross-attention), the MoE feed-forward layer, the clinical
heads (diagnosis, Cox survival) and the Stage I MAE. The CLIP-feature decoder and the
text-guided U-Net have their own toys next to their model tests.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from medalign.config import FuseLossConfig, SegLossConfig
from medalign.losses import cox_partial_likelihood_loss, dice_bce_loss
from medalign.metrics import concordance_index, dice_iou_per_image
from medalign.models import create_model
from medalign.models.moe import MoEFeedForward
from medalign.tasks.fuse import FuseTask

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py

SIZE = 32


def squares(n: int, generator: torch.Generator, side: int = 10) -> torch.Tensor:
    """[n, 1, SIZE, SIZE] masks, one axis-aligned square per image at a random place."""
    masks = torch.zeros(n, 1, SIZE, SIZE)
    corners = torch.randint(0, SIZE - side, (n, 2), generator=generator)
    for i, (y, x) in enumerate(corners.tolist()):
        masks[i, 0, y : y + side, x : x + side] = 1.0
    return masks


def noisy(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The image of a mask: a bright object on a dim, noisy background."""
    return (0.25 + 0.5 * masks + 0.1 * torch.randn(masks.shape, generator=generator)).clamp(0, 1)


def train(model: torch.nn.Module, loss: Callable[[], torch.Tensor], steps: int, lr: float) -> None:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    model.eval()


def mean_dice(probabilities: torch.Tensor, masks: torch.Tensor) -> float:
    dice, _ = dice_iou_per_image(probabilities.detach(), masks)
    return float(dice.mean())


def test_unet_learns_to_segment_squares() -> None:
    g = torch.Generator().manual_seed(0)
    train_masks, test_masks = squares(64, g), squares(32, g)
    train_images, test_images = noisy(train_masks, g), noisy(test_masks, g)
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, image_size=SIZE, channels=[4, 8, 16]).eval()

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(model(pixel_values=test_images)["logits"])

    untrained = mean_dice(predict(), test_masks)

    def loss() -> torch.Tensor:
        index = torch.randint(0, 64, (16,), generator=g)
        return dice_bce_loss(model(pixel_values=train_images[index])["logits"], train_masks[index])

    train(model, loss, steps=40, lr=1e-2)
    trained = mean_dice(predict(), test_masks)
    assert untrained < 0.4 and trained > 0.85, (untrained, trained)


def two_modality_toy(n: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One square visible only in modality a, another only in b; the target is both."""
    in_a, in_b = squares(n, g, side=8), squares(n, g, side=8)
    images = {"a": noisy(in_a, g), "b": noisy(in_b, g)}
    return images, ((in_a + in_b) > 0).float()


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("fuse_adf", {}),
        ("fuse_moe", {"text": None, "token_dim": 16, "num_heads": 2, "num_experts": 4}),
    ],
)
def test_fusion_learns_what_neither_modality_shows_alone(name: str, overrides: dict) -> None:
    """Trained through ``FuseTask`` (segmentation loss + the model's own terms, ADF's included):
    with both modalities the fused mask covers both squares, beyond what a alone can find."""
    g = torch.Generator().manual_seed(0)
    train_images, train_masks = two_modality_toy(64, g)
    test_images, test_masks = two_modality_toy(32, g)
    torch.manual_seed(0)
    model = create_model(
        name, modalities=["a", "b"], in_channels=2, image_size=SIZE, base_width=4, depth=2, **overrides
    )
    task = FuseTask(model, FuseLossConfig(), SegLossConfig(), ["image:a", "image:b"], "mask")

    def predict(present: list[bool]) -> torch.Tensor:
        mask = torch.tensor([present] * len(test_masks))
        with torch.no_grad():
            return torch.sigmoid(model(test_images, mask)["logits"])

    untrained = mean_dice(predict([True, True]), test_masks)

    def loss() -> torch.Tensor:
        index = torch.randint(0, 64, (16,), generator=g)
        batch = {
            "image:a": train_images["a"][index],
            "image:b": train_images["b"][index],
            "modalities_present": torch.ones(16, 2, dtype=torch.bool),
            "mask": train_masks[index],
        }
        return task.training_step(batch)["loss"]

    train(model, loss, steps=50, lr=5e-3)
    both, a_only = mean_dice(predict([True, True]), test_masks), mean_dice(predict([True, False]), test_masks)
    # a alone can find at most its own square: about 0.67 of the target's Dice
    assert untrained < 0.4 and both > 0.8 and both > a_only + 0.1, (untrained, both, a_only)


def test_moe_feed_forward_learns_cluster_specific_maps() -> None:
    """Tokens from 4 clusters, each with its own linear target map: the routed experts fit it."""
    g = torch.Generator().manual_seed(0)
    centres, maps = torch.randn(4, 16, generator=g) * 3, torch.randn(4, 16, 16, generator=g) / 4

    def tokens(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cluster = torch.randint(0, 4, (n,), generator=g)
        x = centres[cluster] + 0.3 * torch.randn(n, 16, generator=g)
        return x[None], torch.einsum("nd,nde->ne", x, maps[cluster])[None]

    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, num_experts=4, k=1, capacity_factor=2.0)
    test_x, test_y = tokens(256)

    def held_out() -> float:
        with torch.no_grad():
            return float(F.mse_loss(layer(test_x)[0], test_y))

    untrained = held_out()

    def loss() -> torch.Tensor:
        x, y = tokens(128)
        out, aux = layer(x)
        return F.mse_loss(out, y) + 0.01 * aux["balance_loss"]

    train(layer, loss, steps=300, lr=1e-2)
    trained = held_out()
    assert trained < 0.1 * untrained, (untrained, trained)


def clinical_toy(n: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Level 0/1/2 = the texture of modality a (horizontal stripes, vertical stripes, checks, at a
    random phase, with pixel noise); b is blank. A texture, not a brightness: the ViT normalises
    each patch token, so an overall scale is not what it reads."""
    label = torch.randint(0, 3, (n,), generator=g)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    phase = torch.randint(0, 4, (n, 2), generator=g)
    rows = ((ys[None] + phase[:, :1, None]) // 4) % 2
    cols = ((xs[None] + phase[:, 1:, None]) // 4) % 2
    pattern = torch.where(label.view(-1, 1, 1) == 0, rows, torch.where(label.view(-1, 1, 1) == 1, cols, rows ^ cols))
    a = 0.3 + 0.4 * pattern[:, None].float() + 0.05 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    return {"a": a.clamp(0, 1), "b": torch.full((n, 1, SIZE, SIZE), 0.5)}, label


def test_diagnosis_head_learns_the_class() -> None:
    g = torch.Generator().manual_seed(0)
    train_images, train_labels = clinical_toy(96, g)
    test_images, test_labels = clinical_toy(60, g)
    torch.manual_seed(0)
    model = create_model("clinical_tiny", modalities=["a", "b"], image_size=SIZE, num_classes=3).eval()

    def accuracy() -> float:
        with torch.no_grad():
            return float((model(test_images)["logits"].argmax(1) == test_labels).float().mean())

    untrained = accuracy()

    def loss() -> torch.Tensor:
        index = torch.randint(0, 96, (32,), generator=g)
        logits = model({k: v[index] for k, v in train_images.items()})["logits"]
        return F.cross_entropy(logits, train_labels[index])

    train(model, loss, steps=30, lr=3e-3)
    trained = accuracy()
    assert untrained < 0.55 and trained > 0.9, (untrained, trained)


def test_cox_head_learns_to_order_survival() -> None:
    """Brighter objects (class 2) fail sooner; the Cox head's risk must order the held-out times."""
    g = torch.Generator().manual_seed(1)
    train_images, train_level = clinical_toy(96, g)
    test_images, test_level = clinical_toy(60, g)

    def survival(level: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Exponential(torch.exp(1.5 * level.float())).sample()

    torch.manual_seed(0)
    train_time, test_time = survival(train_level), survival(test_level)
    events = torch.ones(96)
    model = create_model("clinical_tiny", modalities=["a", "b"], image_size=SIZE, num_classes=0, survival="cox")

    def c_index() -> float:
        with torch.no_grad():
            risk = model.eval()(test_images)["risk"]
        return concordance_index(test_time, torch.ones(60), risk)["c_index"]

    untrained = c_index()

    def loss() -> torch.Tensor:
        index = torch.randint(0, 96, (32,), generator=g)
        risk = model({k: v[index] for k, v in train_images.items()})["risk"]
        return cox_partial_likelihood_loss(risk, train_time[index], events[index])

    train(model, loss, steps=60, lr=3e-3)
    trained = c_index()
    # the true risk (the level) orders the sampled times only up to their noise; its own C-index
    # is the ceiling, and the trained head must come close to it and far above the untrained one
    ceiling = concordance_index(test_time, torch.ones(60), test_level.float())["c_index"]
    assert trained > untrained + 0.15 and trained > ceiling - 0.08, (untrained, trained, ceiling)


def two_halves(n: int, g: torch.Generator) -> torch.Tensor:
    """[n, 1, 64, 64] images whose left and right halves each have their own random brightness: a
    masked patch is predictable from the visible patches of its half, not from the average image."""
    left = (torch.arange(64) < 32).float().view(1, 1, 1, 64)
    levels = 0.1 + 0.8 * torch.rand(n, 2, 1, 1, generator=g)
    return (levels[:, :1] * left + levels[:, 1:] * (1 - left)).expand(n, 1, 64, 64).contiguous()


def test_mae_learns_to_fill_in_masked_patches() -> None:
    """Held-out masked-patch loss far below that of the best image-independent guess (the training
    images' mean at every pixel): the decoder must use the visible patches."""
    g = torch.Generator().manual_seed(0)
    train_images, test_images = two_halves(128, g), two_halves(32, g)
    torch.manual_seed(0)
    model = create_model("mae_tiny", in_channels=1, norm_pix_loss=False, mask_ratio=0.5)

    def held_out() -> float:
        with torch.no_grad():
            return float(model.eval()(test_images, generator=torch.Generator().manual_seed(5))["loss"])

    untrained = held_out()
    with torch.no_grad():
        mean_image = model.normalize_pixels(train_images).mean(0, keepdim=True)
        mean_guess = float(((model.normalize_pixels(test_images) - mean_image) ** 2).mean())

    def loss() -> torch.Tensor:
        index = torch.randint(0, 128, (32,), generator=g)
        return model(train_images[index])["loss"]

    train(model, loss, steps=150, lr=2e-3)
    trained = held_out()
    assert trained < 0.6 * mean_guess and mean_guess < untrained, (untrained, mean_guess, trained)
