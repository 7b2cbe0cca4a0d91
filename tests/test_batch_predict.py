"""`predict masks` / `predict classify` over files and folders: masks at the source geometry
(PNG size, NIfTI shape/affine, a slice's in-plane placement), results tables that match the
Predictor's own answers, and a corrupt file reported (exit code 1) while the others are written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

import medalign
from medalign.batch_predict import (
    MASK_COLUMNS,
    BatchInputError,
    InputFile,
    collect_inputs,
    output_path,
    predict_classes,
    predict_masks,
)
from medalign.bundle import save_bundle
from medalign.models import create_model

NAMES = ["normal", "benign", "malignant"]
# A rotated, anisotropic, shifted voxel grid: any axis mix-up in the written mask shows in its affine.
AFFINE = np.array([[0.0, -0.8, 0.0, 10.0], [0.7, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0.0, 0.0, 0.0, 1.0]])


def cli() -> typer.Typer:
    """The lead registers these on `predict_app`; a local app stands in for it here."""
    app = typer.Typer()
    app.command("masks")(predict_masks)
    app.command("classify")(predict_classes)
    return app


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_bundle(
        create_model("unet", image_size=32, channels=[4, 8, 16]), tmp_path_factory.mktemp("u") / "b"
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.png 40x50, sub/b.png 32x32, vol.nii.gz (X, Y, Z) = (20, 24, 3) and a corrupt broken.png."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / "sub" / "b.png")
    volume = rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)
    nib.save(nib.Nifti1Image(volume, AFFINE), str(root / "vol.nii.gz"))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_masks_keep_source_geometry_and_report_the_corrupt_file(
    unet_bundle: Path, images: Path, tmp_path: Path
) -> None:
    predictor = medalign.load(str(unet_bundle))
    probs_a = predictor.segment(images / "a.png")
    threshold = float(np.median(probs_a))  # random weights: the median splits a.png in half
    out = tmp_path / "out"
    args = ["masks", "--model", str(unet_bundle), str(images), "--out", str(out)]
    result = CliRunner().invoke(cli(), [*args, "--threshold", str(threshold), "--probabilities"])

    assert result.exit_code == 1, result.output
    assert "broken.png" in result.output and "3 ok, 1 failed" in result.output
    rows = read_csv(out / "results.csv")
    assert [Path(r["source"]).name for r in rows] == ["a.png", "broken.png", "b.png", "vol.nii.gz"]
    assert list(rows[0]) == list(MASK_COLUMNS)
    by_name = {Path(r["source"]).name: r for r in rows}

    broken = by_name["broken.png"]
    assert broken["status"] == "error" and "broken.png" in broken["error"] and broken["mask"] == ""

    mask_a = np.asarray(Image.open(out / "a.png"))
    assert mask_a.shape == (40, 50) and set(np.unique(mask_a)) == {0, 255}
    np.testing.assert_array_equal(mask_a == 255, probs_a > threshold)
    row = by_name["a.png"]
    assert (row["height"], row["width"], row["slices"], row["status"]) == ("40", "50", "1", "ok")
    assert float(row["foreground_fraction"]) == pytest.approx((probs_a > threshold).mean())
    assert float(row["mean_probability"]) == pytest.approx(probs_a[probs_a > threshold].mean(), rel=1e-6)
    stored = np.asarray(Image.open(out / "a_prob.png")).astype(np.float64) / 65535
    np.testing.assert_allclose(stored, probs_a, atol=1 / 65535)

    assert np.asarray(Image.open(out / "sub" / "b.png")).shape == (32, 32)  # folder structure mirrored

    written = nib.load(str(out / "vol.nii.gz"))  # "same": NIfTI in, NIfTI out at the source geometry
    assert written.shape == (20, 24, 3) and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, AFFINE)
    for k in range(3):
        slice_probs = predictor.segment(f"{images / 'vol.nii.gz'}#slice={k}")  # (Y, X) of voxel slice k
        np.testing.assert_array_equal(np.asarray(written.dataobj)[:, :, k].T, slice_probs > threshold)
    assert by_name["vol.nii.gz"]["slices"] == "3" and by_name["vol.nii.gz"]["height"] == "24"
    probability_map = nib.load(str(out / "vol_prob.nii.gz"))
    assert probability_map.get_data_dtype() == np.float32
    np.testing.assert_allclose(probability_map.affine, AFFINE)

    summary = json.loads((out / "results.json").read_text())
    assert (summary["n_inputs"], summary["n_ok"], summary["n_failed"]) == (4, 3, 1)
    assert summary["errors"] == [{"source": broken["source"], "error": broken["error"]}]
    assert summary["threshold"] == threshold and summary["format"] == "same"
    for json_row, csv_row in zip(summary["results"], rows, strict=True):
        assert {k: "" if v is None else str(v) for k, v in json_row.items()} == csv_row


def test_a_slice_becomes_a_2d_nifti_placed_where_it_lies(
    unet_bundle: Path, images: Path, tmp_path: Path
) -> None:
    ref = f"{images / 'vol.nii.gz'}#slice=2"
    result = CliRunner().invoke(
        cli(),
        [
            "masks",
            "-m",
            str(unet_bundle),
            ref,
            str(images / "a.png"),
            "-o",
            str(tmp_path),
            "--format",
            "nifti",
        ],
    )
    assert result.exit_code == 0, result.output
    written = nib.load(str(tmp_path / "vol_slice2.nii.gz"))
    assert written.shape == (20, 24, 1)
    # voxel (i, j, 0) of the mask sits at the world position of voxel (i, j, 2) of the volume
    for i, j in [(0, 0), (5, 7), (19, 23)]:
        np.testing.assert_allclose(written.affine @ [i, j, 0, 1], AFFINE @ [i, j, 2, 1])
    expected = medalign.load(str(unet_bundle)).segment(ref) > 0.5
    np.testing.assert_array_equal(np.asarray(written.dataobj)[:, :, 0].T, expected)
    png_as_nifti = nib.load(str(tmp_path / "a.nii.gz"))  # PNG source: its size, unit spacing
    assert png_as_nifti.shape == (50, 40, 1)
    np.testing.assert_allclose(png_as_nifti.affine, np.eye(4))


def test_png_cannot_hold_a_volume_and_the_others_are_still_written(
    unet_bundle: Path, images: Path, tmp_path: Path
) -> None:
    args = [
        "masks",
        "-m",
        str(unet_bundle),
        str(images / "vol.nii.gz"),
        str(images / "a.png"),
        "-o",
        str(tmp_path),
    ]
    result = CliRunner().invoke(cli(), [*args, "--format", "png"])
    assert result.exit_code == 1
    rows = {Path(r["source"]).name: r for r in read_csv(tmp_path / "results.csv")}
    assert "PNG holds one 2D image" in rows["vol.nii.gz"]["error"]
    assert rows["a.png"]["status"] == "ok" and (tmp_path / "a.png").is_file()


def test_inputs_are_collected_mirrored_and_checked(images: Path, tmp_path: Path) -> None:
    found = collect_inputs([images], exclude=images / "sub")  # an output folder inside is skipped
    assert [Path(f.ref).name for f in found] == ["a.png", "broken.png", "vol.nii.gz"]
    two = collect_inputs([images, images / "sub"])  # several folders: each under its own name
    assert output_path(two[-1], tmp_path, ".png") == tmp_path / "sub" / "b.png"
    assert output_path(two[0], tmp_path, ".png") == tmp_path / images.name / "a.png"
    assert collect_inputs([f"{images / 'vol.nii.gz'}#slice=1"]) == [
        InputFile(f"{images / 'vol.nii.gz'}#slice=1", Path(), "vol_slice1")
    ]
    with pytest.raises(BatchInputError, match="does not exist"):
        collect_inputs([images / "missing.png"])
    with pytest.raises(BatchInputError, match="no image files"):
        collect_inputs([tmp_path])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.jpg")
    with pytest.raises(BatchInputError, match="same output"):
        collect_inputs([images / "a.png", tmp_path / "a.jpg"])


def test_bundles_that_cannot_answer_are_one_clear_error(
    unet_bundle: Path, images: Path, tmp_path: Path
) -> None:
    align = save_bundle(create_model("align_tiny", in_channels=1, image_size=32), tmp_path / "align")
    fusion = create_model("fuse_early", image_size=32, task_head="classify", num_classes=3)
    fused = save_bundle(fusion, tmp_path / "fusion")
    image = str(images / "a.png")
    for command, bundle, message in [
        ("masks", align, "'DualEncoder' bundle; `predict masks` needs a segmentation one"),
        ("classify", unet_bundle, "'segmentation' bundle without a classifier"),
        ("classify", fused, "one image was given without naming its modality. Pass --image a=FILE --image b=FILE"),
    ]:
        result = CliRunner().invoke(cli(), [command, "-m", str(bundle), image, "-o", str(tmp_path / "o")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "o").exists()  # refused before anything is written


def test_zero_shot_classification_rows_match_the_predictor(images: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    bundle = save_bundle(create_model("align_tiny", in_channels=3, image_size=32), tmp_path / "align")
    np.save(tmp_path / "two_channels.npy", np.zeros((32, 32, 2), np.uint8))  # reads; 2 -> 3 channels fails
    out = tmp_path / "out"
    inputs = [
        str(images / "a.png"),
        str(images / "sub"),
        str(images / "broken.png"),
        str(tmp_path / "two_channels.npy"),
    ]
    labels = [arg for name in NAMES for arg in ("--label", name)]
    args = ["classify", "-m", str(bundle), *inputs, "-o", str(out), *labels, "--batch-size", "2"]
    result = CliRunner().invoke(cli(), args)

    assert result.exit_code == 1, result.output
    rows = read_csv(out / "results.csv")
    assert [Path(r["source"]).name for r in rows] == ["a.png", "b.png", "broken.png", "two_channels.npy"]
    assert list(rows[0]) == ["source", "inputs", "label", "probability", *(f"p:{n}" for n in NAMES), "status", "error"]
    assert rows[0]["inputs"] == "image"
    expected = medalign.load(str(bundle)).classify([images / "a.png", images / "sub" / "b.png"], labels=NAMES)
    for row, probs in zip(rows[:2], expected, strict=True):
        assert row["status"] == "ok"
        got = {n: float(row[f"p:{n}"]) for n in NAMES}
        assert got == pytest.approx(probs, abs=1e-6) and sum(got.values()) == pytest.approx(1.0)
        assert row["label"] == max(probs, key=probs.get)
        assert float(row["probability"]) == pytest.approx(max(probs.values()), abs=1e-6)
    assert rows[2]["status"] == "error" and "broken.png" in rows[2]["error"]
    assert rows[3]["status"] == "error" and "channel" in rows[3]["error"]  # batch failed: retried alone
    summary = json.loads((out / "results.json").read_text())
    assert summary["classes"] == NAMES and summary["n_failed"] == 2
    assert summary["results"][0]["p:normal"] == pytest.approx(float(rows[0]["p:normal"]))


def test_zero_shot_without_classes_is_refused(images: Path, tmp_path: Path) -> None:
    bundle = save_bundle(create_model("align_tiny", in_channels=1, image_size=32), tmp_path / "align")
    result = CliRunner().invoke(
        cli(), ["classify", "-m", str(bundle), str(images / "a.png"), "-o", str(tmp_path)]
    )
    assert result.exit_code == 1 and "--label" in result.output


def test_help_lists_examples() -> None:
    for command in ("masks", "classify"):
        result = CliRunner().invoke(cli(), [command, "--help"])
        assert result.exit_code == 0 and "Examples:" in result.output and "medalign predict" in result.output
