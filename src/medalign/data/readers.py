"""One entry point that turns any supported medical image file into a numpy array plus spacing.

Datasets, importers and the CLI all call :func:`read_image`, so dtype rules, axis order and failure
messages are the same whatever the file format. Every failure is an :class:`ImageReadError` whose
message names the file and the reason, because a scan over thousands of files is only debuggable
when the error says *which* file broke and *why*.

Conventions shared by all formats:

* 2D images are ``(H, W)`` or channels-last ``(H, W, C)``; 3D volumes are ``(D, H, W)`` (slices
  first), optionally ``(D, H, W, C)`` for colour cine loops and RGB stacks.
* ``spacing`` has one entry per *spatial* axis in array order, in millimetres where the file says
  so (DICOM, NIfTI, TIFF resolution tags in inch/cm) and ``1.0`` where the file has no physical size.
* Pixel values are never silently repaired: NaN/Inf pixels raise instead of being replaced.
* Data is never resampled or reoriented; NIfTI orientation is reported in ``meta`` instead, so the
  caller decides whether the stored orientation matters.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "DICOM_META_ALLOWLIST",
    "SELECTOR_KEYS",
    "SUPPORTED_SUFFIXES",
    "ImageData",
    "ImageNotFoundError",
    "ImageReadError",
    "image_format",
    "parse_image_ref",
    "read_image",
    "read_image_bytes",
    "storage_suffix",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
    ".gif",
    ".dcm",
    ".dicom",
    ".nii",
    ".nii.gz",
    ".npy",
    ".npz",
)

_SUFFIX_FORMATS: dict[str, str] = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".bmp": "bmp",
    ".gif": "gif",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".npy": "npy",
    ".npz": "npz",
}

SELECTOR_KEYS: tuple[str, ...] = ("slice", "frame", "channel", "axis")
_KEY = "(?:slice|frame|channel|axis)"
_SELECTOR_RE = re.compile(rf"{_KEY}=-?\d+(?:&{_KEY}=-?\d+)*")

# Channel counts that make a trailing array axis read as colour rather than as a tiny spatial axis.
_CHANNEL_COUNTS = (1, 2, 3, 4)


class ImageReadError(ValueError):
    """Any failure to turn a file into an image.

    A single type (a ``ValueError``, since the input is bad rather than the program) lets dataset
    scans catch one thing and still report which file failed and why. The constructor takes one
    message so the error survives pickling and re-raising in DataLoader worker processes.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.reason = reason

    @classmethod
    def for_file(cls, path: str | os.PathLike[str], reason: str) -> ImageReadError:
        """Build the standard ``cannot read '<path>': <reason>`` message."""
        return cls(f"cannot read '{path}': {reason}", path=path, reason=reason)


class ImageNotFoundError(ImageReadError):
    """The referenced file does not exist: usually a wrong manifest root, not a corrupt file."""


@dataclass(frozen=True, eq=False)
class ImageData:
    """Pixels plus the geometry needed to interpret them.

    ``spacing`` has one entry per spatial axis, so its length says whether the array is 2D or 3D
    and any extra trailing array axis is channels. Equality is identity (``eq=False``) because
    element-wise array comparison has no single truth value.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.spacing)
        object.__setattr__(self, "spacing", spacing)
        if len(spacing) not in (2, 3):
            raise ValueError(f"spacing must have 2 or 3 entries (one per spatial axis), got {spacing}")
        if self.array.ndim not in (len(spacing), len(spacing) + 1):
            raise ValueError(
                f"array shape {self.array.shape} does not fit {len(spacing)} spatial axes "
                "(expected spatial axes first, optionally one trailing channel axis)"
            )

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """``(H, W)`` or ``(D, H, W)``: the shape without the channel axis."""
        return tuple(int(n) for n in self.array.shape[: len(self.spacing)])

    @property
    def channels(self) -> int:
        """Number of channels; 1 when the array has no channel axis."""
        return int(self.array.shape[-1]) if self.array.ndim > len(self.spacing) else 1

    @property
    def is_3d(self) -> bool:
        return len(self.spacing) == 3

    def __repr__(self) -> str:
        # The default repr would dump the whole array and meta; keep it to one readable line.
        return (
            f"ImageData(shape={self.array.shape}, dtype={self.array.dtype}, spacing={self.spacing}, "
            f"format={self.meta.get('format')!r}, path={self.meta.get('path')!r})"
        )


@dataclass
class _Decoded:
    """What a format backend hands back before selection and common checks."""

    array: np.ndarray
    spacing: tuple[float, ...]
    meta: dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# References and formats
# ---------------------------------------------------------------------------------------------------


def parse_image_ref(ref: str | os.PathLike[str]) -> tuple[Path, dict[str, int]]:
    """Split a manifest cell like ``"scan.nii.gz#slice=12&axis=0"`` into path and selectors.

    Only the last ``#`` counts, and only when everything after it is ``key=int`` pairs with known
    keys, so real file names that contain ``#`` keep working unchanged.
    """
    text = os.fspath(ref)
    head, sep, tail = text.rpartition("#")
    if not sep or not head or _SELECTOR_RE.fullmatch(tail) is None:
        return Path(text), {}
    selectors: dict[str, int] = {}
    for pair in tail.split("&"):
        key, value = pair.split("=")
        if key in selectors:
            raise ImageReadError.for_file(head, f"selector key '{key}' is given twice in {text!r}")
        selectors[key] = int(value)
    return Path(head), selectors


def _suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def image_format(path: Path) -> str:
    """Format name from the file suffix (case-insensitive, ``.nii.gz`` aware).

    DICOM files often carry no usable suffix (``IM0001``, UID-named files such as ``1.2.840.3``),
    so an unknown suffix falls back to the DICOM ``DICM`` marker before giving up.
    """
    path = Path(path)
    suffix = _suffix_of(path)
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    if path.is_file() and "dicom" in _sniff_formats(path):
        return "dicom"
    supported = ", ".join(SUPPORTED_SUFFIXES)
    raise ImageReadError.for_file(
        path, f"unsupported file suffix {suffix or '(none)'!r}; supported suffixes: {supported}"
    )


def storage_suffix(path: Path) -> str:
    """The suffix that names ``path``'s format, for a copy of its bytes (suffix-less DICOM -> ``.dcm``)."""
    suffix = _suffix_of(Path(path))
    return suffix if suffix in _SUFFIX_FORMATS else {"dicom": ".dcm"}[image_format(Path(path))]


