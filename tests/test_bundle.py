from __future__ import annotations

from pathlib import Path

import pytest
import torch

import medalign
from medalign.bundle import BundleError, save_bundle
from medalign.models import apply_adapters, create_model


def _inputs(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels = torch.rand(2, model.config.in_channels, model.config.image_size, model.config.image_size)
    tokens = model.tokenizer(
        ["a cyst in the left upper zone", "no focal lesion"], padding=True, return_tensors="pt"
    )
    return pixels, tokens


@pytest.mark.parametrize("adapters", [None, {"vision": {"type": "mona"}, "text": {"type": "lora", "r": 4}}])
def test_save_and_load_offline_gives_identical_outputs(tmp_path: Path, monkeypatch, adapters) -> None:
    torch.manual_seed(0)
    model = create_model("align_tiny", in_channels=1, image_size=32)
    if adapters:
        model = apply_adapters(model, adapters)
        for parameter in model.parameters():  # adapters start as identity; make them matter
            parameter.data.add_(torch.randn_like(parameter) * 0.01)
    model.eval()
    save_bundle(model, tmp_path / "bundle", extra={"metrics": {"x": 1.0}})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    loaded = medalign.load(str(tmp_path / "bundle"))
    pixels, tokens = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels))
        torch.testing.assert_close(
            loaded.encode_text(tokens["input_ids"], tokens["attention_mask"]),
            model.encode_text(tokens["input_ids"], tokens["attention_mask"]),
        )
    assert loaded.bundle_info["metrics"] == {"x": 1.0}
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == [
        "MODEL_CARD.md",
        "config.json",
        "model.safetensors",
        "tokenizer",
    ]


def test_bundle_with_a_pickle_is_refused(tmp_path: Path) -> None:
    save_bundle(create_model("align_tiny"), tmp_path / "b")
    (tmp_path / "b" / "extra.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BundleError, match=r"pickle-based files \['extra\.bin'\]"):
        medalign.load(str(tmp_path / "b"))


def test_broken_bundles_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        medalign.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"config\.json is missing"):
        medalign.load(str(tmp_path / "empty"))
    save_bundle(create_model("align_tiny"), tmp_path / "b")
    other = create_model("align_tiny", embed_dim=32)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "b" / "model.safetensors"
    )
    with pytest.raises(BundleError, match="does not match the architecture"):
        medalign.load(str(tmp_path / "b"))
