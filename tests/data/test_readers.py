"""Tests for medalign.data.readers: every format round-trips, and every failure names file and reason."""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, generate_uid

from medalign.data.readers import (
    DICOM_META_ALLOWLIST,
    SUPPORTED_SUFFIXES,
    ImageData,
    ImageNotFoundError,
    ImageReadError,
    image_format,
    parse_image_ref,
    read_image,
    read_image_bytes,
)

PATIENT_NAME = "Doe^Jane^Secret"
PATIENT_ID = "PID-998877"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _gray(h: int = 12, w: int = 16, dtype: type = np.uint8, scale: int = 1) -> np.ndarray:
    return ((np.arange(h * w).reshape(h, w) * scale) % np.iinfo(dtype).max).astype(dtype)


def _rgb(h: int = 12, w: int = 16) -> np.ndarray:
    base = np.arange(h * w, dtype=np.uint8).reshape(h, w)
    return np.stack([base, base // 2, 255 - base], axis=-1)


def _dicom(path: Path, pixels: np.ndarray, frames: int = 1, samples: int = 1, **tags: object) -> Path:
    """Write a minimal but valid DICOM file (works with pydicom 2.4 and 3.x)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = tags.pop("transfer_syntax", ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if samples > 1 else pixels.shape[-2:]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples > 1 else "MONOCHROME2"
    if samples > 1:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(ds, key, value)
    if "PixelData" not in tags:
        ds.PixelData = pixels.tobytes()
    elif tags["PixelData"] is None:
        del ds.PixelData
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(path, ds, write_like_original=False)
    return path


def _nifti(path: Path, data: np.ndarray, zooms: tuple[float, ...]) -> Path:
    affine = np.diag([*zooms, 1.0]) if len(zooms) == 3 else np.diag([*zooms, 1.0, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# parse_image_ref / image_format
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "path", "selectors"),
    [
        ("scan.nii.gz", "scan.nii.gz", {}),
        ("scan.nii.gz#slice=12", "scan.nii.gz", {"slice": 12}),
        ("rgb.jpg#channel=1", "rgb.jpg", {"channel": 1}),
        ("cine.dcm#frame=3", "cine.dcm", {"frame": 3}),
        ("vol.nii.gz#slice=3&axis=0", "vol.nii.gz", {"slice": 3, "axis": 0}),
        ("dir#1/img#slice=2", "dir#1/img", {"slice": 2}),
        ("case#12.png", "case#12.png", {}),
        ("scan.png#slice=abc", "scan.png#slice=abc", {}),
        ("scan.png#color=1", "scan.png#color=1", {}),
        ("scan.png#slice=1&", "scan.png#slice=1&", {}),
        ("scan.png#", "scan.png#", {}),
        ("#slice=1", "#slice=1", {}),
    ],
)
def test_parse_image_ref(ref: str, path: str, selectors: dict[str, int]) -> None:
    assert parse_image_ref(ref) == (Path(path), selectors)


def test_parse_image_ref_accepts_pathlike_and_rejects_duplicate_keys() -> None:
    assert parse_image_ref(Path("a/b.npy#slice=1")) == (Path("a/b.npy"), {"slice": 1})
    with pytest.raises(ImageReadError, match="given twice"):
        parse_image_ref("a.npy#slice=1&slice=2")


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.PNG", "png"),
        ("a.jpeg", "jpeg"),
        ("a.tif", "tiff"),
        ("a.nii.gz", "nifti"),
        ("A.NII.GZ", "nifti"),
        ("a.dicom", "dicom"),
        ("a.npz", "npz"),
    ],
)
def test_image_format(name: str, fmt: str) -> None:
    assert image_format(Path(name)) == fmt


def test_unknown_suffix_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "image.xyz"
    path.write_bytes(b"data")
    with pytest.raises(ImageReadError, match=r"unsupported file suffix '\.xyz'.*\.nii\.gz") as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert all(suffix in str(info.value) for suffix in SUPPORTED_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# Pillow formats
# --------------------------------------------------------------------------------------------------


def test_png_gray_8bit(tmp_path: Path) -> None:
    arr = _gray()
    img = read_image(_png(tmp_path / "g.png", arr))
    assert img.array.dtype == np.uint8
    np.testing.assert_array_equal(img.array, arr)
    assert img.spacing == (1.0, 1.0)
    assert img.spatial_shape == (12, 16) and img.channels == 1
    assert img.meta["format"] == "png" and img.meta["dtype"] == "uint8"
    assert img.meta["is_3d"] is False and img.meta["format_mismatch"] is False
    assert img.meta["path"] == str(tmp_path / "g.png")


def test_png_rgb_and_channel_selector(tmp_path: Path) -> None:
    arr = _rgb()
    path = _png(tmp_path / "c.png", arr)
    img = read_image(path)
    np.testing.assert_array_equal(img.array, arr)
    assert img.channels == 3 and img.spatial_shape == (12, 16)
    one = read_image(f"{path}#channel=1")
    np.testing.assert_array_equal(one.array, arr[..., 1])
    assert one.channels == 1 and one.meta["channel"] == 1
    assert read_image(f"{path}#channel=1", channel=2).array[0, 1] == arr[0, 1, 2]  # keyword wins
    with pytest.raises(ImageReadError, match=r"channel index 3 .* valid range is 0\.\.2"):
        read_image(path, channel=3)


def test_png_16bit_not_clipped(tmp_path: Path) -> None:
    arr = _gray(dtype=np.uint16, scale=300)
    assert arr.max() > 255
    img = read_image(_png(tmp_path / "d.png", arr))
    assert img.array.dtype == np.uint16
    np.testing.assert_array_equal(img.array, arr)


def test_png_rgba_and_palette(tmp_path: Path) -> None:
    rgba = np.dstack([_rgb(), np.full((12, 16), 200, np.uint8)])
    assert read_image(_png(tmp_path / "a.png", rgba)).array.shape == (12, 16, 4)
    gray_palette = Image.fromarray(_gray()).convert("P")
    gray_palette.save(tmp_path / "p.png")
    pal = read_image(tmp_path / "p.png")
    assert pal.array.shape == (12, 16) and pal.meta["mode"] == "P"
    Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "q.png")
    assert read_image(tmp_path / "q.png").array.shape == (12, 16, 3)


def test_jpeg_and_bmp(tmp_path: Path) -> None:
    Image.fromarray(_rgb()).save(tmp_path / "x.jpg", quality=95)
    jpg = read_image(tmp_path / "x.jpg")
    assert jpg.array.shape == (12, 16, 3) and jpg.array.dtype == np.uint8 and jpg.meta["format"] == "jpeg"
    arr = _gray()
    bmp = read_image(_png(tmp_path / "x.bmp", arr))
    assert bmp.meta["format"] == "bmp"
    np.testing.assert_array_equal(bmp.array, arr)


def test_truncated_png_names_file(tmp_path: Path) -> None:
    path = _png(tmp_path / "t.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"truncated PNG data") as info:
        read_image(path)
    assert f"cannot read '{path}'" in str(info.value)


def test_jpeg_bytes_named_png_load_with_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "really_jpeg.png"
    Image.fromarray(_rgb()).save(path, format="JPEG")
    img = read_image(path)
    assert img.array.shape == (12, 16, 3)
    assert img.meta["format_mismatch"] is True
    assert img.meta["format"] == "jpeg" and img.meta["suffix_format"] == "png"


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "junk.png"
    path.write_bytes(b"this is definitely not an image" * 10)
    with pytest.raises(ImageReadError, match="not a valid PNG image") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_zero_byte_and_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"is empty \(0 bytes\)"):
        read_image(empty)
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(ImageNotFoundError, match="does not exist") as info:
        read_image(f"{missing}#slice=1")
    assert isinstance(info.value, ImageReadError) and str(missing) in str(info.value)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(folder)


def _truncated_jpeg(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])


def _nan_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32))


def _inf_nifti(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.array([[[0.0], [np.inf]]], dtype=np.float32), np.eye(4)), str(path))


def _truncated_dicom(path: Path) -> None:
    _dicom(path, _gray(64, 64, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-4000])


@pytest.mark.parametrize(
    ("name", "write", "reason"),
    [
        ("notes.png", lambda p: p.write_text("patient notes, not pixels\n" * 20), "not a valid PNG image"),
        ("notes.jpg", lambda p: p.write_text("patient notes, not pixels\n" * 20), "not a valid JPEG image"),
        ("cut.jpg", _truncated_jpeg, "truncated JPEG data"),
        ("nan.tif", _nan_tiff, "contains 1 NaN/Inf pixels"),
        ("inf.nii.gz", _inf_nifti, "contains 1 NaN/Inf pixels"),
        ("cut.dcm", _truncated_dicom, "DICOM"),
        ("broken.nii", lambda p: p.write_bytes(b"\x00" * 400), "not a valid NIfTI file"),
        ("pickled.npy", lambda p: np.save(p, np.array([None]), allow_pickle=True), "not a valid NPY file"),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v else "",
)
def test_bad_files_name_the_file_and_the_reason(tmp_path: Path, name: str, write, reason: str) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"cannot read '{path}': ") and reason in message, message


def test_png_bytes_named_jpg_still_load(tmp_path: Path) -> None:
    arr = _gray(dtype=np.uint16, scale=300)
    path = tmp_path / "scan.jpg"
    Image.fromarray(arr).save(path, format="PNG")
    img = read_image(path)
    np.testing.assert_array_equal(img.array, arr)  # 16-bit kept, not squeezed into JPEG's 8 bits
    assert (img.meta["format"], img.meta["suffix_format"], img.meta["format_mismatch"]) == (
        "png",
        "jpeg",
        True,
    )


def test_float_and_16bit_pixels_are_not_clipped(tmp_path: Path) -> None:
    values = np.array([[-1024.5, 0.25], [3071.0, 1e6]], dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", values)
    Image.fromarray(values).save(tmp_path / "f_as.tiff")  # Pillow mode 'F'
    for name in ("f.tif", "f_as.tiff"):
        img = read_image(tmp_path / name)
        assert img.array.dtype == np.float32
        np.testing.assert_array_equal(img.array, values)
    wide = np.array([[0, 65535], [40000, 1]], dtype=np.uint16)
    np.testing.assert_array_equal(read_image(_dicom(tmp_path / "w.dcm", wide)).array, wide)


# --------------------------------------------------------------------------------------------------
# TIFF
# --------------------------------------------------------------------------------------------------


def test_tiff_16bit_with_resolution(tmp_path: Path) -> None:
    arr = _gray(dtype=np.uint16, scale=500)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, arr, resolution=(10.0, 5.0), resolutionunit="CENTIMETER")
    img = read_image(path)
    assert img.array.dtype == np.uint16
    np.testing.assert_array_equal(img.array, arr)
    assert img.spacing == pytest.approx((2.0, 1.0))  # 10 mm / 5 px per cm rows, 10 mm / 10 px cols
    assert img.meta["spacing_unit"] == "mm"


def test_tiff_float32_and_multipage(tmp_path: Path) -> None:
    flt = np.linspace(-1, 1, 12 * 16, dtype=np.float32).reshape(12, 16)
    tifffile.imwrite(tmp_path / "f.tiff", flt)
    img = read_image(tmp_path / "f.tiff")
    assert img.array.dtype == np.float32 and img.spacing == (1.0, 1.0)
    np.testing.assert_array_equal(img.array, flt)

    vol = np.stack([_gray() + i for i in range(5)])
    tifffile.imwrite(tmp_path / "v.tif", vol)
    stack = read_image(tmp_path / "v.tif")
    assert stack.array.shape == (5, 12, 16) and stack.meta["is_3d"] is True and len(stack.spacing) == 3
    np.testing.assert_array_equal(stack.array, vol)
    np.testing.assert_array_equal(read_image(tmp_path / "v.tif", slice_index=4).array, vol[4])


def test_tiff_imagej_stack_spacing(tmp_path: Path) -> None:
    vol = np.zeros((5, 8, 9), np.uint8)
    meta = {"spacing": 2.5, "unit": "um", "axes": "ZYX"}
    tifffile.imwrite(tmp_path / "ij.tif", vol, imagej=True, resolution=(2.0, 4.0), metadata=meta)
    img = read_image(tmp_path / "ij.tif")
    assert img.array.shape == (5, 8, 9)
    assert img.spacing == pytest.approx((2.5e-3, 0.25e-3, 0.5e-3))  # micrometres converted to mm


def test_tiff_rgb(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "rgb.tif", _rgb(), photometric="rgb")
    img = read_image(tmp_path / "rgb.tif")
    assert img.array.shape == (12, 16, 3) and not img.meta["is_3d"]


# --------------------------------------------------------------------------------------------------
# NumPy
# --------------------------------------------------------------------------------------------------


def test_npy_roundtrip_and_layouts(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).random((4, 6, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", arr)
    img = read_image(tmp_path / "v.npy")
    assert img.spatial_shape == (4, 6, 8) and img.spacing == (1.0, 1.0, 1.0) and img.meta["is_3d"]
    np.testing.assert_array_equal(img.array, arr)
    np.save(tmp_path / "c.npy", np.zeros((6, 8, 3), np.uint8))
    assert read_image(tmp_path / "c.npy").channels == 3
    np.save(tmp_path / "1d.npy", np.zeros(5))
    with pytest.raises(ImageReadError, match="is not an image"):
        read_image(tmp_path / "1d.npy")


def test_npy_nan_rejected(tmp_path: Path) -> None:
    arr = np.ones((5, 5), np.float32)
    arr[1, 1] = np.nan
    arr[2, 2] = np.inf
    np.save(tmp_path / "nan.npy", arr)
    with pytest.raises(ImageReadError, match="contains 2 NaN/Inf pixels"):
        read_image(tmp_path / "nan.npy")


def test_npy_object_array_rejected(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageReadError, match="not a valid NPY file"):
        read_image(tmp_path / "o.npy")


def test_npz_single_named_and_ambiguous(tmp_path: Path) -> None:
    arr = _gray()
    np.savez(tmp_path / "one.npz", whatever=arr)
    np.testing.assert_array_equal(read_image(tmp_path / "one.npz").array, arr)
    np.savez(tmp_path / "named.npz", image=arr, mask=arr > 3)
    named = read_image(tmp_path / "named.npz")
    assert named.meta["key"] == "image"
    np.testing.assert_array_equal(named.array, arr)
    np.savez(tmp_path / "ambiguous.npz", a=arr, b=arr)
    with pytest.raises(ImageReadError, match=r"\['a', 'b'\]"):
        read_image(tmp_path / "ambiguous.npz")


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------


def test_dicom_rescale_and_spacing(tmp_path: Path) -> None:
    raw = _gray(dtype=np.uint16, scale=7)
    path = _dicom(
        tmp_path / "ct.dcm", raw, RescaleSlope="2", RescaleIntercept="-1024", PixelSpacing=[0.5, 0.7]
    )
    img = read_image(path)
    assert img.array.dtype == np.float32
    np.testing.assert_allclose(img.array, raw.astype(np.float64) * 2 - 1024)
    assert img.spacing == (0.5, 0.7)
    assert img.meta["rescale"] == (2.0, -1024.0) and img.meta["modality"] == "CT"
    assert (
        img.meta["dtype"] == "uint16" and img.meta["format"] == "dicom" and img.meta["spacing_unit"] == "mm"
    )


def test_dicom_identity_rescale_keeps_integers(tmp_path: Path) -> None:
    raw = _gray(dtype=np.int16, scale=3)
    img = read_image(_dicom(tmp_path / "id.dcm", raw, RescaleSlope="1", RescaleIntercept="0"))
    assert img.array.dtype == np.int16
    np.testing.assert_array_equal(img.array, raw)


def test_dicom_monochrome1_inverted(tmp_path: Path) -> None:
    raw = _gray(dtype=np.uint16, scale=5)
    img = read_image(_dicom(tmp_path / "m1.dcm", raw, PhotometricInterpretation="MONOCHROME1"))
    expected = int(raw.max()) + int(raw.min()) - raw.astype(np.int64)
    np.testing.assert_array_equal(img.array, expected)
    assert img.array.dtype == np.uint16
    assert img.meta["photometric"] == "MONOCHROME1" and img.meta["inverted"] is True


def test_dicom_window(tmp_path: Path) -> None:
    raw = np.arange(0, 200, dtype=np.uint16).reshape(10, 20)
    path = _dicom(tmp_path / "w.dcm", raw, WindowCenter=["100", "50"], WindowWidth=["100", "20"])
    plain = read_image(path)
    assert plain.meta["window"] == (100.0, 100.0) and plain.meta["windowed"] is False
    win = read_image(path, apply_window=True)
    assert win.array.dtype == np.float32 and win.meta["windowed"] is True
    np.testing.assert_allclose(win.array, np.clip((raw.astype(np.float64) - 50) / 100, 0, 1), atol=1e-6)
    # no window stored: returned unchanged and flagged, not an error
    bare = read_image(_dicom(tmp_path / "nowin.dcm", raw), apply_window=True)
    assert bare.meta["windowed"] is False and "window" not in bare.meta


def test_dicom_multiframe_volume_and_frame_selection(tmp_path: Path) -> None:
    vol = np.stack([_gray(dtype=np.uint16) + 100 * i for i in range(4)])
    path = _dicom(tmp_path / "cine.dcm", vol, frames=4, PixelSpacing=[0.8, 0.9], SliceThickness="2.5")
    img = read_image(path)
    assert img.array.shape == (4, 12, 16) and img.meta["is_3d"] is True
    assert img.spacing == (2.5, 0.8, 0.9)
    frame = read_image(f"{path}#frame=3")
    np.testing.assert_array_equal(frame.array, vol[3])
    assert frame.spacing == (0.8, 0.9) and frame.meta["is_3d"] is False
    with pytest.raises(ImageReadError, match=r"valid range is 0\.\.3") as info:
        read_image(path, frame=4)
    assert str(path) in str(info.value) and "index 4" in str(info.value)


def test_dicom_monochrome1_window_inverts_after_windowing(tmp_path: Path) -> None:
    raw = np.arange(0, 40, dtype=np.uint16).reshape(4, 10)
    path = _dicom(
        tmp_path / "m1w.dcm",
        raw,
        PhotometricInterpretation="MONOCHROME1",
        WindowCenter="10",
        WindowWidth="20",
    )
    img = read_image(path, apply_window=True)
    np.testing.assert_allclose(img.array, 1.0 - np.clip(raw / 20.0, 0, 1), atol=1e-6)


@pytest.mark.skipif(
    int(pydicom.__version__.split(".")[0]) < 3, reason="dcmwrite(implicit_vr=) needs pydicom 3"
)
def test_dicom_without_preamble(tmp_path: Path) -> None:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, 5, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(20, dtype=np.uint16).tobytes()
    pydicom.dcmwrite(tmp_path / "raw.dcm", ds, implicit_vr=True, little_endian=True)
    img = read_image(tmp_path / "raw.dcm")
    np.testing.assert_array_equal(img.array, np.arange(20).reshape(4, 5))
    (tmp_path / "text.dcm").write_bytes(b"hello world" * 40)
    with pytest.raises(ImageReadError, match="not a valid DICOM file"):
        read_image(tmp_path / "text.dcm")


def test_dicom_rgb(tmp_path: Path) -> None:
    rgb = _rgb()
    img = read_image(_dicom(tmp_path / "us.dcm", rgb, samples=3, Modality="US"))
    assert img.array.shape == (12, 16, 3) and img.channels == 3
    np.testing.assert_array_equal(img.array, rgb)


def test_dicom_missing_pixel_data(tmp_path: Path) -> None:
    path = _dicom(tmp_path / "nopix.dcm", _gray(), PixelData=None)
    with pytest.raises(ImageReadError, match="has no pixel data") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_dicom_compressed_without_decoder(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate

    path = _dicom(
        tmp_path / "j2k.dcm", _gray(), transfer_syntax=JPEG2000, PixelData=encapsulate([b"\x00\x01garbage"])
    )
    with pytest.raises(ImageReadError, match=r"JPEG 2000.*pip install") as info:
        read_image(path)
    assert str(path) in str(info.value)


IDENTIFYING_TAGS: dict[str, str] = {
    "PatientAddress": "12 Secret Lane",
    "OtherPatientIDs": "OTHER-4455",
    "InstitutionName": "St Hidden Hospital",
    "ReferringPhysicianName": "Dr^Whoknows",
    "AccessionNumber": "ACC-778899",
    "StudyDate": "20240229",
    "StudyDescription": "Head of Jane",
    "OperatorsName": "Tech^Person",
}


def test_dicom_never_leaks_patient_identity(tmp_path: Path) -> None:
    path = _dicom(tmp_path / "p.dcm", _gray(), WindowCenter="10", WindowWidth="20", **IDENTIFYING_TAGS)
    img = read_image(path)
    text = f"{img} {img!r} {img.meta}"
    for secret in (PATIENT_NAME, "Doe", PATIENT_ID, "19700101", *IDENTIFYING_TAGS.values()):
        assert secret not in text
    assert not any("patient" in key.lower() for key in img.meta)
    derived = {"format", "dtype", "rescale", "inverted", "windowed", "transfer_syntax", "number_of_frames"}
    derived |= {"spacing_unit", "window", "path", "is_3d", "format_mismatch"}
    allowed = {key for key, _ in DICOM_META_ALLOWLIST.values()} | derived
    assert set(img.meta) <= allowed, set(img.meta) - allowed
    assert img.meta["rows"] == 12 and img.meta["bits_stored"] == 8 and img.meta["modality"] == "CT"


def test_dicom_without_suffix_is_sniffed(tmp_path: Path) -> None:
    path = _dicom(tmp_path / "IM0001", _gray())
    assert image_format(path) == "dicom"
    assert read_image(path).meta["format"] == "dicom"


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------


def test_nifti_3d_axis_order_and_spacing(tmp_path: Path) -> None:
    data = np.random.default_rng(2).random((5, 6, 7)).astype(np.float32)  # (X, Y, Z)
    path = _nifti(tmp_path / "v.nii.gz", data, (0.5, 0.75, 2.0))
    img = read_image(path)
    assert img.array.shape == (7, 6, 5)  # (D, H, W) = (Z, Y, X)
    assert img.spacing == pytest.approx((2.0, 0.75, 0.5))
    np.testing.assert_array_equal(img.array, data.transpose(2, 1, 0))
    assert img.meta["orientation"] == "RAS" and len(img.meta["affine"]) == 4
    assert img.meta["is_3d"] is True and img.meta["format"] == "nifti"


def test_nifti_slice_extraction(tmp_path: Path) -> None:
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    path = _nifti(tmp_path / "v.nii", data, (0.5, 0.75, 2.0))
    by_kwarg = read_image(path, slice_index=2)
    by_ref = read_image(f"{path}#slice=2")
    np.testing.assert_array_equal(by_kwarg.array, data[:, :, 2].T)
    np.testing.assert_array_equal(by_ref.array, by_kwarg.array)
    assert by_ref.spacing == pytest.approx((0.75, 0.5)) and by_ref.array.dtype == np.int16
    along_h = read_image(f"{path}#slice=1&axis=1")
    assert along_h.array.shape == (7, 5) and along_h.spacing == pytest.approx((2.0, 0.5))
    with pytest.raises(ImageReadError, match=r"slice index 7 .* valid range is 0\.\.6") as info:
        read_image(path, slice_index=7)
    assert str(path) in str(info.value)


def test_nifti_2d(tmp_path: Path) -> None:
    data = np.arange(5 * 6, dtype=np.float32).reshape(5, 6, 1)  # (X, Y, 1)
    img = read_image(_nifti(tmp_path / "s.nii.gz", data, (0.3, 0.4, 1.0)))
    assert img.array.shape == (6, 5) and img.spacing == pytest.approx((0.4, 0.3))
    assert img.meta["is_3d"] is False
    with pytest.raises(ImageReadError, match="needs a 3D volume"):
        read_image(tmp_path / "s.nii.gz", slice_index=0)


def test_nifti_scaled_integers_become_float32(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.diag([-1.0, 1.0, 1.0, 1.0]))
    img.header.set_slope_inter(0.5, 10)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    out = read_image(tmp_path / "s.nii.gz")
    assert out.array.dtype == np.float32 and out.meta["dtype"] == "int16"
    assert out.array.max() == pytest.approx(59 * 0.5 + 10)
    assert out.meta["orientation"] == "LAS"  # reported, data not reoriented


def test_nifti_orientation_is_kept_as_stored_and_reported(tmp_path: Path) -> None:
    """One anatomy stored three ways (RAS, x flipped = LAS, x/y swapped = ARS): the reader does not
    reorient (documented), it reports the orientation, and canonicalising by it gives the same anatomy."""
    anatomy = np.random.default_rng(3).random((4, 5, 6)).astype(np.float32)  # (X, Y, Z) in RAS
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip_x[0, 3] = 3.0  # voxel i of the flipped file is voxel 3 - i of the RAS one: same world points
    swap_xy = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    stored = {
        "ras": (anatomy, np.eye(4)),
        "las": (anatomy[::-1].copy(), flip_x),
        "ars": (anatomy.transpose(1, 0, 2).copy(), swap_xy),
    }
    reads = {}
    for name, (data, affine) in stored.items():
        nib.save(nib.Nifti1Image(data, affine), str(tmp_path / f"{name}.nii.gz"))
        reads[name] = read_image(tmp_path / f"{name}.nii.gz#slice=2")  # slice 2 along the stored z
    assert [r.meta["orientation"] for r in reads.values()] == ["RAS", "LAS", "ARS"]
    ras = reads["ras"].array  # (Y, X) of z = 2
    np.testing.assert_array_equal(reads["las"].array, ras[:, ::-1])  # as stored: x runs the other way
    np.testing.assert_array_equal(reads["ars"].array, ras.T)  # as stored: x and y swapped
    for name in ("las", "ars"):  # what a caller does with meta["orientation"] / meta["affine"]
        canonical = nib.as_closest_canonical(nib.load(str(tmp_path / f"{name}.nii.gz")))
        np.testing.assert_array_equal(np.asarray(canonical.dataobj)[:, :, 2].T, ras)


def test_nifti_4d_rejected(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 2), np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    with pytest.raises(ImageReadError, match="4D NIfTI"):
        read_image(tmp_path / "t.nii.gz")


# --------------------------------------------------------------------------------------------------
# common behaviour
# --------------------------------------------------------------------------------------------------


def test_dtype_cast_and_conflicting_selectors(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.zeros((3, 4, 5), np.uint8))
    assert read_image(tmp_path / "v.npy", dtype=np.float32).array.dtype == np.float32
    with pytest.raises(ImageReadError, match="conflicting selectors"):
        read_image(f"{tmp_path / 'v.npy'}#slice=1", frame=2)


def test_error_is_picklable_and_valueerror() -> None:
    err = ImageReadError.for_file("a/b.png", "truncated PNG data (x)")
    assert isinstance(err, ValueError)
    assert str(err) == "cannot read 'a/b.png': truncated PNG data (x)"
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err) and clone.path == "a/b.png"


def test_imagedata_validates_shape() -> None:
    data = ImageData(np.zeros((2, 3, 4)), (1, 2, 3), {})
    assert data.spacing == (1.0, 2.0, 3.0) and data.channels == 1 and data.spatial_shape == (2, 3, 4)
    assert ImageData(np.zeros((2, 3, 3)), (1, 1), {}).channels == 3
    with pytest.raises(ValueError, match="does not fit"):
        ImageData(np.zeros((2, 3, 4, 5, 6)), (1, 1, 1), {})


# --------------------------------------------------------------------------------------------------
# Regressions found by benchmarks/fuzz.py: damage must raise ImageReadError naming the file
# --------------------------------------------------------------------------------------------------


def _patch(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"0.5\\0.7", b"0.5\\0.!"),  # PixelSpacing that is no decimal string (converted lazily)
        (b"-1024", b"\x011024"),  # RescaleIntercept likewise
        (b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00C\x80"),  # Modality with an unknown VR
        (b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.9\x00"),  # a UID that is no transfer syntax
    ],
)
def test_dicom_malformed_elements_are_named(tmp_path: Path, old: bytes, new: bytes) -> None:
    pixels = _gray(dtype=np.uint16)
    path = _dicom(
        tmp_path / "bad.dcm", pixels, PixelSpacing=[0.5, 0.7], RescaleSlope=2, RescaleIntercept=-1024
    )
    with pytest.raises(ImageReadError, match=r"bad\.dcm': (corrupt DICOM|cannot decode)"):
        read_image(_patch(path, old, new))


def test_nifti_nan_affine_is_named(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "nan.nii", np.zeros((4, 5, 3), np.int16), (1.0, 1.0, 2.0))
    data = bytearray(path.read_bytes())
    data[280:296] = np.full(4, np.nan, "<f4").tobytes()  # srow_x: the sform's first row
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"nan\.nii': not a valid NIfTI file"):
        read_image(path)


def test_npz_member_that_is_not_npy_is_named(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as archive:
        archive.writestr("image", b"raw bytes, no .npy header")
    with pytest.raises(ImageReadError, match=r"raw\.npz': NPZ member 'image' is not a \.npy array"):
        read_image(tmp_path / "raw.npz")


def test_png_size_field_that_exhausts_memory_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk length of ~2**31 makes Pillow allocate it; under a memory limit that is a MemoryError."""
    from PIL import PngImagePlugin

    def exhaust(self: object) -> None:
        raise MemoryError

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load_end", exhaust)
    with pytest.raises(ImageReadError, match=r"big\.png': corrupt PNG data \(MemoryError\)"):
        read_image(_png(tmp_path / "big.png", _gray()))


def test_read_image_bytes_gives_read_images_array(tmp_path: Path) -> None:
    """Tar shard members decode like the files they were copied from, content before suffix."""
    from medalign.data.readers import ImageReadError, read_image, read_image_bytes

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", rng.normal(size=(4, 9, 7)).astype(np.float32))
    for name in ("a.png", "b.npy"):
        path = tmp_path / name
        got = read_image_bytes(path.read_bytes(), path.suffix, name=f"shard/{name}")
        assert np.array_equal(got.array, read_image(path).array) and got.meta["path"] == f"shard/{name}"
    as_jpeg = read_image_bytes((tmp_path / "a.png").read_bytes(), ".jpg")  # renamed: content decides
    assert as_jpeg.meta["format"] == "png" and as_jpeg.meta["format_mismatch"]
    with pytest.raises(ImageReadError, match=r"shard/x\.png.*not a valid PNG"):
        read_image_bytes(b"not an image at all", ".png", name="shard/x.png")


def test_gif_reads_its_first_frame(tmp_path: Path) -> None:
    """Masks are often released as GIF (palette, sometimes animated): the first frame, palette expanded."""
    first = np.zeros((6, 8), np.uint8)
    first[2:4, 3:6] = 255
    frames = [Image.fromarray(first), Image.fromarray(255 - first)]
    frames[0].save(tmp_path / "mask.gif", save_all=True, append_images=frames[1:])
    image = read_image(tmp_path / "mask.gif")
    assert image.array.shape == (6, 8) and np.array_equal(image.array, first)
    assert image.meta["format"] == "gif" and image.meta["n_frames"] == 2
    assert np.array_equal(read_image_bytes((tmp_path / "mask.gif").read_bytes(), ".gif").array, first)