# How many leading bytes :func:`sniff_formats` needs (the NIfTI-1 magic ends at byte 348).
SNIFF_BYTES = 352


def _sniff_formats(path: Path) -> list[str]:
    with path.open("rb") as handle:
        return sniff_formats(handle.read(SNIFF_BYTES))


def sniff_formats(head: bytes) -> list[str]:
    """Formats a file's first :data:`SNIFF_BYTES` bytes are consistent with, most specific first.

    A list rather than one answer because some files are legitimately two things at once
    (DICOM whole-slide files carry a TIFF header in their preamble). Uploads are typed by this,
    never by the name a client sent.
    """
    found: list[str] = []
    if head[128:132] == b"DICM":
        found.append("dicom")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        found.append("png")
    if head.startswith(b"\xff\xd8\xff"):
        found.append("jpeg")
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        found.append("tiff")
    if head.startswith(b"BM"):
        found.append("bmp")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        found.append("gif")
    if head.startswith(b"\x93NUMPY"):
        found.append("npy")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        found.append("npz")
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        found.append("nifti")
    return found


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageNotFoundError(f"cannot read '{path}': file does not exist", path=path, reason="missing")
    if path.is_dir():
        raise ImageReadError.for_file(path, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError.for_file(path, "file is empty (0 bytes)")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one line: multi-line library messages garble log tables
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _content_hint(path: Path, expected: str, data: bytes | None = None) -> str:
    """Point at the real content when a decoder fails, since a renamed file is the usual cause."""
    found = sniff_formats(data[:SNIFF_BYTES]) if data is not None else _sniff_formats(path)
    other = [fmt for fmt in found if fmt != expected]
    return f"; the content looks like {other[0].upper()}" if other else ""


# ---------------------------------------------------------------------------------------------------
# Pillow: PNG, JPEG, BMP, GIF (first frame; and anything Pillow recognises when the suffix lies)
# ---------------------------------------------------------------------------------------------------

_PIL_FORMATS = {
    "PNG": "png",
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "BMP": "bmp",
    "DIB": "bmp",
    "GIF": "gif",
    "TIFF": "tiff",
}
_PIL_NATIVE_MODES = {"L", "LA", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def _is_gray(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def _palette_to_array(img: Any) -> np.ndarray:
    """Expand a palette so indices never leak out as if they were intensities."""
    has_alpha = img.mode == "PA" or "transparency" in img.info
    rgb = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    if not _is_gray(rgb[..., :3]):
        return rgb
    return rgb[..., [0, 3]] if has_alpha else rgb[..., 0]


def _pil_to_array(img: Any) -> np.ndarray:
    """Pixel array that keeps the stored bit depth (16-bit PNG stays uint16, 'F' stays float32)."""
    mode = img.mode
    if mode in ("P", "PA"):
        array = _palette_to_array(img)
    elif mode == "1":
        array = np.asarray(img.convert("L"))
    elif mode in _PIL_NATIVE_MODES:
        array = np.asarray(img)
    else:  # CMYK, YCbCr, LAB, RGBX, premultiplied alpha ...: normalise to plain RGB(A)
        array = np.asarray(img.convert("RGBA" if "A" in mode or "a" in mode else "RGB"))
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    if mode == "I" and img.format == "PNG" and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # older Pillow decodes 16-bit PNG as 32-bit 'I'
    return array


def _read_pillow(path: Path, expected: str, data: bytes | None = None) -> _Decoded:
    """Decode with Pillow from ``path``, or from ``data`` (in memory) with ``path`` naming it in errors."""
    from PIL import Image, UnidentifiedImageError

    label = expected.upper()
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img.load()  # Image.open only parses the header; decoding is where truncation surfaces
            detected = _PIL_FORMATS.get(img.format or "", (img.format or "unknown").lower())
            mode = img.mode
            frames = int(getattr(img, "n_frames", 1))
            array = _pil_to_array(img)
    except UnidentifiedImageError as exc:
        reason = (
            f"not a valid {label} image (Pillow cannot identify the content"
            f"{_content_hint(path, expected, data)})"
        )
        raise ImageReadError.for_file(path, reason) from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombError) as exc:
        # MemoryError: a chunk length field of ~2**31 makes Pillow allocate it before reading
        kind = "truncated" if "truncat" in str(exc).lower() else "corrupt"
        raise ImageReadError.for_file(path, f"{kind} {label} data ({_describe(exc)})") from exc
    meta: dict[str, Any] = {"format": detected, "mode": mode, "dtype": array.dtype.name}
    if frames > 1:
        meta["n_frames"] = frames  # animated PNG/GIF: only the first frame is read (masks often ship as GIF)
    return _Decoded(array, (1.0, 1.0), meta)


# ---------------------------------------------------------------------------------------------------
# TIFF
# ---------------------------------------------------------------------------------------------------

# TIFF ResolutionUnit codes -> millimetres per unit (4/5 are the common non-standard mm/um extensions).
_TIFF_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}
# ImageJ writes ResolutionUnit "none" and names the real unit in its metadata instead.
_IMAGEJ_UNIT_MM = {
    "nm": 1e-6,
    "um": 1e-3,
    "micron": 1e-3,
    "\u00b5m": 1e-3,
    "\u03bcm": 1e-3,
    "\\u00b5m": 1e-3,
    "mm": 1.0,
    "cm": 10.0,
    "m": 1000.0,
    "inch": 25.4,
}


def _resolution(tag: Any) -> float:
    """Pixels per unit from a RATIONAL tag value; 0.0 when absent or degenerate."""
    if tag is None:
        return 0.0
    value = tag.value
    num, den = value if isinstance(value, tuple) else (value, 1)
    return float(num) / float(den) if den else 0.0


def _tiff_spacing(tif: Any, spatial: int) -> tuple[tuple[float, ...], bool]:
    """Spacing in mm from resolution tags (or ImageJ's unit), and whether it is physical at all.

    Resolution is pixels per unit; without a known length unit it says nothing physical, so the
    spacing falls back to 1.0 rather than reporting a meaningless 72 dpi as a pixel size.
    """
    tags = tif.pages[0].tags
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default unit is inch
    imagej = tif.imagej_metadata or {}
    imagej_mm = _IMAGEJ_UNIT_MM.get(str(imagej.get("unit", "")).strip().lower())
    unit_mm = _TIFF_UNIT_MM.get(unit) or imagej_mm
    x_res, y_res = _resolution(tags.get("XResolution")), _resolution(tags.get("YResolution"))
    if unit_mm is None or x_res <= 0 or y_res <= 0:
        return (1.0,) * spatial, False
    in_plane = (unit_mm / y_res, unit_mm / x_res)
    if spatial == 2:
        return in_plane, True
    depth = float(imagej["spacing"]) * imagej_mm if imagej_mm and "spacing" in imagej else 1.0
    return (depth, *in_plane), True


def _tiff_to_layout(array: np.ndarray, axes: str, path: Path) -> tuple[np.ndarray, int]:
    """Reorder tifffile's named axes into ``([D,] H, W[, C])``; also return the spatial axis count.

    'S' (samples) and ImageJ 'C' are channels; any other non-YX axis (pages, Z, T, Q) is the stack.
    """
    axes = axes.upper()
    if len(axes) != array.ndim or "Y" not in axes or "X" not in axes:
        raise ImageReadError.for_file(path, f"unsupported TIFF layout: axes {axes!r} for shape {array.shape}")
    keep = [i for i, ax in enumerate(axes) if ax in "YX" or array.shape[i] > 1]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    channel_axes = [i for i, ax in enumerate(axes) if ax in "SC"]
    stack_axes = [i for i, ax in enumerate(axes) if ax not in "YXSC"]
    if len(channel_axes) > 1 or len(stack_axes) > 1:
        raise ImageReadError.for_file(
            path,
            f"TIFF has axes {axes!r} with shape {array.shape}; only one stack axis and one channel axis "
            "can be read",
        )
    order = [*stack_axes, axes.index("Y"), axes.index("X"), *channel_axes]
    return np.ascontiguousarray(array.transpose(order)), 2 + len(stack_axes)


def _read_tiff(path: Path, expected: str = "tiff") -> _Decoded:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            array = series.asarray()
            axes = series.axes
            array, spatial = _tiff_to_layout(array, axes, path)
            spacing, physical = _tiff_spacing(tif, spatial)
            n_series = len(tif.series)
    except ImageReadError:
        raise
    except Exception as exc:
        reason = f"not a valid TIFF file ({_describe(exc)}{_content_hint(path, 'tiff')})"
        raise ImageReadError.for_file(path, reason) from exc
    dtype_name = series.dtype.name
    meta: dict[str, Any] = {"format": "tiff", "dtype": dtype_name, "axes": axes}
    meta["spacing_unit"] = "mm" if physical else "pixel"
    if n_series > 1:
        meta["n_series"] = n_series  # pyramids / differently shaped pages: only series 0 is read
    return _Decoded(array, spacing, meta)


# ---------------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------------

_DICOM_DECODER_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pip install pylibjpeg pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.51": "pip install pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.70": "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.80": "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.90": "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.91": "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.201": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",
}
# The only DICOM attributes whose values reach ``meta`` (keyword -> (meta key, conversion)); spacing,
# rescale, window, frames and the transfer syntax are read by the pixel pipeline itself. Nothing
# that identifies a patient, study, institution or physician is ever copied (see _dicom_safe_tags).
DICOM_META_ALLOWLIST: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "Modality": ("modality", str),
    "PhotometricInterpretation": ("photometric", str),
    "Rows": ("rows", int),
    "Columns": ("columns", int),
    "SamplesPerPixel": ("samples_per_pixel", int),
    "BitsAllocated": ("bits_allocated", int),
    "BitsStored": ("bits_stored", int),
    "PixelRepresentation": ("pixel_representation", int),
    "BodyPartExamined": ("body_part", str),
    "ViewPosition": ("view_position", str),
    "ImageOrientationPatient": ("image_orientation", lambda v: [float(x) for x in v]),
    "SliceThickness": ("slice_thickness", float),
}
_DEFAULT_DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _dcmread(path: Path) -> Any:
    """Read a DICOM dataset, accepting old files without the 128-byte preamble and 'DICM' marker."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except Exception as exc:
        raise ImageReadError.for_file(path, f"corrupt DICOM file ({_describe(exc)})") from exc
    not_dicom = (
        f"not a valid DICOM file (no 'DICM' marker and no image attributes{_content_hint(path, 'dicom')})"
    )
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise ImageReadError.for_file(path, not_dicom) from exc
    if "Rows" not in ds and not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise ImageReadError.for_file(path, not_dicom)
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds: Any) -> None:
    """Raw datasets (no file meta) lack a transfer syntax; pixel decoding needs one, so infer it."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in ds.file_meta:
        return
    encoding = getattr(ds, "original_encoding", None)
    implicit = encoding[0] if encoding else getattr(ds, "is_implicit_VR", True)
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
    )


