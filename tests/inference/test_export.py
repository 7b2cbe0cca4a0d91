"""ONNX export: ONNX Runtime reproduces PyTorch within 1e-4 for every part, at other batch sizes
and text lengths than the traced ones; the predictor, the CLI and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import typer
from typer.testing import CliRunner

from medalign.bundle import load_bundle, save_bundle
from medalign.inference.export import (
    ExportError,
    OnnxPredictor,
    _session,
    export_app,
    export_onnx,
    verify_onnx,
)
from medalign.models import create_model
from medalign.models.towers import TINY_BERT

TOL = 1e-4
SMALL_UNET = {"channels": [8, 16, 32], "num_res_units": 1, "image_size": 32}
SMALL_TEXT_UNET = {
    "text": TINY_BERT,
    "image_size": 32,
    "base_width": 8,
    "depth": 2,
    "context_dim": 16,
    "num_heads": 2,
    "encoder_fusion": [2, 4],
    "decoder_fusion": [1, 2],
}


def _bundle(tmp: Path, name: str, arch: str, **overrides: object) -> Path:
    torch.manual_seed(0)
    return save_bundle(create_model(arch, **overrides).eval(), tmp / name)


def _rand(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a - b.numpy()).max())


@pytest.fixture(scope="module")
def align(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("align")
    bundle = _bundle(tmp, "bundle", "align_tiny", image_size=32)
    export_onnx(bundle, tmp / "onnx")
    return bundle, tmp / "onnx"


@pytest.fixture(scope="module")
def unet_cli(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The U-Net is exported through the CLI, as `medalign export onnx` would run it."""
    tmp = tmp_path_factory.mktemp("unet")
    bundle = _bundle(tmp, "bundle", "unet", **SMALL_UNET)
    app = typer.Typer()
    app.add_typer(export_app, name="export")
    result = CliRunner().invoke(app, ["export", "onnx", "--model", str(bundle), "--out", str(tmp / "onnx")])
    assert result.exit_code == 0, result.output
    return bundle, tmp / "onnx", result.output


@pytest.fixture(scope="module")
def text_unet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("text_unet")
    bundle = _bundle(tmp, "bundle", "text_unet", **SMALL_TEXT_UNET)
    export_onnx(bundle, tmp / "onnx", parts=["segmentation"])
    return bundle, tmp / "onnx"


def test_dual_encoder_parts_match_pytorch_at_new_batch_and_length(align: tuple[Path, Path]) -> None:
    bundle, out = align
    model = load_bundle(bundle)
    manifest = json.loads((out / "export.json").read_text())
    assert sorted(manifest["parts"]) == ["text", "vision"]
    for info in manifest["parts"].values():
        assert 0.0 <= info["max_abs_diff"] < TOL
        assert isinstance(info["inputs"][0]["shape"][0], str)  # symbolic batch axis
    mean, std = model.config.image_stats()
    assert manifest["preprocessing"]["image_mean"] == mean and manifest["preprocessing"]["image_std"] == std
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()

    pixels = _rand(5, 3, 32, 32)  # exported with batch 2
    got = _session(out / "vision.onnx").run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        assert _max_diff(got, model.encode_image(pixels)) < TOL

    texts = ["effusion", "a mass of the left lung with a small nodule beside it", "normal", "cyst"]
    tokens = model.tokenize(texts)
    assert tokens["input_ids"].shape[1] not in (len(model.tokenize(["x"])["input_ids"][0]),)
    got = _session(out / "text.onnx").run(None, {k: v.numpy() for k, v in tokens.items()})[0]
    with torch.no_grad():
        assert got.shape == (4, model.config.embed_dim)
        assert _max_diff(got, model.encode_text(**tokens)) < TOL


