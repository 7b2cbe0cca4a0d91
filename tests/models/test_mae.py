"""Stage I hybrid MAE: masking, the masked-only loss, the norm-pix target, gradients, positions, bundles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medalign.bundle import load_bundle, save_bundle
from medalign.models import create_model
from medalign.models.mae import HybridMAE, MAEConfig, patchify, random_masking, sincos_2d, unpatchify

KINDS = ("clip_vision", "vit")


def tiny(kind: str = "clip_vision", **overrides) -> HybridMAE:
    torch.manual_seed(0)
    return create_model("mae_tiny", vision={"kind": kind}, in_channels=1, **overrides).eval()


def test_random_masking_counts_differs_per_image_and_reproduces() -> None:
    keep, mask, restore = random_masking(5, 16, 0.75, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert keep.shape == (5, 4) and mask.shape == (5, 16) and restore.shape == (5, 16)
    assert mask.sum(1).tolist() == [12.0] * 5  # exactly round(0.75 * 16) per image
    assert len({tuple(row.tolist()) for row in mask}) == 5  # a different mask per image
    assert (mask.gather(1, keep) == 0).all()  # kept patches are the visible ones
    again = random_masking(5, 16, 0.75, torch.device("cpu"), torch.Generator().manual_seed(3))[1]
    assert torch.equal(mask, again)
    _, other, _ = random_masking(5, 16, 0.75, torch.device("cpu"), torch.Generator().manual_seed(4))
    assert not torch.equal(mask, other)
    assert random_masking(2, 16, 0.3, torch.device("cpu"))[1].sum(1).tolist() == [5.0, 5.0]  # round(4.8)
    with pytest.raises(ValueError, match="at least one patch"):
        random_masking(2, 4, 0.1, torch.device("cpu"))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes_for_both_tower_kinds(kind: str) -> None:
    model = tiny(kind)
    out = model(torch.rand(3, 1, 64, 64), generator=torch.Generator().manual_seed(0))
    assert out["pred"].shape == (3, 16, 16 * 16) and out["mask"].shape == (3, 16)
    assert out["mask"].sum(1).tolist() == [12.0] * 3
    assert out["embedding"].shape == (3, 32)
    torch.testing.assert_close(out["embedding"].norm(dim=-1), torch.ones(3))
    assert model.encode(torch.rand(2, 1, 64, 64)).shape == (2, 64)
    assert model(torch.rand(2, 1, 64, 64), mask_ratio=0.5)["mask"].sum(1).tolist() == [8.0, 8.0]


def test_patchify_order_and_inverse() -> None:
    x = torch.rand(2, 3, 32, 48)
    patches = patchify(x, 16)
    assert patches.shape == (2, 6, 16 * 16 * 3)
    # patch 4 is row 1, column 1; within a patch values run (row, column, channel)
    torch.testing.assert_close(patches[1, 4], x[1, :, 16:32, 16:32].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(patches, 16, 3, (2, 3)), x)


def test_loss_counts_only_masked_patches_hand_computed() -> None:
    model = tiny()
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0], [5.0, 5.0]]])
    target = torch.tensor([[[0.0, 0.0], [9.0, 9.0], [1.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    # masked patches 0 and 2: mean((1, 4)) = 2.5 and mean((4, 4)) = 4 -> 3.25
    assert model.reconstruction_loss(pred, target, mask).item() == pytest.approx(3.25)
    changed = pred.clone()
    changed[0, 1] = 100.0
    changed[0, 3] = -7.0
    assert model.reconstruction_loss(changed, target, mask).item() == pytest.approx(3.25)


def test_forward_loss_is_the_masked_mse_of_its_prediction() -> None:
    model = tiny()
    x = torch.rand(2, 1, 64, 64)
    out = model(x, generator=torch.Generator().manual_seed(1))
    target = model.target(model.normalize_pixels(x))
    per_patch = ((out["pred"] - target) ** 2).mean(-1)
    masked = out["mask"].bool()
    torch.testing.assert_close(out["loss"], per_patch[masked].mean())


def test_norm_pix_target_hand_checked() -> None:
    model = tiny()
    x = torch.rand(1, 1, 64, 64)
    normalized = model.normalize_pixels(x)
    values = normalized[0, 0, 0:16, 16:32].reshape(-1).tolist()  # patch 1
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # unbiased, as MAE
    expected = torch.tensor([(v - mean) / (var + 1e-6) ** 0.5 for v in values])
    torch.testing.assert_close(model.target(normalized)[0, 1], expected, rtol=1e-4, atol=1e-5)
    raw = tiny(norm_pix_loss=False).target(normalized)[0, 1]
    torch.testing.assert_close(raw, torch.tensor(values))


def test_contrastive_gradient_reaches_encoder_not_decoder() -> None:
    model = tiny().train()
    out = model(torch.rand(4, 1, 64, 64), generator=torch.Generator().manual_seed(0))
    out["embedding"][:, 0].sum().backward()
    decoder = [model.decoder_embed, model.decoder, model.decoder_norm, model.decoder_pred]
    for module in decoder:
        for param in module.parameters():
            assert param.grad is None or not param.grad.any()
    assert model.mask_token.grad is None
    assert model.vision.model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.projection[0].weight.grad.abs().sum() > 0


def _swap_patches(x: torch.Tensor, a: int, b: int, grid: int = 4, p: int = 16) -> torch.Tensor:
    out = x.clone()
    (ra, ca), (rb, cb) = divmod(a, grid), divmod(b, grid)
    out[..., ra * p : (ra + 1) * p, ca * p : (ca + 1) * p] = x[
        ..., rb * p : (rb + 1) * p, cb * p : (cb + 1) * p
    ]
    out[..., rb * p : (rb + 1) * p, cb * p : (cb + 1) * p] = x[
        ..., ra * p : (ra + 1) * p, ca * p : (ca + 1) * p
    ]
    return out


def _zero_positions(model: HybridMAE) -> None:
    embeddings = model.vision.model.embeddings
    with torch.no_grad():
        if model.vision.kind == "clip_vision":
            embeddings.position_embedding.weight.zero_()
        else:
            embeddings.position_embeddings.zero_()


@pytest.mark.parametrize("kind", KINDS)
def test_positions_are_kept_after_masking(kind: str) -> None:
    """Two visible patches swapped: a different CLS output, unless the positional embeddings are zero.

    Without positions attention is permutation-equivariant, so the swap could not be seen; the
    zeroed control shows the test would notice masking that dropped the positions.
    """
    model = tiny(kind)
    x = torch.rand(1, 1, 64, 64)
    keep = random_masking(1, 16, 0.5, torch.device("cpu"), torch.Generator().manual_seed(0))[0][0]
    swapped = _swap_patches(x, int(keep[0]), int(keep[-1]))

    def cls(model: HybridMAE, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_visible(image, 0.5, torch.Generator().manual_seed(0))[0][0, 0]

    assert not torch.allclose(cls(model, x), cls(model, swapped), atol=1e-4)
    _zero_positions(model)
    torch.testing.assert_close(cls(model, x), cls(model, swapped), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_bundle_round_trip(kind: str, tmp_path: Path) -> None:
    model = tiny(kind)
    folder = save_bundle(model, tmp_path / "mae")
    loaded = load_bundle(folder)
    assert isinstance(loaded, HybridMAE) and loaded.bundle_kind == "pretrain" and loaded.tokenizer is None
    assert loaded.config.vision.source is None and loaded.config.vision.kind == kind
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = model(x, generator=torch.Generator().manual_seed(5))
        b = loaded(x, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(model.encode(x), loaded.encode(x))
    for key in ("loss", "pred", "mask", "embedding"):
        torch.testing.assert_close(a[key], b[key])


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny(mask_ratio=1.0)
    with pytest.raises(ValueError, match="decoder_heads"):
        tiny(decoder_dim=30, decoder_heads=4)
    with pytest.raises(ValueError, match=r"expected pixel_values \[B, 1, 64, 64\]"):
        tiny()(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="text kind"):
        MAEConfig(vision={"kind": "bert"})


def test_sincos_positions() -> None:
    table = sincos_2d(8, (2, 3))
    assert table.shape == (7, 8) and not table[0].any()
    # patch (row 1, col 2): first half encodes the row, second half the column; frequency 0 = 1
    assert table[1 + 5, 0].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())
    assert table[1 + 5, 4].item() == pytest.approx(torch.sin(torch.tensor(2.0)).item())


def test_registered_sizes() -> None:
    from medalign.models import list_models

    assert {"mae_tiny", "mae_small", "mae_vit_b16"} <= set(list_models("mae_*"))
    small = create_model("mae_small")
    align = create_model("align_small_minilm")
    assert small.vision.hf_config_dict() == align.vision.hf_config_dict()