def _first(value: Any) -> Any:
    """DICOM multi-valued elements (e.g. several windows): the first value is the default one."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return value[0]
    return value


def _dicom_values(ds: Any, keyword: str, group: str) -> list[Any]:
    """Per-frame values of a tag that may live at top level or in (enhanced) functional groups.

    Returns one value (applies to all frames), one per frame, or an empty list when absent.
    """
    if keyword in ds and ds[keyword].value not in (None, ""):
        return [ds[keyword].value]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and group in shared[0] and shared[0][group].value and keyword in shared[0][group].value[0]:
        return [shared[0][group].value[0][keyword].value]
    values = []
    for item in ds.get("PerFrameFunctionalGroupsSequence") or []:
        if group not in item or not item[group].value or keyword not in item[group].value[0]:
            return []
        values.append(item[group].value[0][keyword].value)
    return values


def _dicom_pixels(ds: Any, path: Path) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:
        if syntax is not None and syntax.is_transfer_syntax and syntax.is_compressed:
            hint = _DICOM_DECODER_HINTS.get(str(syntax), _DEFAULT_DECODER_HINT)
            reason = (
                f"cannot decode pixel data with compressed transfer syntax '{syntax.name}' ({syntax}): "
                f"{_describe(exc)}; if no decoder for it is installed: {hint}"
            )
        else:
            reason = f"corrupt DICOM pixel data ({_describe(exc)})"
        raise ImageReadError.for_file(path, reason) from exc


def _per_frame(values: list[float], n_frames: int, ndim: int) -> np.ndarray | float:
    """Broadcastable form of per-frame values (leading frame axis), or a scalar when they agree."""
    if len(set(values)) == 1 or len(values) != n_frames:
        return values[0]
    return np.asarray(values, dtype=np.float64).reshape((n_frames,) + (1,) * (ndim - 1))


def _rescale_values(ds: Any, keyword: str, default: float) -> list[float]:
    return [float(v) for v in _dicom_values(ds, keyword, "PixelValueTransformationSequence")] or [default]


def _dicom_rescale(ds: Any, array: np.ndarray, n_frames: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Modality rescale to real units (HU for CT); identity keeps the stored integer dtype."""
    slopes = _rescale_values(ds, "RescaleSlope", 1.0)
    intercepts = _rescale_values(ds, "RescaleIntercept", 0.0)
    first = (slopes[0], intercepts[0])
    if all(s == 1.0 for s in slopes) and all(i == 0.0 for i in intercepts):
        return array, first
    slope = _per_frame(slopes, n_frames, array.ndim)
    intercept = _per_frame(intercepts, n_frames, array.ndim)
    return (array.astype(np.float64) * slope + intercept).astype(np.float32), first