def test_predictor_embeddings_equal_the_bundle_model(align: tuple[Path, Path]) -> None:
    bundle, out = align
    model = load_bundle(bundle)
    predictor = OnnxPredictor(out)
    assert predictor.parts == ["vision", "text"]
    pixels = _rand(3, 3, 32, 32, seed=3)
    texts = ["left upper zone", "no abnormality seen"]
    with torch.no_grad():
        assert _max_diff(predictor.embed_image(pixels.numpy()), model.encode_image(pixels)) < TOL
        assert _max_diff(predictor.embed_text(texts), model.encode_text(**model.tokenize(texts))) < TOL
        # a 48 px image is resized to the exported 32 px, bilinearly, before the graph
        large = _rand(2, 3, 48, 48, seed=4)
        resized = F.interpolate(large, size=(32, 32), mode="bilinear", align_corners=False)
        assert _max_diff(predictor.embed_image(large), model.encode_image(resized)) < TOL
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        predictor.embed_image(np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="no segmentation model"):
        predictor.segment(pixels)


def test_cli_exports_unet_and_predictor_segments_like_pytorch(unet_cli: tuple[Path, Path, str]) -> None:
    bundle, out, output = unet_cli
    assert (out / "segmentation.onnx").is_file() and (out / "export.json").is_file()
    assert "segmentation.onnx" in output and "max abs diff" in output
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["kind"] == "segmentation" and manifest["preprocessing"]["image_mean"] is None
    assert not (out / "tokenizer").exists()

    model = load_bundle(bundle)
    predictor = OnnxPredictor(out)
    pixels = _rand(3, 1, 32, 32)
    with torch.no_grad():
        expected = torch.sigmoid(model(pixels)["logits"])
        assert _max_diff(predictor.segment(pixels), expected) < TOL
        # 64 px in -> 32 px through the graph -> logits resized back to 64 px, then sigmoid
        large = _rand(2, 1, 64, 64)
        small = F.interpolate(large, size=(32, 32), mode="bilinear", align_corners=False)
        logits = F.interpolate(model(small)["logits"], size=(64, 64), mode="bilinear", align_corners=False)
        probabilities = predictor.segment(large)
        assert probabilities.shape == (2, 1, 64, 64)
        assert _max_diff(probabilities, torch.sigmoid(logits)) < TOL
    with pytest.raises(ValueError, match="takes no text"):
        predictor.segment(pixels, text="the lesion")


def test_text_guided_segmentation_matches_pytorch(text_unet: tuple[Path, Path]) -> None:
    bundle, out = text_unet
    model = load_bundle(bundle)
    manifest = json.loads((out / "export.json").read_text())
    assert [i["name"] for i in manifest["parts"]["segmentation"]["inputs"]] == [
        "pixel_values",
        "input_ids",
        "attention_mask",
    ]
    predictor = OnnxPredictor(out)
    pixels = _rand(4, 1, 32, 32)
    prompts = ["the lesion", "a nodule in the right lower zone near the border", "left", "both lungs"]
    with torch.no_grad():
        expected = torch.sigmoid(model(pixels, **model.tokenize(prompts))["logits"])
        assert _max_diff(predictor.segment(pixels, text=prompts), expected) < TOL
        one = torch.sigmoid(model(pixels[:2], **model.tokenize(["the lesion"] * 2))["logits"])
        assert _max_diff(predictor.segment(pixels[:2], text="the lesion"), one) < TOL
    with pytest.raises(ValueError, match="text-guided"):
        predictor.segment(pixels)
    with pytest.raises(ValueError, match="2 prompts for 4 images"):
        predictor.segment(pixels, text=prompts[:2])


def test_clip_decoder_with_text_matches_pytorch(tmp_path: Path) -> None:
    """A ViT segmenter with FiLM text prompting: vision tokens and text both in the graph."""
    bundle = _bundle(tmp_path, "bundle", "clip_decoder", text=TINY_BERT, image_size=32, in_channels=1)
    export_onnx(bundle, tmp_path / "onnx")
    model = load_bundle(bundle)
    pixels = _rand(3, 1, 32, 32)
    prompts = ["the lesion", "the lesion in the left upper zone, close to the pleura", "cyst"]
    with torch.no_grad():
        expected = torch.sigmoid(model(pixels, **model.tokenize(prompts))["logits"])
    assert _max_diff(OnnxPredictor(tmp_path / "onnx").segment(pixels, text=prompts), expected) < TOL


