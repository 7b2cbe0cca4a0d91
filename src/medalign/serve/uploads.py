"""Uploads for the web demo: typed by their bytes, bounded in size and pixels, kept in one folder.

A hostile or careless client controls three things: how many bytes it sends, what those bytes
are, and what the file is called. So the request body is capped before it is parsed, the
format comes from the content (:func:`medalign.data.readers.sniff_formats`), never from the
client's name or content type, the image's dimensions are read from its header before any
pixel is decoded (a 50 kB PNG can declare 100 000 x 100 000 pixels), and the file is written
under a random name inside the server's own temporary folder and deleted after the request.
Nothing here imports the web framework, so the rules are tested without a server.
"""

from __future__ import annotations

import gzip
import io
import uuid
from dataclasses import dataclass
from pathlib import Path

from medalign.data.readers import SNIFF_BYTES, sniff_formats

# Suffix written for each sniffed format, so the reader picks the decoder the bytes call for.
_SUFFIX_FOR = {
    "png": ".png",
    "jpeg": ".jpg",
    "tiff": ".tif",
    "bmp": ".bmp",
    "dicom": ".dcm",
    "nifti": ".nii",
    "npy": ".npy",
}
_GZIP_MAGIC = b"\x1f\x8b"


class UploadError(ValueError):
    """A rejected upload; ``status`` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what one request may bring (defaults fit clinical 2-D images, not whole slides)."""

    max_request_bytes: int = 32 * 1024 * 1024
    max_file_bytes: int = 16 * 1024 * 1024
    max_files: int = 8
    max_side: int = 4096
    max_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_file_bytes", "max_files", "max_side", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"upload limit {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class StoredUpload:
    """An accepted upload: ``ref`` is what :func:`medalign.data.readers.read_image` reads."""

    field: str
    filename: str
    path: Path
    ref: str
    format: str
    height: int
    width: int
    depth: int | None = None  # slices of a volume (the middle one is used)


def _content_format(data: bytes, filename: str) -> str:
    head = data[:SNIFF_BYTES]
    if head.startswith(_GZIP_MAGIC):  # .nii.gz: the NIfTI magic is inside the compressed stream
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
                inner = stream.read(SNIFF_BYTES)
        except (OSError, EOFError) as exc:
            raise UploadError(f"'{filename}': corrupt gzip data ({exc})") from exc
        return "nifti.gz" if "nifti" in sniff_formats(inner) else "gzip"
    found = [fmt for fmt in sniff_formats(head) if fmt in _SUFFIX_FOR]
    return found[0] if found else "unknown"


def _dimensions(path: Path, fmt: str) -> tuple[int, int, int | None]:
    """(height, width, depth or None) from the file's header, without decoding pixels."""
    if fmt in ("png", "jpeg", "bmp", "tiff"):
        from PIL import Image

        with Image.open(path) as img:  # parses the header only
            width, height = img.size
        return height, width, None
    if fmt == "dicom":
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        return int(ds.Rows), int(ds.Columns), frames if frames > 1 else None
    if fmt in ("nifti", "nifti.gz"):
        import nibabel as nib

        shape = [int(n) for n in nib.load(str(path)).header.get_data_shape()[:3]]
        x, y, z = [*shape, 1, 1][:3]
        return y, x, z if z > 1 else None  # the reader's layout is (Z, Y, X)
    if fmt == "npy":
        import numpy as np

        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            dims = [int(n) for n in read_header(handle)[0]]
        if dims and dims[-1] in (1, 2, 3, 4) and len(dims) in (3, 4):  # trailing channels, as the reader
            dims = dims[:-1]
        if len(dims) == 3:  # (D, H, W)
            return dims[1], dims[2], dims[0]
        height, width = [*dims, 1, 1][:2]
        return height, width, None
    raise UploadError(f"unsupported format {fmt!r}", status=415)


def store_upload(data: bytes, filename: str, field: str, folder: Path, limits: UploadLimits) -> StoredUpload:
    """Check one uploaded file and write it under a random name in ``folder``.

    Raises :class:`UploadError` naming the file and the reason: empty, too large, not an image
    (415), or too many pixels (413). The caller deletes ``path`` when the request is done.
    """
    label = filename or field
    if not data:
        raise UploadError(f"'{label}': the file is empty")
    if len(data) > limits.max_file_bytes:
        raise UploadError(
            f"'{label}': {len(data) / 2**20:.1f} MiB is over the {limits.max_file_bytes / 2**20:.0f} MiB limit",
            status=413,
        )
    fmt = _content_format(data, label)
    if fmt in ("unknown", "gzip"):
        raise UploadError(
            f"'{label}': not an image this demo reads (PNG, JPEG, TIFF, BMP, DICOM, NIfTI, .npy), "
            "judged by the file's content, not its name",
            status=415,
        )
    suffix = ".nii.gz" if fmt == "nifti.gz" else _SUFFIX_FOR[fmt]
    folder = folder.resolve()
    path = folder / f"{uuid.uuid4().hex}{suffix}"
    if path.parent != folder:  # cannot happen with a uuid name; kept as the invariant it guards
        raise UploadError(f"'{label}': refused path outside the upload folder")
    path.write_bytes(data)
    try:
        height, width, depth = _dimensions(path, fmt)
    except UploadError:
        path.unlink(missing_ok=True)
        raise
    except Exception as exc:  # a header the parser rejects: the file is not a usable image
        path.unlink(missing_ok=True)
        raise UploadError(f"'{label}': unreadable {fmt.upper()} header ({type(exc).__name__}: {exc})") from exc
    if max(height, width) > limits.max_side or height * width > limits.max_pixels:
        path.unlink(missing_ok=True)
        raise UploadError(
            f"'{label}': {width}x{height} pixels is over the limit ({limits.max_side} px a side, "
            f"{limits.max_pixels} pixels)",
            status=413,
        )
    ref = f"{path}#slice={depth // 2}" if depth else str(path)
    return StoredUpload(field, label, path, ref, fmt.removesuffix(".gz"), height, width, depth)
