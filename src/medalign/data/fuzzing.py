"""The input contract of the data layer, as something a fuzzer can check: seed files, mutators, targets.

Readers, manifest parsing and importers promise that *any* bytes either give a valid result or
raise their own error type (:class:`~medalign.data.readers.ImageReadError`,
:class:`~medalign.data.manifest.ManifestError`,
:class:`~medalign.data.importers.registry.DatasetImportError`) with the file's name in the message,
because a scan over thousands of files is only debuggable that way. Anything else (an
``IndexError`` from a truncated header, a bare library exception, a ``MemoryError`` from a size
field nobody checked) is a bug.

This module lives in the package, not under ``tests/``, because two places use it: the hypothesis
tests (``tests/data/test_fuzz_properties.py``, a few dozen mutated inputs per target in CI) and the
time-boxed fuzzer (``benchmarks/fuzz.py``, hundreds of thousands). Each :class:`Target` lays out
a small valid case in a folder (the seed), names the one file the mutated bytes replace, and
calls the public entry point on it; :func:`run_case` classifies what happened.
"""

from __future__ import annotations

import io
import json
import random
import signal
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["TARGETS", "Outcome", "Target", "mutate", "run_case"]

# Values that break size fields and offsets: zero, one, sign edges and "everything".
_INTERESTING_INTS = (
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    127,
    128,
    255,
    256,
    32767,
    32768,
    65535,
    65536,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**63 - 1,
)
# Bytes that matter to text formats: separators, quotes, line breaks, BOM, NUL, non-ASCII.
_TEXT_BYTES = (
    b",",
    b'"',
    b"\n",
    b"\r",
    b";",
    b"#",
    b"\x00",
    b"\xef\xbb\xbf",
    b"\xc3\xa9",
    b"\xff",
    b"{",
    b"[",
)
# Replacement values for JSON nodes: wrong types, empty containers, numbers out of range.
_JSON_VALUES: tuple[Any, ...] = (
    None,
    True,
    0,
    -1,
    1.5,
    10**30,
    "",
    "NA",
    "007",
    "x.png",
    "../x.png",
    "<image>",
    [],
    {},
    [None],
    ["a.png", 3],
    {"a": 1},
    "train",
    "Train",
)
_HEADER_BYTES = 512  # half of all offset choices fall here: headers hold the sizes and offsets


# --------------------------------------------------------------------------------------------------
# Mutators
# --------------------------------------------------------------------------------------------------


def _offset(buf: bytearray, rng: random.Random) -> int:
    limit = min(len(buf), _HEADER_BYTES) if rng.random() < 0.5 else len(buf)
    return rng.randrange(max(limit, 1))


def _flip_bit(buf: bytearray, rng: random.Random, pool: Sequence[bytes]) -> bytearray:
    if buf:
        buf[_offset(buf, rng)] ^= 1 << rng.randrange(8)
    return buf


def _set_int(buf: bytearray, rng: random.Random, pool: Sequence[bytes]) -> bytearray:
    width = rng.choice((1, 2, 4, 8))
    value = rng.choice(_INTERESTING_INTS) % (1 << (8 * width))
    at = _offset(buf, rng)
    buf[at : at + width] = value.to_bytes(width, rng.choice(("little", "big")))
    return buf


def _truncate(buf: bytearray, rng: random.Random, pool: Sequence[bytes]) -> bytearray:
    return buf[: rng.randrange(len(buf) + 1)]


def _delete(buf: bytearray, rng: random.Random, pool: Sequence[bytes]) -> bytearray:
    at = _offset(buf, rng)
    del buf[at : at + rng.randint(1, 64)]
    return buf


def _insert(buf: bytearray, rng: random.Random, pool: Sequence[bytes]) -> bytearray:
    chunk = rng.choice(_TEXT_BYTES) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 16))
    at = _offset(buf, rng)
    buf[at:at] = chunk
    return buf


def _duplicate(buf: bytearray, rng: random.Random, pool: Sequence[bytes]) -> bytearray:
    at = _offset(buf, rng)
    buf[at:at] = buf[at : at + rng.randint(1, 256)]
    return buf


def _splice(buf: bytearray, rng: random.Random, pool: Sequence[bytes]) -> bytearray:
    """Head of this input, tail of another seed (possibly another format): mismatched headers."""
    other = rng.choice(pool)
    return buf[: rng.randrange(len(buf) + 1)] + other[rng.randrange(len(other) + 1) :]


_BYTE_OPS: tuple[Callable[[bytearray, random.Random, Sequence[bytes]], bytearray], ...] = (
    _flip_bit,
    _set_int,
    _set_int,
    _truncate,
    _delete,
    _insert,
    _duplicate,
    _splice,
)


def _json_nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _json_nodes(child, (*path, key))


