"""Upload checks: typed by content, bounded in bytes and pixels, written only inside the folder."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medalign.data.readers import read_image
from medalign.serve.uploads import UploadError, UploadLimits, store_upload


def png_bytes(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_format_comes_from_the_content_not_the_name(tmp_path: Path) -> None:
    stored = store_upload(png_bytes(40, 30), "scan.jpg", "image", tmp_path, UploadLimits())
    assert stored.format == "png" and stored.path.suffix == ".png" and stored.path.parent == tmp_path.resolve()
    assert (stored.height, stored.width, stored.depth) == (30, 40, None)
    assert read_image(stored.ref).array.shape == (30, 40)
    assert "scan" not in stored.path.name  # client names never become paths


@pytest.mark.parametrize(
    ("data", "name", "status", "reason"),
    [
        (b"", "empty.png", 400, "empty"),
        (b"patient,diagnosis\n1,benign\n", "table.png", 415, "not an image"),
        (b"\x7fELF\x02\x01\x01" + bytes(400), "../../etc/evil.png", 415, "not an image"),
        (gzip.compress(b"just text" * 50), "notes.nii.gz", 415, "not an image"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "broken.png", 400, "unreadable PNG header"),
    ],
)
def test_bad_uploads_are_refused_naming_the_file(tmp_path: Path, data: bytes, name: str, status: int, reason: str) -> None:
    with pytest.raises(UploadError, match=reason) as caught:
        store_upload(data, name, "image", tmp_path, UploadLimits())
    assert caught.value.status == status and name in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_size_and_pixel_limits(tmp_path: Path) -> None:
    small = UploadLimits(max_file_bytes=1000, max_side=512, max_pixels=300 * 300)
    with pytest.raises(UploadError, match="over the 0 MiB limit") as caught:
        store_upload(bytes(2000), "big.png", "image", tmp_path, small)
    assert caught.value.status == 413
    bomb = png_bytes(5000, 5000)  # a small file that declares 25 M pixels
    assert len(bomb) < 64 * 1024
    with pytest.raises(UploadError, match="5000x5000 pixels is over the limit") as caught:
        store_upload(bomb, "bomb.png", "image", tmp_path, UploadLimits())
    assert caught.value.status == 413
    with pytest.raises(UploadError, match="400x400"):
        store_upload(png_bytes(400, 400), "wide.png", "image", tmp_path, UploadLimits(max_pixels=300 * 300))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="max_side must be >= 1"):
        UploadLimits(max_side=0)


def test_volumes_use_their_middle_slice(tmp_path: Path) -> None:
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(7, 6, 5)  # NIfTI (X, Y, Z) = (7, 6, 5)
    path = tmp_path / "src.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    folder = tmp_path / "uploads"
    folder.mkdir()
    stored = store_upload(path.read_bytes(), "brain.nii.gz", "image", folder, UploadLimits())
    assert stored.format == "nifti" and stored.path.name.endswith(".nii.gz")
    assert (stored.depth, stored.height, stored.width) == (5, 6, 7) and stored.ref.endswith("#slice=2")
    np.testing.assert_array_equal(read_image(stored.ref).array, volume[:, :, 2].T)
    npy = io.BytesIO()
    np.save(npy, np.zeros((9, 20, 30), dtype=np.uint8))
    stored = store_upload(npy.getvalue(), "stack.npy", "image", folder, UploadLimits())
    assert (stored.depth, stored.height, stored.width) == (9, 20, 30) and stored.ref.endswith("#slice=4")


def test_dicom_dimensions_come_from_the_header(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 5000, 10, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(5000 * 10)
    path = tmp_path / "x.dcm"
    ds.save_as(str(path), enforce_file_format=True)
    folder = tmp_path / "uploads"
    folder.mkdir()
    with pytest.raises(UploadError, match="10x5000 pixels"):
        store_upload(path.read_bytes(), "tall.dcm", "image", folder, UploadLimits())