def _dicom_window(ds: Any) -> tuple[float, float] | None:
    centers = _dicom_values(ds, "WindowCenter", "FrameVOILUTSequence")
    widths = _dicom_values(ds, "WindowWidth", "FrameVOILUTSequence")
    if not centers or not widths:
        return None
    return float(_first(centers[0])), float(_first(widths[0]))


def _apply_window(array: np.ndarray, window: tuple[float, float], path: Path) -> np.ndarray:
    """Clip to [center - width/2, center + width/2] and scale to [0, 1], as a radiologist would view it."""
    center, width = window
    if width <= 0:
        raise ImageReadError.for_file(path, f"invalid DICOM window width {width} (must be > 0)")
    low = center - width / 2.0
    return ((np.clip(array.astype(np.float64), low, low + width) - low) / width).astype(np.float32)


def _invert(array: np.ndarray) -> np.ndarray:
    """MONOCHROME1 stores bright as low; flip within the data range so bright is high like everywhere else."""
    lo, hi = array.min(), array.max()
    if np.issubdtype(array.dtype, np.integer):
        return (int(hi) + int(lo) - array.astype(np.int64)).astype(array.dtype)
    return (hi + lo - array).astype(array.dtype)


def _dicom_spacing(ds: Any, is_3d: bool) -> tuple[tuple[float, ...], bool]:
    pixel = _dicom_values(ds, "PixelSpacing", "PixelMeasuresSequence") or (
        [ds.ImagerPixelSpacing] if "ImagerPixelSpacing" in ds else []
    )
    physical = bool(pixel) and len(pixel[0]) == 2
    row, col = (float(pixel[0][0]), float(pixel[0][1])) if physical else (1.0, 1.0)
    if not is_3d:
        return (row, col), physical
    between = _dicom_values(ds, "SpacingBetweenSlices", "PixelMeasuresSequence") or _dicom_values(
        ds, "SliceThickness", "PixelMeasuresSequence"
    )
    depth = abs(float(between[0])) if between and float(between[0]) != 0 else 1.0
    return (depth, row, col), physical