def _replace_node(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return value


def _mutate_json(data: bytes, rng: random.Random) -> bytes | None:
    """Replace one node of a JSON document (or one JSON line) by a value of the wrong type or range.

    Byte mutations almost never get past the JSON parser; this reaches the code that trusts the
    parsed structure. ``None`` when ``data`` is not JSON (then only byte mutations apply).
    """
    lines = data.decode("utf-8", errors="replace").splitlines()
    try:
        docs = [json.loads(line) for line in lines] if len(lines) > 1 else [json.loads(data)]
    except ValueError:
        return None
    which = rng.randrange(len(docs))
    path = rng.choice(list(_json_nodes(docs[which])))
    docs[which] = _replace_node(docs[which], path, rng.choice(_JSON_VALUES))
    text = "\n".join(json.dumps(d) for d in docs) if len(lines) > 1 else json.dumps(docs[0])
    return text.encode("utf-8")


def mutate(data: bytes, rng: random.Random, pool: Sequence[bytes] = ()) -> bytes:
    """One to four stacked mutations of ``data``; JSON inputs also get structure-aware ones."""
    if rng.random() < 0.4:
        structured = _mutate_json(data, rng)
        if structured is not None:
            return structured
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        buf = rng.choice(_BYTE_OPS)(buf, rng, pool or (data,))
    return bytes(buf)


# --------------------------------------------------------------------------------------------------
# Seed files
# --------------------------------------------------------------------------------------------------


def _gray(h: int, w: int, dtype: type) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * 37 % np.iinfo(dtype).max).astype(dtype)


