"""LoRA and Mona adapters: identity at init, what trains, and a filter that works in frequency space."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from medalign.models import DualEncoder, apply_adapters, create_model, freeze_tower, trainable_parameters
from medalign.models.adapters import FrequencyFilter, MonaAdapter

MONA = {"type": "mona", "bottleneck": 8}
LORA = {"type": "lora", "r": 4, "alpha": 8}


def _batch(model: DualEncoder) -> dict[str, torch.Tensor]:
    size = model.config.image_size
    tokens = model.tokenize(["cyst in the left upper zone", "normal study", "two nodules"])
    return {"pixel_values": torch.rand(3, model.config.in_channels, size, size), **tokens}


def _tower_trainables(model: DualEncoder) -> list[str]:
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and name.startswith(("vision.", "text."))
    ]


@pytest.mark.parametrize("spec", [LORA, MONA], ids=["lora", "mona"])
@pytest.mark.parametrize("vision_kind", ["clip_vision", "vit"])
def test_adapters_start_as_identity_and_freeze_the_towers(spec: dict, vision_kind: str) -> None:
    torch.manual_seed(0)
    base = create_model("align_tiny", image_size=32, vision={"kind": vision_kind}).eval()
    batch = _batch(base)
    with torch.no_grad():
        expected = base(**batch, return_tokens=True)
    adapted = apply_adapters(copy.deepcopy(base), {"vision": spec, "text": spec})
    with torch.no_grad():
        actual = adapted(**batch, return_tokens=True)
    for key in ("image_embeds", "text_embeds", "image_tokens", "text_tokens"):
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-5)

    tower_trainables = _tower_trainables(adapted)
    marker = "lora_" if spec["type"] == "lora" else ".mona."
    assert tower_trainables and all(marker in name for name in tower_trainables)
    for name in ("logit_scale", "image_proj.weight", "text_proj.weight", "image_token_proj.weight"):
        assert adapted.get_parameter(name).requires_grad, name
    n_trainable, n_total = trainable_parameters(adapted)
    assert 0 < n_trainable < n_total / 5
    assert adapted.config.adapters == {"vision": spec, "text": spec}


def test_adapter_without_freeze_keeps_tower_trainable() -> None:
    model = apply_adapters(create_model("align_tiny"), {"vision": {**LORA, "freeze": False}})
    trainable = _tower_trainables(model)
    assert any("lora_" in name for name in trainable)
    assert any("base_layer" in name or "patch_embedding" in name for name in trainable)


def test_freeze_tower_and_config_flags() -> None:
    model = create_model("align_tiny")
    freeze_tower(model, "text")
    assert model.config.freeze_text
    assert not any(p.requires_grad for p in model.text.parameters())
    assert all(p.requires_grad for p in model.vision.parameters())
    rebuilt = create_model("align_tiny", freeze_vision=True)
    assert not any(p.requires_grad for p in rebuilt.vision.parameters())
    with pytest.raises(ValueError, match="tower must be"):
        freeze_tower(model, "audio")


def test_adapter_specs_are_validated() -> None:
    model = create_model("align_tiny")
    with pytest.raises(ValueError, match="adapter type"):
        apply_adapters(model, {"vision": {"type": "prefix"}})
    with pytest.raises(ValueError, match="unknown lora options"):
        apply_adapters(model, {"vision": {"type": "lora", "rank": 4}})
    apply_adapters(model, {"vision": LORA})
    with pytest.raises(ValueError, match="already has"):
        apply_adapters(model, {"vision": MONA})


def test_config_with_adapters_rebuilds_identical_state_dict_keys() -> None:
    model = apply_adapters(create_model("align_tiny"), {"vision": MONA, "text": LORA})
    rebuilt = DualEncoder(model.config)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert _tower_trainables(rebuilt) == _tower_trainables(model)


def test_deepcopy_points_mona_hooks_at_the_copy() -> None:
    model = apply_adapters(create_model("align_tiny"), {"vision": MONA})
    clone = copy.deepcopy(model)
    hooks = [h for m in clone.vision.model.modules() for h in m._forward_hooks.values()]
    clone_adapters = {id(a) for a in clone.vision.mona}
    assert hooks and all(id(h.adapter) in clone_adapters and h.tower is clone.vision for h in hooks)


def test_training_moves_the_frequency_filters() -> None:
    torch.manual_seed(0)
    model = apply_adapters(create_model("align_tiny", image_size=32), {"vision": MONA, "text": MONA})
    filters = {name: p for name, p in model.named_parameters() if "filter.weight" in name}
    assert filters and all(p.requires_grad for p in filters.values())
    before = {name: p.detach().clone() for name, p in filters.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(model)
    for _ in range(3):
        out = model(**batch, return_tokens=True)
        logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
        target = torch.arange(3)
        loss = (
            F.cross_entropy(logits, target)
            + F.cross_entropy(logits.T, target)
            + out["image_tokens"].pow(2).mean()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the up-projection is zero at step 0, so the filters receive gradient from the second step on
    for tower in ("vision", "text"):
        names = [n for n in filters if n.startswith(tower)]
        assert any(filters[n].grad.abs().sum() > 0 for n in names), tower
        assert any(not torch.equal(filters[n], before[n]) for n in names), tower


def _dc_only(filt: FrequencyFilter) -> None:
    with torch.no_grad():
        filt.weight.zero_()
        filt.weight[(0,) * (filt.weight.ndim - 2)] = torch.tensor([2.0, 0.0])


def test_filter_starts_as_identity() -> None:
    x = torch.randn(2, 10, 6)
    torch.testing.assert_close(FrequencyFilter(6, (16,))(x), x, atol=1e-5, rtol=1e-5)
    grid = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(FrequencyFilter(6, (4, 5))(grid), grid, atol=1e-5, rtol=1e-5)


def test_dc_only_filter_makes_output_constant_across_tokens() -> None:
    sequence, grid = FrequencyFilter(6, (16,)), FrequencyFilter(6, (4, 5))
    _dc_only(sequence)
    _dc_only(grid)
    x = torch.randn(2, 10, 6)
    y = sequence(x)
    torch.testing.assert_close(y, y[:, :1].expand_as(y))
    torch.testing.assert_close(y[:, 0], 2 * x.sum(1) / 16)  # the zero-padded sequence's mean, times the gain
    g = torch.randn(2, 4, 5, 6)
    z = grid(g).flatten(1, 2)
    torch.testing.assert_close(z, z[:, :1].expand_as(z))
    torch.testing.assert_close(z[:, 0], 2 * g.mean((1, 2)))


def test_phase_ramp_filter_is_a_circular_shift() -> None:
    """A per-frequency phase exp(-2πi·k·s/n) is a shift by s in token space: the filter acts on the spectrum."""
    h, w, channels = 4, 6, 3
    filt = FrequencyFilter(channels, (h, w))
    ky = torch.fft.fftfreq(h).view(h, 1)
    kx = torch.fft.rfftfreq(w).view(1, w // 2 + 1)
    phase = -2 * math.pi * (ky * 1 + kx * 2)  # shift by (1, 2)
    with torch.no_grad():
        filt.weight.copy_(
            torch.stack([phase.cos(), phase.sin()], -1).unsqueeze(-2).expand(h, w // 2 + 1, channels, 2)
        )
    g = torch.randn(2, h, w, channels)
    torch.testing.assert_close(filt(g), torch.roll(g, shifts=(1, 2), dims=(1, 2)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spatial", [False, True])
def test_mona_delta_is_constant_when_filter_keeps_only_dc(spatial: bool) -> None:
    torch.manual_seed(0)
    adapter = MonaAdapter(
        16,
        bottleneck=8,
        filter_size=(4, 4) if spatial else (12,),
        spatial=spatial,
        prefix_tokens=1 if spatial else 0,
    )
    torch.nn.init.normal_(adapter.up.weight)
    _dc_only(adapter.filter)
    x = torch.randn(2, 17 if spatial else 9, 16)
    delta = adapter(x, grid=(4, 4) if spatial else None) - x
    tokens = delta[:, 1:] if spatial else delta  # CLS bypasses the grid mixing
    torch.testing.assert_close(tokens, tokens[:, :1].expand_as(tokens), atol=1e-5, rtol=1e-5)
    assert (delta.abs().sum() > 0).item()


def test_text_mona_output_does_not_depend_on_padding() -> None:
    torch.manual_seed(0)
    adapter = MonaAdapter(16, bottleneck=8, filter_size=(20,))
    torch.nn.init.normal_(adapter.up.weight)
    x = torch.randn(1, 7, 16)
    alone = adapter(x, mask=torch.ones(1, 7))
    padded = adapter(
        torch.cat([x, torch.randn(1, 5, 16)], 1), mask=torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], 1)
    )
    torch.testing.assert_close(padded[:, :7], alone, atol=1e-5, rtol=1e-5)


def test_mona_runs_under_bfloat16_autocast() -> None:
    model = apply_adapters(create_model("align_tiny", image_size=32), {"vision": MONA, "text": MONA})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**_batch(model))
    assert torch.isfinite(out["image_embeds"].float()).all()


def test_mona_reads_the_running_batch_and_the_towers_keep_no_batch_state() -> None:
    """A tower writes nothing into itself during forward: the adapters get the grid and the mask of
    the batch being run from a call context (re-entrant: nothing of one call outlives it)."""
    from medalign.models.towers import call_context

    torch.manual_seed(0)
    model = apply_adapters(create_model("align_tiny", image_size=32), {"vision": MONA, "text": MONA}).eval()
    before = {k: v for k, v in vars(model.vision).items() if not k.startswith("_")}
    with torch.no_grad():
        _, tokens = model.vision(torch.rand(2, model.config.in_channels, 32, 32))
        model(**_batch(model))
    assert tokens.shape[1] == (32 // model.vision.size_multiple) ** 2
    assert {k: v for k, v in vars(model.vision).items() if not k.startswith("_")} == before
    assert not hasattr(model.vision, "grid") and not hasattr(model.text, "attention_mask")
    assert call_context(model.vision) == {} and call_context(model.text) == {}