def test_unet_on_an_efficientnet_tower_matches_pytorch_at_another_size(tmp_path: Path) -> None:
    """A CNN tower has no position table: the graph exports at any multiple of 32, here 96 px."""
    lite0 = {"kind": "efficientnet_lite", "source": None, "config": {"variant": "efficientnet-lite0"}}
    bundle = _bundle(tmp_path, "bundle", "unet_pretrained", vision=lite0, image_size=64, in_channels=1)
    export_onnx(bundle, tmp_path / "onnx", image_size=96)
    model = load_bundle(bundle)
    pixels = _rand(2, 1, 96, 96)
    with torch.no_grad():
        expected = torch.sigmoid(model(pixels)["logits"])
    assert _max_diff(OnnxPredictor(tmp_path / "onnx").segment(pixels), expected) < TOL


@pytest.mark.parametrize(
    ("arch", "method"), [("mae_tiny", "encode"), ("report_tiny", "encode_image"), ("clinical_tiny", None)]
)
def test_vision_embedding_of_other_kinds(tmp_path: Path, arch: str, method: str | None) -> None:
    bundle = _bundle(tmp_path, "bundle", arch, image_size=32)
    written = export_onnx(bundle, tmp_path / "onnx")
    assert sorted(written) == ["manifest", "vision"]
    model = load_bundle(bundle)
    pixels = _rand(4, model.config.in_channels, 32, 32)
    with torch.no_grad():
        if method is None:  # clinical: pooled CLS of the shared tower on normalised pixels
            expected = model.vision((pixels - model.pixel_mean) / model.pixel_std)[0]
        else:
            expected = getattr(model, method)(pixels)
    assert _max_diff(OnnxPredictor(tmp_path / "onnx").embed_image(pixels), expected) < TOL


def test_verification_refuses_a_graph_that_differs(unet_cli: tuple[Path, Path, str]) -> None:
    _, out, _ = unet_cli
    torch.manual_seed(123)
    other = create_model("unet", **SMALL_UNET).eval()  # same architecture, other weights

    def logits(pixel_values: torch.Tensor) -> torch.Tensor:
        return other(pixel_values)["logits"]

    module = torch.nn.Module()
    module.forward = logits  # type: ignore[method-assign]
    with pytest.raises(ExportError, match="refusing to write"):
        verify_onnx(out / "segmentation.onnx", module, {"pixel_values": _rand(2, 1, 32, 32)})


def test_unusable_requests_raise_clear_errors(tmp_path: Path, unet_cli: tuple[Path, Path, str]) -> None:
    unet_bundle = unet_cli[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"config\.json is missing"):
        export_onnx(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ExportError, match=r"no \['text'\] part; it exports \['segmentation'\]"):
        export_onnx(unet_bundle, tmp_path / "out", parts=["text"])
    with pytest.raises(ExportError, match="unknown part"):
        export_onnx(unet_bundle, tmp_path / "out", parts=["decoder"])
    with pytest.raises(ExportError, match=r"cannot run at 30 px.*divisible by 4"):
        export_onnx(unet_bundle, tmp_path / "out", image_size=30)  # not a multiple of 4
    attrs = _bundle(
        tmp_path,
        "attrs",
        "text_unet",
        **{**SMALL_TEXT_UNET, "text": None, "attributes_vocab": {"side": ["left", "right"]}},
    )
    with pytest.raises(
        ExportError, match=r"TextGuidedSegmenter \(text_guided\) takes structured attributes.*not supported"
    ):
        export_onnx(attrs, tmp_path / "out")
    vit = _bundle(tmp_path, "vit", "clip_decoder", image_size=32, in_channels=1)
    with pytest.raises(ExportError, match="position embeddings fit 32 px"):
        export_onnx(vit, tmp_path / "out", image_size=64)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.onnx"))
    with pytest.raises(FileNotFoundError, match=r"export\.json is missing"):
        OnnxPredictor(tmp_path / "empty")

    app = typer.Typer()
    app.add_typer(export_app, name="export")
    result = CliRunner().invoke(
        app, ["export", "onnx", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "config.json is missing" in result.output


def test_help_has_an_example() -> None:
    app = typer.Typer()
    app.add_typer(export_app, name="export")
    result = CliRunner().invoke(app, ["export", "onnx", "--help"])
    assert result.exit_code == 0
    assert "medalign export onnx --model" in result.output and "--part" in result.output