def _pil_bytes(array: np.ndarray, fmt: str, **options: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _tiff_bytes(array: np.ndarray, **options: Any) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def _dicom_bytes(pixels: np.ndarray, frames: int = 1, **tags: Any) -> bytes:
    """A small Secondary Capture file with the tags the reader acts on (rescale, window, spacing)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CT", "MONOCHROME2", 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(pixels.dtype.kind == "i")
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _nifti_bytes(data: np.ndarray, zooms: tuple[float, float, float], slope: float = 1.0) -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms)
    image.header.set_xyzt_units("mm")
    image.header.set_slope_inter(slope, 0.0)
    return image.to_bytes()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _image_seeds() -> dict[str, list[bytes]]:
    gray8, gray16 = _gray(12, 16, np.uint8), _gray(12, 16, np.uint16)
    rgb = np.stack([gray8, gray8[::-1], 255 - gray8], axis=-1)
    volume = np.stack([_gray(8, 10, np.int16) * (k + 1) for k in range(3)])
    return {
        "png": [_pil_bytes(gray8, "PNG"), _pil_bytes(gray16, "PNG"), _pil_bytes(rgb, "PNG")],
        "jpeg": [_pil_bytes(rgb, "JPEG", quality=90), _pil_bytes(gray8, "JPEG")],
        "bmp": [_pil_bytes(gray8, "BMP"), _pil_bytes(rgb, "BMP")],
        "tiff": [
            _tiff_bytes(gray16, resolution=(10.0, 10.0), resolutionunit=3),
            _tiff_bytes(volume.astype(np.float32), imagej=True, metadata={"spacing": 2.0, "unit": "um"}),
            _tiff_bytes(rgb, photometric="rgb"),
        ],
        "dicom": [
            _dicom_bytes(
                gray16,
                RescaleSlope=2,
                RescaleIntercept=-1024,
                WindowCenter=40,
                WindowWidth=400,
                PixelSpacing=[0.5, 0.7],
            ),
            _dicom_bytes(volume, frames=3, SliceThickness=2.5, PhotometricInterpretation="MONOCHROME1"),
        ],
        "nifti": [
            _nifti_bytes(np.moveaxis(volume, 0, -1), (0.8, 0.9, 2.0), slope=0.5),
            _nifti_bytes(gray8[..., None].astype(np.float32), (1.0, 1.0, 1.0)),
        ],
        "npy": [_npy_bytes(gray8), _npy_bytes(volume.astype(np.float32)), _npy_bytes(rgb)],
        "npz": [_npz_bytes(image=gray16), _npz_bytes(arr_0=volume, other=gray8)],
    }


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One entry point under test: a seed case laid out in a folder and the file that gets fuzzed.

    ``setup(folder)`` writes the valid case and returns the file whose bytes are replaced;
    ``seeds`` are valid contents for that file; ``call(file)`` runs the public entry point;
    ``error`` is the one exception type it may raise, and its message must contain the file name.
    """

    name: str
    setup: Callable[[Path], Path]
    seeds: Callable[[], list[bytes]]
    call: Callable[[Path], object]
    error: type[Exception]


def _reader_call(file: Path) -> object:
    from medalign.data.readers import read_image

    image = read_image(file)
    if image.is_3d:  # the selector path: slices along the last axis, then a channel
        read_image(file, slice_index=0, slice_axis=2)
    if image.channels > 1:
        read_image(file, channel=image.channels - 1)
    return image


def _reader_target(fmt: str, suffix: str) -> Target:
    from medalign.data.readers import ImageReadError

    def setup(folder: Path) -> Path:
        return folder / f"case{suffix}"

    return Target(f"read_image:{fmt}", setup, lambda: _image_seeds()[fmt], _reader_call, ImageReadError)


_MANIFEST_ROWS = [
    {
        "case_id": "007",
        "patient_id": "p1",
        "split": "train",
        "image": "a.png",
        "mask": "m.png",
        "label": "NA",
        "text": 'small, round "lesion"',
        "time": "12.5",
        "event": "1",
        "attr:site": "é",
    },
    {
        "case_id": "008",
        "patient_id": "p1",
        "split": "test",
        "image": "b.png#channel=0",
        "mask": "",
        "label": "benign",
        "text": "",
        "time": "3",
        "event": "0",
        "attr:site": "",
    },
]
_SIDECAR = {
    "root": ".",
    "classes": {"label": ["NA", "benign"]},
    "text_only": False,
    "mask_threshold": None,
    "source": "fuzz",
    "description": "",
    "extra": {"k": [1, 2]},
}


def _manifest_folder(folder: Path) -> None:
    """Images the manifest rows reference, so validation decodes real files too."""
    (folder / "a.png").write_bytes(_pil_bytes(_gray(6, 6, np.uint8), "PNG"))
    (folder / "m.png").write_bytes(_pil_bytes((_gray(6, 6, np.uint8) > 100).astype(np.uint8) * 255, "PNG"))
    rgb = np.stack([_gray(6, 6, np.uint8)] * 3, axis=-1)
    (folder / "b.png").write_bytes(_pil_bytes(rgb, "PNG"))


def _manifest_bytes(suffix: str) -> bytes:
    table = pd.DataFrame(_MANIFEST_ROWS)
    buffer = io.BytesIO()
    if suffix == ".csv":
        table.to_csv(buffer, index=False)
    elif suffix == ".jsonl":
        table.to_json(buffer, orient="records", lines=True, force_ascii=False)
    else:
        table.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _manifest_call(manifest_file: Path) -> object:
    from medalign.data.manifest import read_manifest, summarize
    from medalign.data.validation import validate_manifest

    manifest = read_manifest(manifest_file)
    validate_manifest(manifest, workers=1)  # reports problems, never raises
    return summarize(manifest)


def _manifest_target(suffix: str) -> Target:
    from medalign.data.manifest import ManifestError

    def setup(folder: Path) -> Path:
        _manifest_folder(folder)
        return folder / f"manifest{suffix}"

    return Target(
        f"read_manifest:{suffix[1:]}", setup, lambda: [_manifest_bytes(suffix)], _manifest_call, ManifestError
    )


def _sidecar_target() -> Target:
    from medalign.data.manifest import ManifestError

    def setup(folder: Path) -> Path:
        _manifest_folder(folder)
        (folder / "manifest.csv").write_bytes(_manifest_bytes(".csv"))
        return folder / "manifest.meta.json"

    return Target(
        "read_manifest:sidecar",
        setup,
        lambda: [json.dumps(_SIDECAR).encode()],
        lambda file: _manifest_call(file.with_name("manifest.csv")),
        ManifestError,
    )


def _xlsx_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_excel(buffer, index=False)
    return buffer.getvalue()


def _lvit_setup(folder: Path) -> Path:
    split = folder / "Train_Folder"
    for sub in ("img", "labelcol"):
        (split / sub).mkdir(parents=True, exist_ok=True)
        for name in ("a1.png", "a2.png"):
            (split / sub / name).write_bytes(_pil_bytes(_gray(4, 4, np.uint8), "PNG"))
    return split / "Train_text.xlsx"


def _lvit_seeds() -> list[bytes]:
    frame = pd.DataFrame(
        {"Image": ["a1.png", "a2.png"], "Description": ["left lung", "007"], "Side": ["L", "NA"]}
    )
    return [_xlsx_bytes(frame)]


def _mmendocl_seeds() -> list[bytes]:
    table = pd.DataFrame(
        {
            "wli_path": ["imgs/1_5_1.png", "imgs/2_6_1.png"],
            "nbi_path": ["imgs/1_5_2.png", "imgs/2_6_2.png"],
            "label_path": ["masks/1_5.png", "masks/2_6.png"],
            "Grade": ["II", "007"],
        }
    )
    return [table.to_csv(index=False).encode()]


_LLAVA_RECORDS = [
    {
        "id": "r1",
        "image": "x/1.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A chest X-ray."},
        ],
    },
    {
        "id": "r2",
        "image": ["x/2.png", "x/3.png"],
        "conversations": [{"from": "user", "value": "Compare."}, {"from": "assistant", "value": "Same."}],
    },
    {"id": 3, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
]
_R2GEN = {
    "train": [
        {
            "id": "CXR1_IM-1",
            "report": "no acute findings.",
            "image_path": ["CXR1_IM-1/0.png", "CXR1_IM-1/1.png"],
            "split": "train",
        }
    ],
    "val": [{"id": "2", "report": "clear.", "image_path": ["CXR2_IM-2-1001.png"]}],
    "test": [{"id": "3", "report": "", "image_path": "a.png", "subject_id": "10", "study_id": 5}],
}