def _read_dicom(path: Path, *, apply_window: bool) -> _Decoded:
    """Read the dataset, then interpret it; a malformed element surfaces only when it is used.

    pydicom converts element values lazily, so an unknown VR, a decimal string like ``'0.7!'`` or a
    bad UID raises from whichever attribute access touches it first, deep inside the modality
    pipeline. All of those are a corrupt file, reported as such with the file name.
    """
    try:
        return _interpret_dicom(_dcmread(path), path, apply_window=apply_window)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError.for_file(path, f"corrupt DICOM data element ({_describe(exc)})") from exc


def _interpret_dicom(ds: Any, path: Path, *, apply_window: bool) -> _Decoded:
    """Decode pixels and apply the modality pipeline: rescale, then VOI window, then MONOCHROME1 flip.

    Windowing must happen before the flip because WindowCenter is defined on rescaled values.
    Only technical tags go into ``meta``: readers must never leak patient identity downstream.
    """
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise ImageReadError.for_file(path, "DICOM dataset has no pixel data")
    raw = _dicom_pixels(ds, path)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    is_3d = n_frames > 1
    expected_ndim = 2 + int(is_3d) + int(samples > 1)
    if raw.ndim != expected_ndim:
        raise ImageReadError.for_file(
            path,
            f"pixel array shape {raw.shape} does not match NumberOfFrames={n_frames}, SamplesPerPixel={samples}",
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    array, rescale = (raw, (1.0, 0.0)) if samples > 1 else _dicom_rescale(ds, raw, n_frames)
    _check_finite(array, path)
    window = _dicom_window(ds) if samples == 1 else None
    windowed = apply_window and window is not None
    if apply_window and window is not None:
        array = _apply_window(array, window, path)
    inverted = photometric == "MONOCHROME1"
    if inverted:
        array = (1.0 - array).astype(np.float32) if windowed else _invert(array)
    spacing, physical = _dicom_spacing(ds, is_3d)
    meta: dict[str, Any] = {
        **_dicom_safe_tags(ds),
        "format": "dicom",
        "dtype": raw.dtype.name,
        "rescale": rescale,
        "inverted": inverted,
        "windowed": windowed,
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")),
        "number_of_frames": n_frames,
        "spacing_unit": "mm" if physical else "pixel",
    }
    if window is not None:
        meta["window"] = window
    return _Decoded(array, spacing, meta)


def _dicom_safe_tags(ds: Any) -> dict[str, Any]:
    """The allowlisted technical attributes of a dataset, under their ``meta`` names.

    Copying by allowlist (never "everything but patient tags") is what keeps identity out of
    ``meta`` and thus out of logs, manifests, reports and exported files: a tag nobody thought
    of (a private tag, an institution address) is simply never copied.
    """
    meta: dict[str, Any] = {}
    for keyword, (key, convert) in DICOM_META_ALLOWLIST.items():
        value = ds.get(keyword)
        if value not in (None, ""):
            meta[key] = convert(value)
    return meta


# ---------------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------------

_NIFTI_UNIT_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}


