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


def _torch_zip(path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, path)


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("extra.bin", lambda p: p.write_bytes(b"\x80\x04K\x01.")),  # by suffix
        ("notes.json", lambda p: p.write_bytes(b"\x80\x02}q\x00.")),  # a renamed protocol-2 pickle
        ("tokenizer/vocab.txt", lambda p: p.write_bytes(b"\x80\x05\x95\x03\x00.")),
        ("weights.safetensors", _torch_zip),  # torch.save's zip (data.pkl inside) under a safe name
    ],
)
def test_pickles_are_refused_whatever_their_name(tmp_path: Path, name: str, write) -> None:
    save_bundle(create_model("align_tiny"), tmp_path / "b")
    write(tmp_path / "b" / name)
    with pytest.raises(BundleError, match=rf"pickle-based files \['{name}'\]"):
        medalign.load(str(tmp_path / "b"))


def test_safetensors_headers_are_not_mistaken_for_pickles(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from medalign.bundle import is_pickle

    for length in (2, 3, 4, 5):  # header lengths 0x280 .. 0x580 begin with the bytes 0x80 0x02 .. 0x05
        path = tmp_path / f"w{length}.safetensors"
        key = "k" * 40
        target = 0x80 + length * 256
        while True:
            save_file({key: torch.zeros(1)}, path)
            size = int.from_bytes(path.read_bytes()[:8], "little")
            if size >= target:
                break
            key += "k" * (target - size)
        assert size == target and path.read_bytes()[:2] == bytes([0x80, length])
        assert not is_pickle(path)


def test_no_unsafe_deserialisation_in_the_source() -> None:
    """Every torch.load passes weights_only=True; no pickle.load, no np.load(allow_pickle=True)."""
    import re

    source = Path(medalign.__file__).parent
    problems = []
    for path in sorted(source.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text):
            if "weights_only=True" not in match.group(1):
                problems.append(f"{path.name}: {match.group(0)}")
        for pattern in (
            r"\bpickle\.loads?\(",
            r"\bcloudpickle\b",
            r"\bjoblib\.load\(",
            r"allow_pickle\s*=\s*True",
        ):
            problems += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not problems, problems
