"""MedMNIST v2 (Yang et al. 2023) ``.npz`` releases: pathmnist.npz, chestmnist_224.npz, organmnist3d.npz, ...

Accepted input: ``src`` is the ``.npz`` file itself, or a folder holding it (``npz=<file name>``
picks one when there are several). The archive holds ``{train,val,test}_images`` and
``{train,val,test}_labels``; the release split is kept. Other keys are listed in
``meta.extra["ignored_keys"]``.

Why images are extracted: a manifest cell references one image, and the ``#slice=N`` selector
picks along axis 0 of a single array, but one ``.npz`` holds six arrays. So each image is written
once as a file under ``extract_dir``: by default ``<npz stem>/`` next to the output manifest (the
dataset folder is left as it is; a download folder is often read-only or shared), and the
manifest's root is that folder. A relative ``extract_dir`` is taken relative to the folder of the
``.npz``. 2D images (``N,H,W`` or ``N,H,W,3``) become PNG, 3D volumes (``N,D,H,W``) ``.npy``. A file
already there with the same bytes is not rewritten, so re-importing is cheap and keeps timestamps.
Files are named ``<split>_<index>`` with zero-padded indices, and ``case_id`` is
``<npz stem>_<split>_<index>``.

Labels: one column (``N`` or ``N,1``) -> ``label``, named ``classes[i]`` when ``classes`` is given
(else the integer as text; the declared class list is then ``0..max``). Several columns
(multi-label, e.g. ChestMNIST's 14 findings) -> one ``label:<name>`` column per finding with
0/1, ``<name>`` from ``classes`` or the column index.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medalign.data.importers.registry import DatasetImportError, register_importer
from medalign.data.manifest import SPLITS, ManifestMeta, new_table, relative_ref
from medalign.progress import progress


def _choose_npz(src: Path, npz: str | None) -> Path:
    if src.is_file():
        if src.suffix.lower() != ".npz":
            raise DatasetImportError(f"'{src}' is not a .npz file; pass the MedMNIST .npz or its folder")
        if npz is not None:
            raise DatasetImportError(f"npz={npz!r} picks a file in a folder, but '{src}' is already a file")
        return src
    if npz is not None:
        path = src / npz
        if not path.is_file():
            raise DatasetImportError(f"'{path}' does not exist")
        return path
    found = sorted(src.glob("*.npz"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise DatasetImportError(f"'{src}' holds {len(found)} .npz files ({names}); pass npz=<file name>")
    return found[0]


def _member(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """One array of the archive; members are decompressed only here, so damage surfaces here."""
    try:
        value = archive[key]
    except Exception as err:
        raise DatasetImportError(f"cannot read {key!r} from '{path}': {type(err).__name__}: {err}") from err
    if not isinstance(value, np.ndarray):  # a member not named *.npy comes back as raw bytes
        raise DatasetImportError(f"'{path}': {key!r} is not a .npy array")
    return value


def _encode(image: np.ndarray, where: str) -> tuple[bytes, str]:
    """(file bytes, suffix): PNG for 2D gray/RGB, npy for volumes (PNG cannot hold them)."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4)):
        if image.dtype != np.uint8:
            raise DatasetImportError(f"{where}: expected uint8 pixels, got {image.dtype}")
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue(), ".png"
    if image.ndim == 3:
        buffer = io.BytesIO()
        np.save(buffer, image, allow_pickle=False)
        return buffer.getvalue(), ".npy"
    raise DatasetImportError(f"{where}: cannot store an image of shape {image.shape}")