def _read_nifti(path: Path, expected: str = "nifti") -> _Decoded:
    """Read NIfTI as stored: (X, Y, Z) becomes (Z, Y, X) with no reorientation.

    Reorienting would silently change what "slice 3" means relative to the file; the affine and
    its axis codes go into ``meta`` so a caller who needs canonical orientation can get it.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)
        data = np.asanyarray(img.dataobj)
        zooms = [float(z) for z in img.header.get_zooms()]
        space_unit = img.header.get_xyzt_units()[0] if hasattr(img.header, "get_xyzt_units") else "mm"
        stored_dtype = np.dtype(img.get_data_dtype())
        affine = np.asarray(img.affine, dtype=np.float64)
        codes = nib.aff2axcodes(affine)  # SVD of the affine: fails on NaN/Inf header fields
    except Exception as exc:
        reason = f"not a valid NIfTI file ({_describe(exc)}{_content_hint(path, 'nifti')})"
        raise ImageReadError.for_file(path, reason) from exc
    if stored_dtype.kind in "iu" and data.dtype == np.float64:
        data = data.astype(np.float32)  # scl_slope made it float; match DICOM's float32 for rescaled ints
    if data.dtype.names:  # RGB24/RGBA32 are stored as structured dtypes
        data = np.stack([data[name] for name in data.dtype.names], axis=-1)
        channel_axes = 1
    else:
        channel_axes = 0
    spatial = data.ndim - channel_axes
    while spatial > 3 and data.shape[spatial - 1] == 1:  # (X, Y, Z, 1): a 3D image saved as 4D
        data = data.reshape(data.shape[: spatial - 1] + data.shape[spatial:])
        spatial -= 1
    if spatial == 3 and data.shape[2] == 1:
        data = data.reshape(data.shape[:2] + data.shape[3:])
        spatial = 2
    if spatial not in (2, 3):
        raise ImageReadError.for_file(
            path,
            f"{spatial}D NIfTI with shape {data.shape} is not supported; only 2D and 3D images can be read",
        )
    order = [*reversed(range(spatial)), *range(spatial, data.ndim)]
    array = np.ascontiguousarray(data.transpose(order))
    unit = _NIFTI_UNIT_MM.get(space_unit or "unknown", 1.0)
    spacing = tuple(zooms[i] * unit if i < len(zooms) else 1.0 for i in reversed(range(spatial)))
    meta: dict[str, Any] = {
        "format": "nifti",
        "dtype": stored_dtype.name if not stored_dtype.names else "rgb",
        "affine": affine.tolist(),
        "orientation": "".join(code or "?" for code in codes),
        "spacing_unit": "mm",
    }
    return _Decoded(array, spacing, meta)


# ---------------------------------------------------------------------------------------------------
# NumPy
# ---------------------------------------------------------------------------------------------------


def _layout_plain_array(array: np.ndarray, path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Interpret a bare array: a small trailing axis (1-4) is channels, otherwise 3D is (D, H, W).

    Channels-first arrays such as (3, H, W) therefore read as 3-slice volumes; store channels last.
    A single trailing channel is dropped so (H, W, 1) and (H, W) behave the same downstream.
    """
    spatial = array.ndim
    if array.ndim in (3, 4) and array.shape[-1] in _CHANNEL_COUNTS:
        if array.shape[-1] == 1:
            array = array[..., 0]
        spatial -= 1
    if array.ndim < 2 or spatial not in (2, 3):
        raise ImageReadError.for_file(
            path,
            f"array with shape {array.shape} is not an image; expected (H, W), (H, W, C), (D, H, W) or (D, H, W, C)",
        )
    return array, (1.0,) * spatial


