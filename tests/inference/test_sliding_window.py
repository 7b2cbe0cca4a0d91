from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medalign.bundle import save_bundle
from medalign.bundle.inputs import InputSpec
from medalign.cli import app
from medalign.inference.sliding_window import overlay, predict_probabilities, save_mask
from medalign.models import create_model

TINY_TEXT = {
    "source": None,
    "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
}


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("unet", in_channels=1, image_size=32, channels=[4, 8, 16]).eval()


def test_sliding_windows_cover_any_size_and_match_a_single_window(unet) -> None:
    image = torch.rand(1, 1, 70, 45)
    probabilities = predict_probabilities(unet, image)
    assert probabilities.shape == (70, 45) and ((probabilities >= 0) & (probabilities <= 1)).all()
    window = torch.rand(1, 1, 32, 32)
    direct = torch.sigmoid(unet(pixel_values=window)["logits"][0, 0]).detach().numpy()
    np.testing.assert_allclose(predict_probabilities(unet, window), direct, atol=1e-5)


def test_bf16_inference_stays_close_to_fp32_and_batching_does_not_change_the_result(unet) -> None:
    image = torch.rand(1, 1, 96, 80)
    fp32 = predict_probabilities(unet, image)
    np.testing.assert_allclose(predict_probabilities(unet, image, sw_batch_size=8), fp32, atol=1e-5)
    bf16 = predict_probabilities(unet, image, bf16=True)
    assert bf16.dtype == np.float32 and np.abs(bf16 - fp32).max() < 0.05


def test_flip_tta_is_the_mean_of_both_orientations(unet) -> None:
    image = torch.rand(1, 1, 32, 32)
    plain = predict_probabilities(unet, image)
    flipped = predict_probabilities(unet, image.flip(-1))[:, ::-1]
    np.testing.assert_allclose(
        predict_probabilities(unet, image, flip_tta=True), (plain + flipped) / 2, atol=1e-5
    )


def test_text_models_see_the_whole_image_and_flip_their_prompt_with_it() -> None:
    model = create_model(
        "text_unet", in_channels=1, image_size=32, base_width=4, depth=2, decoder_fusion=[1, 2], text=TINY_TEXT
    ).eval()
    image = torch.rand(1, 1, 40, 40)
    with pytest.raises(ValueError, match="text-guided"):
        predict_probabilities(model, image)
    left, right = "the lesion in the left upper zone", "the lesion in the right upper zone"
    plain = predict_probabilities(model, image, text=left)
    assert plain.shape == (40, 40)
    # the whole image at the training size, as evaluation sees it (no sliding windows)
    resized = torch.nn.functional.interpolate(image, size=(32, 32), mode="bilinear")
    with torch.no_grad():
        logits = model(pixel_values=resized, **model.tokenize([left]))["logits"]
    expected = torch.nn.functional.interpolate(torch.sigmoid(logits), size=(40, 40), mode="bilinear")
    np.testing.assert_allclose(plain, expected[0, 0].numpy(), atol=1e-5)
    # flip TTA: the flipped image is asked for the mirrored prompt
    mirrored = predict_probabilities(model, image.flip(-1), text=right)[:, ::-1]
    np.testing.assert_allclose(
        predict_probabilities(model, image, text=left, flip_tta=True), (plain + mirrored) / 2, atol=1e-5
    )
    assert predict_probabilities(model, image, text="").shape == (40, 40)  # the empty prompt


def test_outputs_png_nifti_and_overlay(tmp_path: Path) -> None:
    mask = np.zeros((20, 30), bool)
    mask[5:10, 3:12] = True
    assert set(np.unique(np.asarray(Image.open(save_mask(mask, tmp_path / "m.png"))))) == {0, 255}
    volume = nib.load(str(save_mask(mask, tmp_path / "m.nii.gz", spacing=(0.5, 0.8))))
    assert volume.shape == (30, 20, 1) and np.allclose(volume.header.get_zooms()[:2], (0.8, 0.5))
    assert np.array_equal(np.asarray(volume.dataobj)[:, :, 0].T.astype(bool), mask)
    picture = np.asarray(overlay(torch.zeros(1, 1, 20, 30), mask))
    assert picture.shape == (20, 30, 3) and picture[7, 7, 0] > picture[7, 7, 1] and picture[0, 0].sum() == 0


def test_predict_segment_takes_each_modality_a_stacked_bundle_needs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("unet", in_channels=2, image_size=32, channels=[4, 8, 16])
    bundle = save_bundle(model, tmp_path / "bundle", inputs=InputSpec("stacked", ("a", "b"), 1))
    for name in ("a", "b"):
        Image.fromarray(np.full((40, 36), 60 if name == "a" else 200, np.uint8)).save(tmp_path / f"{name}.png")
    Image.fromarray(np.zeros((9, 12), np.uint8)).save(tmp_path / "small.png")
    base = ["predict", "segment", "-m", str(bundle), "-o", str(tmp_path / "mask.png")]

    one = CliRunner().invoke(app, [*base, "--image", str(tmp_path / "a.png")])
    assert one.exit_code == 1 and "modalities a + b stacked as 2 channels" in one.output
    assert "--image a=FILE --image b=FILE" in one.output and not (tmp_path / "mask.png").exists()
    unnamed = CliRunner().invoke(app, [*base, "--image", str(tmp_path / "a.png"), "--image", str(tmp_path / "b.png")])
    assert unnamed.exit_code == 1 and "2 unnamed --image" in unnamed.output
    both = [*base, "--image", f"a={tmp_path / 'a.png'}", "--image", f"b={tmp_path / 'b.png'}"]
    result = CliRunner().invoke(app, both)
    assert result.exit_code == 0 and "(inputs: a+b)" in result.output, result.output
    assert Image.open(tmp_path / "mask.png").size == (36, 40)
    small = CliRunner().invoke(app, [*base, "--image", f"a={tmp_path / 'a.png'}", "--image", f"b={tmp_path / 'small.png'}"])
    assert small.exit_code == 1 and "differ in size" in small.output


def test_cli_predict_segment(tmp_path: Path, unet) -> None:
    save_bundle(unet, tmp_path / "bundle")
    Image.fromarray((np.random.default_rng(0).random((50, 60)) * 255).astype(np.uint8)).save(
        tmp_path / "x.png"
    )
    result = CliRunner().invoke(
        app,
        [
            "predict",
            "segment",
            "--model",
            str(tmp_path / "bundle"),
            "--image",
            str(tmp_path / "x.png"),
            "--out",
            str(tmp_path / "mask.png"),
            "--overlay",
            str(tmp_path / "overlay.png"),
            "--tta",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        Image.open(tmp_path / "mask.png").size == (60, 50)
        and Image.open(tmp_path / "overlay.png").mode == "RGB"
    )