def _medmnist_seeds() -> list[bytes]:
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    return [
        _npz_bytes(
            train_images=images,
            train_labels=np.array([[0], [1], [2]]),
            test_images=images[:1],
            test_labels=np.array([[1]]),
        ),
        _npz_bytes(train_images=images[..., None].repeat(3, -1), train_labels=np.eye(3, dtype=np.uint8)),
    ]


def _importer_target(
    label: str, importer: str, setup: Callable[[Path], Path], seeds: Callable[[], list[bytes]]
) -> Target:
    from medalign.data.importers import load_dataset
    from medalign.data.importers.registry import DatasetImportError

    def call(file: Path) -> object:
        src = file.parents[1] if importer == "lvit" else file.parent  # lvit's xlsx sits in a split folder
        # medmnist writes its images next to the output manifest; the fuzz run has none, so a folder
        return load_dataset(importer, src, **({"extract_dir": "extracted"} if importer == "medmnist" else {}))

    return Target(label, setup, seeds, call, DatasetImportError)


def _fixed_name(name: str) -> Callable[[Path], Path]:
    return lambda folder: folder / name


def _targets() -> dict[str, Target]:
    readers = [
        ("png", ".png"),
        ("jpeg", ".jpg"),
        ("bmp", ".bmp"),
        ("tiff", ".tif"),
        ("dicom", ".dcm"),
        ("nifti", ".nii"),
        ("npy", ".npy"),
        ("npz", ".npz"),
    ]
    targets = [_reader_target(fmt, suffix) for fmt, suffix in readers]
    targets += [_manifest_target(suffix) for suffix in (".csv", ".jsonl", ".parquet")]
    targets.append(_sidecar_target())
    targets += [
        _importer_target("import:lvit", "lvit", _lvit_setup, _lvit_seeds),
        _importer_target("import:mmendocl", "mmendocl", _fixed_name("Training.csv"), _mmendocl_seeds),
        _importer_target(
            "import:llava", "llava", _fixed_name("data.json"), lambda: [json.dumps(_LLAVA_RECORDS).encode()]
        ),
        _importer_target(
            "import:llava-jsonl",
            "llava",
            _fixed_name("data.jsonl"),
            lambda: ["\n".join(json.dumps(r) for r in _LLAVA_RECORDS).encode()],
        ),
        _importer_target(
            "import:r2gen", "r2gen", _fixed_name("annotation.json"), lambda: [json.dumps(_R2GEN).encode()]
        ),
        _importer_target("import:medmnist", "medmnist", _fixed_name("mnist.npz"), _medmnist_seeds),
    ]
    return {target.name: target for target in targets}


TARGETS: dict[str, Target] = _targets()


# --------------------------------------------------------------------------------------------------
# Running one input
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """``ok`` (a result), ``expected`` (the target's error, naming the file) or ``unexpected``.

    ``signature`` groups unexpected outcomes by exception type and the innermost frame of the
    traceback, so a fuzzer reports a bug once rather than once per input.
    """

    status: str
    detail: str = ""
    signature: str = ""


class _Timeout(Exception):
    """Raised by the alarm when one input runs too long (a hang, or a size field turned into a loop)."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise _Timeout(f"no result after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _signature(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    last = frames[-1] if frames else None
    where = f"{Path(last.filename).name}:{last.lineno} in {last.name}" if last else "?"
    return f"{type(err).__name__} at {where}"


def run_case(target: Target, file: Path, data: bytes, *, timeout: float = 20.0) -> Outcome:
    """Write ``data`` to ``file`` (inside a folder ``target.setup`` prepared) and run the target on it."""
    file.write_bytes(data)
    try:
        with _time_limit(timeout):
            target.call(file)
    except target.error as err:
        if file.name in str(err):
            return Outcome("expected", f"{type(err).__name__}: {err}")
        return Outcome(
            "unexpected",
            f"{type(err).__name__} without the file name: {err}",
            f"{type(err).__name__} without file name ({_signature(err)})",
        )
    except Exception as err:  # classifying every failure (including _Timeout) is the point
        detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        return Outcome("unexpected", detail, _signature(err))
    return Outcome("ok")