def _load_numpy(path: Path, label: str) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        reason = f"not a valid {label} file ({_describe(exc)}{_content_hint(path, label.lower())})"
        raise ImageReadError.for_file(path, reason) from exc


def _read_npy(path: Path, expected: str = "npy") -> _Decoded:
    array = _load_numpy(path, "NPY")
    if not isinstance(array, np.ndarray):
        raise ImageReadError.for_file(path, "not a valid NPY file (it holds an archive, not one array)")
    dtype_name = array.dtype.name
    array, spacing = _layout_plain_array(np.asarray(array), path)
    return _Decoded(array, spacing, {"format": "npy", "dtype": dtype_name})


def _read_npz(path: Path, expected: str = "npz") -> _Decoded:
    """Pick the image out of an archive: the only array, else 'image', else 'arr_0' (np.savez default)."""
    archive = _load_numpy(path, "NPZ")
    if isinstance(archive, np.ndarray):
        raise ImageReadError.for_file(path, "not a valid NPZ file (it holds a single .npy array)")
    with archive:
        keys = list(archive.files)
        key = keys[0] if len(keys) == 1 else next((k for k in ("image", "arr_0") if k in keys), None)
        if key is None:
            reason = f"NPZ archive has {len(keys)} arrays {keys} and none is named 'image' or 'arr_0'"
            raise ImageReadError.for_file(path, reason)
        try:
            array = archive[key]
        except Exception as exc:
            raise ImageReadError.for_file(path, f"cannot load array {key!r} ({_describe(exc)})") from exc
    if not isinstance(array, np.ndarray):  # NpzFile returns members not named *.npy as raw bytes
        raise ImageReadError.for_file(path, f"NPZ member {key!r} is not a .npy array")
    dtype_name = array.dtype.name
    array, spacing = _layout_plain_array(array, path)
    return _Decoded(array, spacing, {"format": "npz", "dtype": dtype_name, "key": key})


# ---------------------------------------------------------------------------------------------------
# Common checks, selection and the public reader
# ---------------------------------------------------------------------------------------------------