def _write_once(path: Path, data: bytes) -> None:
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _label_columns(labels: np.ndarray, classes: Sequence[str] | None, where: str) -> dict[str, list[str]]:
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise DatasetImportError(f"{where}: labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
    if labels.ndim == 1 or labels.shape[1] == 1:
        values = labels.reshape(-1)
        if classes is not None and values.size and (values.min() < 0 or values.max() >= len(classes)):
            raise DatasetImportError(
                f"{where}: labels span {values.min()}..{values.max()} but classes has {len(classes)} names"
            )
        return {"label": [classes[v] if classes is not None else str(v) for v in values.tolist()]}
    if classes is not None and len(classes) != labels.shape[1]:
        raise DatasetImportError(
            f"{where}: {labels.shape[1]} label columns but classes has {len(classes)} names"
        )
    if not np.isin(labels, (0, 1)).all():
        raise DatasetImportError(f"{where}: multi-label columns must be 0/1")
    names = (
        ["_".join(str(c).split()) for c in classes]
        if classes is not None
        else [str(k) for k in range(labels.shape[1])]
    )
    return {f"label:{name}": [str(v) for v in labels[:, k].tolist()] for k, name in enumerate(names)}


@register_importer(
    "medmnist",
    "MedMNIST .npz (the file or its folder; train/val/test images and labels), images extracted once to files",
    {
        "npz": "the .npz in the SRC folder, when it holds several",
        "extract_dir": "folder for the extracted images (default: <npz stem>/ next to the output manifest)",
        "classes": "names of the label indices (single-label) or of the label columns (multi-label)",
    },
)
def import_medmnist(
    src: Path,
    *,
    npz: str | None = None,
    extract_dir: str | None = None,
    classes: list[str] | None = None,
    manifest_dir: Path | None = None,
) -> tuple[pd.DataFrame, ManifestMeta]:
    """``manifest_dir`` (the output manifest's folder, from the registry) holds the default extract_dir."""
    src = Path(src)
    path = _choose_npz(src, npz)
    stem = path.stem
    if extract_dir is not None:
        out = Path(extract_dir) if Path(extract_dir).is_absolute() else path.parent / extract_dir
    elif manifest_dir is not None:
        out = Path(manifest_dir) / stem
    else:
        raise DatasetImportError(
            "medmnist writes the images out as files: give extract_dir, or an output manifest "
            "(medalign data import / import_dataset extract next to it)"
        )
    out = out.resolve()
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # zipfile raises BadZipFile, NotImplementedError, EOFError ... on damage
        raise DatasetImportError(f"cannot read '{path}': {type(err).__name__}: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetImportError(f"'{path}' holds a single .npy array, not an .npz archive")
    with archive:
        keys = set(archive.files)
        splits = [s for s in SPLITS if f"{s}_images" in keys]
        if not splits:
            raise DatasetImportError(
                f"'{path}' has none of train_images, val_images, test_images (keys: {sorted(keys)})"
            )
        out.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, str]] = []
        label_columns: list[str] = []
        max_label = -1
        for split in splits:
            if f"{split}_labels" not in keys:
                raise DatasetImportError(f"'{path}' has {split}_images but no {split}_labels")
            images, labels = (
                _member(archive, f"{split}_images", path),
                _member(archive, f"{split}_labels", path),
            )
            if len(images) != len(labels):
                raise DatasetImportError(
                    f"'{path}': {split}_images has {len(images)} entries but {split}_labels has {len(labels)}"
                )
            columns = _label_columns(labels, classes, f"'{path}' {split}_labels")
            if label_columns and list(columns) != label_columns:
                raise DatasetImportError(
                    f"'{path}': {split}_labels has a different shape than the other splits"
                )
            label_columns = list(columns)
            if "label" in columns and classes is None and len(labels):
                max_label = max(max_label, int(labels.max()))
            width = max(5, len(str(len(images) - 1)))
            for index, image in progress(
                enumerate(images), desc=f"extract {split}", unit="image", total=len(images)
            ):
                data, suffix = _encode(np.asarray(image), f"'{path}' {split}_images[{index}]")
                file = out / f"{split}_{index:0{width}d}{suffix}"
                _write_once(file, data)
                case_id = f"{stem}_{split}_{index:0{width}d}"
                row = {
                    "case_id": case_id,
                    "patient_id": case_id,
                    "split": split,
                    "image": relative_ref(file, out),
                }
                row |= {c: values[index] for c, values in columns.items()}
                rows.append(row)
        ignored = sorted(keys - {f"{s}_{kind}" for s in splits for kind in ("images", "labels")})
    if label_columns == ["label"]:
        declared = {"label": list(classes) if classes is not None else [str(k) for k in range(max_label + 1)]}
    else:
        declared = {c: ["0", "1"] for c in label_columns}
    meta = ManifestMeta(
        root=str(out),  # the extracted files, wherever they were written
        classes=declared,
        description=f"MedMNIST {path.name} ({len(rows)} images extracted to '{out}')",
        extra={
            "npz": str(path.resolve()),
            "extract_dir": str(out),
            "split_source": "npz keys",
            "ignored_keys": ignored,
        },
    )
    return new_table(rows), meta