def _check_dtype(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind not in "uif":
        raise ImageReadError.for_file(
            path, f"unsupported pixel dtype {array.dtype} (need integer or float pixels)"
        )
    return array


def _check_finite(array: np.ndarray, path: Path) -> None:
    """Reject NaN/Inf rather than patching them: a silent fill would hide a broken export upstream."""
    if array.dtype.kind != "f":
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ImageReadError.for_file(path, f"contains {bad} NaN/Inf pixels")


def _take_slice(decoded: _Decoded, path: Path, index: int, axis: int) -> _Decoded:
    shape = decoded.array.shape
    if len(decoded.spacing) != 3:
        raise ImageReadError.for_file(
            path,
            f"slice/frame {index} requested but the image is 2D with shape {shape}; selection needs a 3D volume",
        )
    if not 0 <= axis <= 2:
        raise ImageReadError.for_file(
            path, f"slice axis {axis} is out of range; valid range is 0..2 of (D, H, W)"
        )
    size = shape[axis]
    if not 0 <= index < size:
        raise ImageReadError.for_file(
            path,
            f"slice index {index} is out of range for axis {axis} of shape {shape}; valid range is 0..{size - 1}",
        )
    array = np.take(decoded.array, index, axis=axis)  # a copy, so the full volume can be freed
    spacing = tuple(s for i, s in enumerate(decoded.spacing) if i != axis)
    meta = {**decoded.meta, "slice_index": index, "slice_axis": axis, "source_shape": tuple(shape)}
    return _Decoded(array, spacing, meta)


def _take_channel(decoded: _Decoded, path: Path, channel: int) -> _Decoded:
    spatial = len(decoded.spacing)
    has_axis = decoded.array.ndim > spatial
    count = decoded.array.shape[-1] if has_axis else 1
    if not 0 <= channel < count:
        raise ImageReadError.for_file(
            path,
            f"channel index {channel} is out of range; the image has {count} channel(s), valid range is 0..{count - 1}",
        )
    array = np.ascontiguousarray(decoded.array[..., channel]) if has_axis else decoded.array
    return _Decoded(array, decoded.spacing, {**decoded.meta, "channel": channel})


def _merge_index(
    path: Path, slice_index: int | None, frame: int | None, selectors: dict[str, int]
) -> int | None:
    """'slice' and 'frame' are synonyms (volumes vs cine loops); keyword arguments override the ref."""
    slice_index = slice_index if slice_index is not None else selectors.get("slice")
    frame = frame if frame is not None else selectors.get("frame")
    if slice_index is not None and frame is not None and slice_index != frame:
        raise ImageReadError.for_file(
            path, f"conflicting selectors slice={slice_index} and frame={frame}; they name the same axis"
        )
    return slice_index if slice_index is not None else frame


def _load(path: Path, fmt: str, apply_window: bool) -> _Decoded:
    if fmt == "dicom":
        return _read_dicom(path, apply_window=apply_window)
    backends: dict[str, Callable[[Path, str], _Decoded]] = {
        "png": _read_pillow,
        "jpeg": _read_pillow,
        "bmp": _read_pillow,
        "gif": _read_pillow,
        "tiff": _read_tiff,
        "nifti": _read_nifti,
        "npy": _read_npy,
        "npz": _read_npz,
    }
    return backends[fmt](path, fmt)


def read_image(
    ref: str | os.PathLike[str],
    *,
    slice_index: int | None = None,
    frame: int | None = None,
    channel: int | None = None,
    slice_axis: int | None = None,
    apply_window: bool = False,
    dtype: DTypeLike | None = None,
) -> ImageData:
    """Read one image file (optionally one slice/frame/channel of it) into an :class:`ImageData`.

    ``ref`` may carry a ``#slice=..&frame=..&channel=..&axis=..`` selector; keyword arguments win
    over it. ``slice_axis`` defaults to 0 (the D axis). ``apply_window`` maps DICOM intensities
    through the stored WindowCenter/WindowWidth to [0, 1]; files without a window are returned
    unchanged with ``meta["windowed"] = False``. ``dtype`` casts the final array.
    The file's content decides the decoder: a file whose bytes are another supported format than
    its suffix says still loads, with ``meta["format_mismatch"] = True``.
    """
    path, selectors = parse_image_ref(ref)
    index = _merge_index(path, slice_index, frame, selectors)
    channel = channel if channel is not None else selectors.get("channel")
    axis = slice_axis if slice_axis is not None else selectors.get("axis", 0)

    _check_file(path)
    suffix_format = image_format(path)
    content = _sniff_formats(path)
    fmt = suffix_format if suffix_format in content or not content else content[0]

    return _finish(_load(path, fmt, apply_window), path, suffix_format, index, axis, channel, dtype)


def _finish(
    decoded: _Decoded,
    path: Path,
    suffix_format: str,
    index: int | None = None,
    axis: int = 0,
    channel: int | None = None,
    dtype: DTypeLike | None = None,
) -> ImageData:
    """Checks, selection and meta that every decoded image goes through, from a file or from bytes."""
    decoded.array = _check_dtype(decoded.array, path)
    _check_finite(decoded.array, path)
    if index is not None:
        decoded = _take_slice(decoded, path, index, axis)
    if channel is not None:
        decoded = _take_channel(decoded, path, channel)
    array = decoded.array if dtype is None else decoded.array.astype(dtype, copy=False)

    meta = dict(decoded.meta)
    meta.setdefault("spacing_unit", "pixel")
    meta.setdefault("windowed", False)
    meta.update(
        path=str(path),
        is_3d=len(decoded.spacing) == 3,
        format_mismatch=meta["format"] != suffix_format,
    )
    if meta["format_mismatch"]:
        meta["suffix_format"] = suffix_format
    return ImageData(array=array, spacing=decoded.spacing, meta=meta)


_PILLOW_FORMATS = ("png", "jpeg", "bmp", "gif")


def read_image_bytes(data: bytes, suffix: str, *, name: str = "<bytes>") -> ImageData:
    """:func:`read_image` for a file's bytes (a tar shard member), giving the identical array.

    ``suffix`` (``".png"``, ``".nii.gz"``...) plays the file name's part and the content decides
    the decoder, as for files. PNG/JPEG/BMP decode in memory; formats whose libraries want a
    file (NIfTI, DICOM, TIFF, NumPy) go through a temporary file, so their rules stay in one place.
    ``name`` stands for the file in error messages.
    """
    label = Path(name)
    suffix_format = _SUFFIX_FORMATS.get(suffix.lower())
    if suffix_format is None:
        raise ImageReadError.for_file(label, f"unsupported file suffix {suffix!r}")
    if not data:
        raise ImageReadError.for_file(label, "file is empty (0 bytes)")
    content = sniff_formats(data[:SNIFF_BYTES])
    fmt = suffix_format if suffix_format in content or not content else content[0]
    if fmt in _PILLOW_FORMATS:
        return _finish(_read_pillow(label, fmt, data), label, suffix_format)
    with tempfile.TemporaryDirectory(prefix="medalign-") as folder:
        path = Path(folder) / f"image{suffix.lower()}"
        path.write_bytes(data)
        image = read_image(path)
    return ImageData(image.array, image.spacing, {**image.meta, "path": name})
