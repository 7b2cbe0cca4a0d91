"""``medalign predict masks`` / ``medalign predict classify``: a bundle over files and folders.

The single-image ``predict segment`` answers one question; these commands are what a user runs on
a folder of new cases. Cases come from one of three sources: files and folders (folders recursed,
``file.nii.gz#slice=N`` references; one image per case, for bundles that take one image), one case
named by modality (``--image a=FILE --image b=FILE``), or a manifest (``--manifest M``: one case per
row, the bundle's recorded columns or ``--modality COL ...``). What a case must hold is the
bundle's input record (:mod:`medalign.inputs`), checked before anything runs. Both commands run
the bundle through :class:`medalign.predict.Predictor` (training's own preprocessing), show a
progress bar with an ETA, and write ``results.csv`` plus ``results.json`` in the output folder: one
row per case, failures included, with the modalities each answer used (``inputs``). A file that cannot be read or
predicted is reported in its row (``status: error`` and the reason) and the run goes on, because
one corrupt scan must not cost the other thousand; the exit code is 1 when any input failed.

Masks keep the SOURCE geometry, so they overlay the images they came from in any viewer:

* PNG masks have the source's height and width (0/255); probability maps are 16-bit PNGs whose
  value / 65535 is the probability (the ``"dtype"`` scaling reads them back to [0, 1]).
* NIfTI masks of NIfTI inputs have the source's stored shape, affine and header (qform/sform,
  units); a 3D volume is segmented slice by slice along its first array axis (the file's last
  voxel axis) and written back as one 3D mask. A single slice (``ct.nii.gz#slice=40``) becomes a
  2D NIfTI of shape ``(X, Y, 1)`` whose affine places every pixel where it lies in the volume.
* NIfTI masks of other inputs carry the pixel spacing the reader found (DICOM, TIFF), no origin
  or direction (those formats' world geometry is not kept by the reader).

``--format same`` writes NIfTI for NIfTI inputs and for any 3D volume (PNG cannot hold one), PNG
otherwise. Output paths mirror the inputs: a folder's files keep their relative paths under
``OUT`` (one folder given) or under ``OUT/<folder name>/`` (several); files given directly go to
``OUT/<name>``. The lead registers the commands on ``predict_app``::

    predict_app.command("masks")(predict_masks)
    predict_app.command("classify")(predict_classes)
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from medalign.cli_grammar import fail
from medalign.data.readers import SUPPORTED_SUFFIXES, ImageData, parse_image_ref, read_image
from medalign.inputs import ANY_MODALITY, InputError, InputSpec, modality_name, parse_image_options

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MASK_COLUMNS = (
    "source",
    "inputs",
    "mask",
    "probabilities",
    "height",
    "width",
    "slices",
    "foreground_fraction",
    "mean_probability",
    "status",
    "error",
)


class MaskFormat(str, Enum):
    """File format of the written masks (``same``: NIfTI for NIfTI inputs and volumes, else PNG)."""

    png = "png"
    nifti = "nifti"
    same = "same"


class BatchInputError(ValueError):
    """The inputs as a whole are unusable (nothing found, two inputs writing the same output)."""


# -- inputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One case to predict: ``ref`` as the reader takes it, or ``named`` ``(modality, ref)`` pairs
    (``ref`` is then the case's name); its outputs go to ``OUT/<folder>/<stem>...`` (``folder``
    relative to OUT)."""

    ref: str
    folder: Path
    stem: str
    named: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return (self.folder / self.stem).as_posix().lower()

    @property
    def images(self) -> dict[str | None, str]:
        """``{modality: ref}``; the key None for one unnamed image."""
        return dict(self.named) if self.named else {None: self.ref}


def case_input(images: dict[str | None, Any]) -> Any:
    """What the Predictor takes for a case: the image itself when unnamed, else ``{modality: image}``."""
    return images.get(None, images)


def used_inputs(predictor: Any, item: InputFile) -> str:
    """The modalities an answer used, e.g. ``a+b`` (checked against the bundle's record)."""
    arranged = predictor.arrange(case_input(dict.fromkeys(item.images, "")))
    return "+".join(name if name != ANY_MODALITY else predictor.inputs.modalities[0] for name in arranged)


def named_case(images: dict[str, str]) -> InputFile:
    """One case from ``--image NAME=FILE`` options; outputs are named after its first file."""
    missing = [ref for ref in images.values() if not parse_image_ref(ref)[0].is_file()]
    if missing:
        raise BatchInputError(f"input '{missing[0]}' does not exist")
    first = parse_image_ref(next(iter(images.values())))
    stem = image_stem(first[0].name) + _selector_tag(first[1])
    return InputFile(" ".join(f"{k}={v}" for k, v in images.items()), Path(), stem, tuple(images.items()))


def manifest_cases(
    spec: InputSpec, path: str | os.PathLike, split: str | None, columns: Sequence[str] | None
) -> list[InputFile]:
    """One case per manifest row (of ``split``), its images from the bundle's columns (or ``columns``).

    An empty cell leaves that modality out of the case (the bundle then decides: an error row
    unless it was trained for missing modalities). Outputs are named after ``case_id``.
    """
    from medalign.data.manifest import read_manifest

    manifest = read_manifest(path)
    if split:
        manifest = manifest.split(split)
    if not len(manifest):
        raise BatchInputError(f"'{path}': no rows{f' in split {split!r}' if split else ''}")
    try:
        keys = spec.columns_for(manifest.image_columns, columns)
    except InputError as err:
        raise BatchInputError(f"'{path}': {err}") from None
    manifest.require_inside_root(keys)
    one_image = spec.layout == "single" or (spec.layout == "unrecorded" and len(keys) == 1)
    names: list[str | None] = [None] if one_image else [modality_name(k) for k in keys]
    cases = []
    for _, row in manifest.table.iterrows():
        pairs = [(n, str(manifest.resolve(row[k]))) for n, k in zip(names, keys, strict=True) if row[k] != ""]
        if spec.layout == "any":  # each modality's image is its own case
            cases += [InputFile(ref, Path(), f"{row['case_id']}_{n}") for n, ref in pairs]
        elif names == [None]:
            cases.append(InputFile(pairs[0][1] if pairs else "", Path(), str(row["case_id"])))
        else:
            named = tuple((str(n), ref) for n, ref in pairs)
            cases.append(InputFile(str(row["case_id"]), Path(), str(row["case_id"]), named))
    _check_unique(cases)
    return cases


def gather_cases(
    predictor: Any,
    inputs: Sequence[str | os.PathLike],
    images: Sequence[str] | None,
    manifest: Path | None,
    *,
    split: str | None = None,
    modality: Sequence[str] | None = None,
    exclude: Path | None = None,
) -> list[InputFile]:
    """The cases of one command from exactly one source, checked against the bundle's inputs first."""
    sources = [name for name, given in (("FILES", inputs), ("--image", images), ("--manifest", manifest)) if given]
    if len(sources) != 1:
        raise BatchInputError(
            "give the cases one way: image files or folders, --image NAME=FILE for one case, or --manifest M"
            + (f" (got {' and '.join(sources)})" if sources else "")
        )
    if modality and manifest is None:
        raise BatchInputError("--modality chooses manifest columns; use it with --manifest")
    if manifest is not None:
        cases = manifest_cases(predictor.inputs, manifest, split, modality)
    elif images:
        parsed = parse_image_options(images)
        named = parsed if isinstance(parsed, dict) else {predictor.inputs.modalities[0]: parsed[0]}
        if isinstance(parsed, list) and len(parsed) > 1:
            raise BatchInputError("one --image without a name is one case; name the modalities (--image a=FILE) or list files as arguments")
        cases = [named_case(named)]
    else:
        cases = collect_inputs(inputs, exclude=exclude)
    for item in {tuple(c.images) : c for c in cases}.values():  # each distinct set of modalities, once
        used_inputs(predictor, item)  # raises the bundle's one-line error naming what it needs
    return cases


def image_stem(name: str) -> str:
    """File name without its image suffix (``ct.nii.gz`` -> ``ct``)."""
    lower = name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _selector_tag(selectors: dict[str, int]) -> str:
    """``{"slice": 40}`` -> ``_slice40`` so that two slices of one volume get distinct outputs."""
    return "".join(f"_{key}{value}" for key, value in selectors.items())


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def collect_inputs(inputs: Sequence[str | os.PathLike], exclude: Path | None = None) -> list[InputFile]:
    """Files, folders (recursed, image suffixes only, sorted) and ``#selector`` references.

    ``exclude`` (the output folder) is skipped while recursing, so writing masks next to the
    images and running again does not predict on the masks. Raises :class:`BatchInputError`
    for a missing input, an empty result or two inputs that would write the same output.
    """
    if not inputs:
        raise BatchInputError("no inputs given: name image files or folders")
    exclude = exclude.resolve() if exclude is not None else None
    n_folders = sum(parse_image_ref(i)[0].is_dir() for i in inputs)
    found: list[InputFile] = []
    for item in inputs:
        path, selectors = parse_image_ref(item)
        if path.is_dir():
            prefix = Path(path.resolve().name) if n_folders > 1 else Path()
            files = sorted(p for p in path.rglob("*") if _is_image(p) and not _inside(p.resolve(), exclude))
            found += [
                InputFile(str(p), prefix / p.parent.relative_to(path), image_stem(p.name)) for p in files
            ]
        elif path.is_file():
            found.append(InputFile(str(item), Path(), image_stem(path.name) + _selector_tag(selectors)))
        else:
            raise BatchInputError(f"input '{item}' does not exist")
    if not found:
        raise BatchInputError(
            f"no image files ({', '.join(SUPPORTED_SUFFIXES)}) found in {', '.join(map(str, inputs))}"
        )
    _check_unique(found)
    return found


def _check_unique(found: Iterable[InputFile]) -> None:
    """Two inputs mapped onto one output (``a/x.png`` and ``a/x.jpg``) would overwrite each other."""
    seen: dict[str, str] = {}
    for item in found:
        if item.key in seen:
            raise BatchInputError(
                f"inputs '{seen[item.key]}' and '{item.ref}' would write the same output '{item.key}'; "
                "rename one or give them in different folders"
            )
        seen[item.key] = item.ref


def output_path(item: InputFile, out: Path, suffix: str, tag: str = "") -> Path:
    """``OUT/<folder>/<stem><tag><suffix>``."""
    return out / item.folder / f"{item.stem}{tag}{suffix}"


# -- geometry and writers ---------------------------------------------------------------------------


@dataclass
class Geometry:
    """Where a mask's pixels lie: the NIfTI ``affine``, the stored ``shape`` (NIfTI axis order)
    and the source ``header`` to copy (None: a fresh header from the affine)."""

    affine: np.ndarray
    shape: tuple[int, ...]
    header: Any = None


def nifti_geometry(image: ImageData, spatial_shape: tuple[int, ...]) -> Geometry:
    """The geometry of the mask of ``image`` (array order ``spatial_shape``), see the module doc."""
    nifti_shape = tuple(reversed(spatial_shape))
    if image.meta.get("format") != "nifti":
        spacing = list(reversed(image.spacing)) + [1.0] * (3 - len(image.spacing))
        return Geometry(np.diag([*spacing, 1.0]), nifti_shape if len(nifti_shape) == 3 else (*nifti_shape, 1))
    import nibabel as nib

    affine = np.asarray(image.meta["affine"], dtype=np.float64)
    if "slice_index" in image.meta:  # one slice of a volume: keep the in-plane axes, move the origin
        sliced = 2 - int(image.meta["slice_axis"])  # array axes (D, H, W) are NIfTI axes (Z, Y, X)
        kept = [a for a in range(3) if a != sliced]
        plane = np.eye(4)
        plane[:3, :3] = affine[:3, [*kept, sliced]]
        plane[:3, 3] = affine[:3, 3] + int(image.meta["slice_index"]) * affine[:3, sliced]
        return Geometry(plane, (*nifti_shape, 1))
    header = nib.load(image.meta["path"]).header  # lazy: reads the header only
    stored = tuple(int(n) for n in header.get_data_shape())
    shape = stored if math.prod(stored) == math.prod(nifti_shape) else nifti_shape
    return Geometry(affine, shape, header=header)


def write_nifti(values: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Array-order ``values`` ((H, W) or (D, H, W)) saved as NIfTI at ``geometry``."""
    import nibabel as nib

    data = np.ascontiguousarray(values.T).reshape(geometry.shape)
    header = geometry.header.copy() if geometry.header is not None else None
    image = nib.Nifti1Image(data, geometry.affine, header=header)
    image.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)  # the source's intensity scaling must not apply to a mask
    image.header["cal_min"], image.header["cal_max"] = 0, 0
    if header is None:
        image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def write_png(values: np.ndarray, path: Path) -> Path:
    """A bool mask as 0/255 8-bit PNG; a float probability map as 16-bit PNG (value / 65535)."""
    from PIL import Image

    if values.ndim != 2:
        raise ValueError(f"a PNG holds one 2D image, not shape {values.shape}; use --format nifti or same")
    if values.dtype == bool:
        pixels = values.astype(np.uint8) * 255
    else:
        pixels = np.round(np.clip(values, 0.0, 1.0) * 65535).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# -- running ----------------------------------------------------------------------------------------


def _progress(items: Sequence[Any], desc: str) -> Iterable[Any]:
    """The shared bar (count, rate, ETA on stderr; off where stderr is not a terminal), per image."""
    from medalign.progress import progress

    return progress(items, desc=desc, unit="image")


def load_predictor(model: Path, batch_size: int, device: str) -> Any:
    """The bundle as a Predictor on ``device`` (``auto``: CUDA when available)."""
    import torch

    from medalign.predict import Predictor

    predictor = Predictor.from_bundle(model, batch_size=batch_size)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor.model.to(device)
    return predictor


def _has_head(predictor: Any, task: str) -> bool:
    """Fusion bundles have one head (segment or classify); clinical ones classify with num_classes."""
    config = predictor.model.config
    if predictor.kind == "fusion":
        return config.task_head == task
    if predictor.kind == "clinical":
        return task == "classify" and bool(config.num_classes)
    return True


def read_case(item: InputFile) -> dict[str | None, ImageData]:
    """Every image of a case, read; its modalities must share one geometry (2D size or volume shape)."""
    images = {name: read_image(ref) for name, ref in item.images.items()}
    shapes = {name: image.array.shape[: 3 if image.is_3d else 2] for name, image in images.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the modalities of this case differ in size: {shapes}")
    return images


def segment_case(
    predictor: Any, images: dict[str | None, ImageData], text: str | None, overlap: float
) -> tuple[np.ndarray, bool]:
    """Probabilities in array order ((H, W), or (D, H, W) slice by slice) and whether it is a volume."""
    from medalign.data.transforms import to_channel_first  # MONAI: imported on use, not at CLI start

    first = next(iter(images.values()))
    if first.is_3d:
        planes = [
            case_input({name: to_channel_first(image.array[k]) for name, image in images.items()})
            for k in range(first.array.shape[0])
        ]
        maps = [predictor.segment(plane, text=text, overlap=overlap) for plane in planes]
        return np.stack(maps).astype(np.float32), True
    case = case_input({name: to_channel_first(image.array) for name, image in images.items()})
    return np.asarray(predictor.segment(case, text=text, overlap=overlap)), False


def mask_format(requested: MaskFormat, image: ImageData, volume: bool) -> str:
    if requested is MaskFormat.same:
        return "nifti" if volume or image.meta.get("format") == "nifti" else "png"
    return requested.value


def mask_row(
    item: InputFile,
    image: ImageData,
    probabilities: np.ndarray,
    volume: bool,
    out: Path,
    *,
    threshold: float,
    fmt: MaskFormat,
    keep_probabilities: bool,
    inputs: str = "",
) -> dict[str, Any]:
    """Write one case's mask (and probability map) and return its results row (``inputs``: the
    modalities used)."""
    mask = probabilities > threshold
    kind = mask_format(fmt, image, volume)
    suffix = ".nii.gz" if kind == "nifti" else ".png"
    mask_path = output_path(item, out, suffix)
    prob_path = output_path(item, out, suffix, tag="_prob") if keep_probabilities else None
    if kind == "nifti":
        geometry = nifti_geometry(image, mask.shape)
        write_nifti(mask.astype(np.uint8), geometry, mask_path)
        if prob_path is not None:
            write_nifti(probabilities.astype(np.float32), geometry, prob_path)
    else:
        write_png(mask, mask_path)
        if prob_path is not None:
            write_png(probabilities.astype(np.float32), prob_path)
    inside = probabilities[mask]
    return {
        "source": item.ref,
        "inputs": inputs,
        "mask": str(mask_path),
        "probabilities": str(prob_path) if prob_path else "",
        "height": int(mask.shape[-2]),
        "width": int(mask.shape[-1]),
        "slices": int(mask.shape[0]) if volume else 1,
        "foreground_fraction": float(mask.mean()),
        "mean_probability": float(inside.mean()) if inside.size else None,
        "status": "ok",
        "error": "",
    }


def error_row(ref: str, columns: Sequence[str], err: Exception) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(columns)
    row.update(source=ref, status="error", error=f"{type(err).__name__}: {err}")
    return row


def write_results(
    rows: list[dict[str, Any]], columns: Sequence[str], out: Path, settings: dict[str, Any]
) -> tuple[Path, Path]:
    """``results.csv`` (one row per input, failures included) and ``results.json`` (settings too)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / RESULTS_CSV, out / RESULTS_JSON
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    failed = [r for r in rows if r["status"] != "ok"]
    payload = {
        **settings,
        "n_inputs": len(rows),
        "n_ok": len(rows) - len(failed),
        "n_failed": len(failed),
        "results": rows,
        "errors": [{"source": r["source"], "error": r["error"]} for r in failed],
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return csv_path, json_path


def run_masks(
    model: Path,
    inputs: Sequence[str | os.PathLike],
    out: Path,
    *,
    images: Sequence[str] | None = None,
    manifest: Path | None = None,
    split: str | None = None,
    modality: Sequence[str] | None = None,
    text: str | None = None,
    threshold: float = 0.5,
    fmt: MaskFormat = MaskFormat.same,
    probabilities: bool = False,
    overlap: float = 0.25,
    device: str = "auto",
    progress: Callable[[Sequence[Any], str], Iterable[Any]] = _progress,
) -> list[dict[str, Any]]:
    """Segment every case, write masks and results; returns the rows (see :data:`MASK_COLUMNS`)."""
    if not 0.0 <= threshold <= 1.0:
        raise BatchInputError(f"threshold must be in [0, 1], got {threshold}")
    if not 0.0 <= overlap < 1.0:
        raise BatchInputError(f"overlap must be in [0, 1), got {overlap}")
    predictor = load_predictor(model, 1, device)  # one image at a time: sliding windows
    if predictor.kind not in ("segmentation", "fusion") or not _has_head(predictor, "segment"):
        raise BatchInputError(
            f"'{model}' is a {predictor.kind!r} bundle; `predict masks` needs a segmentation one"
        )
    files = gather_cases(predictor, inputs, images, manifest, split=split, modality=modality, exclude=out)
    rows = []
    for item in progress(files, "segment"):
        try:
            case = read_case(item)
            probs, volume = segment_case(predictor, case, text, overlap)
            rows.append(
                mask_row(
                    item,
                    next(iter(case.values())),
                    probs,
                    volume,
                    out,
                    threshold=threshold,
                    fmt=fmt,
                    keep_probabilities=probabilities,
                    inputs=used_inputs(predictor, item),
                )
            )
        except Exception as err:  # one bad case is reported in its row; the rest go on
            rows.append(error_row(item.ref, MASK_COLUMNS, err))
    settings = {
        "model": str(model),
        "bundle_inputs": predictor.inputs.describe(),
        "threshold": threshold,
        "format": fmt.value,
        "text": text,
        "overlap": overlap,
    }
    write_results(rows, MASK_COLUMNS, out, settings)
    return rows


def _classify_chunk(predictor: Any, cases: list[Any], labels: Any, templates: Any) -> list[Any]:
    """One batch of cases with the same modalities; on failure each case alone, so an error lands
    on its own row only."""
    try:
        if isinstance(cases[0], dict):
            batch: Any = {name: [case[name] for case in cases] for name in cases[0]}
        else:
            batch = cases
        return list(predictor.classify(batch, labels=labels, templates=templates))
    except Exception:  # retried one by one below to find the culprit
        results: list[Any] = []
        for case in cases:
            single = {k: [v] for k, v in case.items()} if isinstance(case, dict) else [case]
            try:
                results.append(predictor.classify(single, labels=labels, templates=templates)[0])
            except Exception as err:
                results.append(err)
        return results


def run_classes(
    model: Path,
    inputs: Sequence[str | os.PathLike],
    out: Path,
    *,
    images: Sequence[str] | None = None,
    manifest: Path | None = None,
    split: str | None = None,
    modality: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    templates: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
    progress: Callable[[Sequence[Any], str], Iterable[Any]] = _progress,
) -> list[dict[str, Any]]:
    """Classify every case; rows hold ``source``, ``inputs``, ``label`` (top), ``probability`` and ``p:<class>``."""
    from medalign.data.transforms import to_channel_first  # MONAI: imported on use, not at CLI start

    predictor = load_predictor(model, batch_size, device)
    if predictor.kind == "DualEncoder" and not labels and templates is None:
        raise BatchInputError("a zero-shot (DualEncoder) bundle needs --label names or --templates")
    if predictor.kind not in ("DualEncoder", "clinical", "fusion") or not _has_head(predictor, "classify"):
        raise BatchInputError(f"'{model}' is a {predictor.kind!r} bundle without a classifier")
    files = gather_cases(predictor, inputs, images, manifest, split=split, modality=modality, exclude=out)
    outcomes: dict[str, Any] = {}
    pending: list[tuple[str, Any]] = []

    def flush() -> None:
        results = _classify_chunk(
            predictor, [a for _, a in pending], list(labels) if labels else None, templates
        )
        outcomes.update(zip([r for r, _ in pending], results, strict=True))
        pending.clear()

    for item in progress(files, "classify"):
        try:
            case = read_case(item)
            if next(iter(case.values())).is_3d:
                raise ValueError("a 3D volume; select one slice, e.g. 'file.nii.gz#slice=10'")
            arrays = case_input({name: to_channel_first(image.array) for name, image in case.items()})
            if pending and _modalities_of(pending[-1][1]) != _modalities_of(arrays):
                flush()  # a batch holds cases with the same modalities
            pending.append((item.ref, arrays))
        except Exception as err:  # reported in the case's row
            outcomes[item.ref] = err
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    class_names = next((list(o) for o in outcomes.values() if isinstance(o, dict)), [])
    columns = ["source", "inputs", "label", "probability", *(f"p:{c}" for c in class_names), "status", "error"]
    rows = []
    for item in files:
        outcome = outcomes[item.ref]
        if isinstance(outcome, Exception):
            rows.append(error_row(item.ref, columns, outcome))
            continue
        top = max(outcome, key=outcome.get)
        row = {"source": item.ref, "inputs": used_inputs(predictor, item), "label": top,
               "probability": outcome[top], "status": "ok", "error": ""}  # fmt: skip
        rows.append(row | {f"p:{c}": p for c, p in outcome.items()})
    settings = {"model": str(model), "bundle_inputs": predictor.inputs.describe(), "classes": class_names,
                "templates": templates}  # fmt: skip
    write_results(rows, columns, out, settings)
    return rows


def _modalities_of(case: Any) -> tuple[str, ...]:
    return tuple(case) if isinstance(case, dict) else ()


# -- commands ---------------------------------------------------------------------------------------


def _finish(rows: list[dict[str, Any]], out: Path) -> None:
    failed = [r for r in rows if r["status"] != "ok"]
    typer.echo(
        f"wrote {out / RESULTS_CSV} and {out / RESULTS_JSON}: {len(rows) - len(failed)} ok, {len(failed)} failed"
    )
    for row in failed:
        typer.echo(f"failed: {row['source']}: {row['error']}", err=True)
    if failed:
        raise fail(f"{len(failed)} of {len(rows)} case(s) failed (listed above and in {out / RESULTS_CSV})")


def _user_error(err: Exception) -> typer.Exit:
    return fail(str(err))


ModelOption = Annotated[Path, typer.Option("--model", "-m", help="Bundle folder (a run's bundle/).")]
InputsArgument = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Image files, folders (searched recursively for image files) or 'vol.nii.gz#slice=N': one "
        "image per case (bundles that take one image).",
        show_default=False,
    ),
]
ImageOption = Annotated[
    list[str] | None,
    typer.Option(
        "--image",
        help="One case by modality: --image a=FILE --image b=FILE (the bundle's modalities; see its MODEL_CARD.md).",
    ),
]
ManifestOption = Annotated[
    Path | None, typer.Option("--manifest", help="Cases from a manifest, one per row, with the bundle's image columns.")
]
SplitOption = Annotated[str | None, typer.Option("--split", help="With --manifest: only this split.")]
ModalityOption = Annotated[
    list[str] | None,
    typer.Option("--modality", help="With --manifest: image column per modality, in the bundle's order (default: recorded)."),
]
OutOption = Annotated[
    Path, typer.Option("--out", "-o", help="Output folder (masks, results.csv, results.json).")
]
BatchOption = Annotated[int, typer.Option(min=1, help="Images per forward pass.")]
DeviceOption = Annotated[
    str, typer.Option(help="Torch device: auto (CUDA when available), cpu, cuda, cuda:1.")
]


def predict_masks(
    model: ModelOption,
    out: OutOption,
    inputs: InputsArgument = None,
    image: ImageOption = None,
    manifest: ManifestOption = None,
    split: SplitOption = None,
    modality: ModalityOption = None,
    text: Annotated[
        str | None, typer.Option(help="Prompt naming what to segment (text-guided models).")
    ] = None,
    threshold: Annotated[float, typer.Option(help="Foreground probability threshold.")] = 0.5,
    format: Annotated[
        MaskFormat,
        typer.Option(
            "--format",
            help="Mask files: png, nifti, or same (NIfTI for NIfTI inputs and 3D volumes, PNG otherwise).",
        ),
    ] = MaskFormat.same,
    probabilities: Annotated[
        bool,
        typer.Option(
            "--probabilities",
            help="Also write <name>_prob: float NIfTI, or 16-bit PNG where value / 65535 is the probability.",
        ),
    ] = False,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap, in [0, 1).")] = 0.25,
    device: DeviceOption = "auto",
) -> None:
    """Segment image files and folders (or cases by modality); masks keep the source geometry.

    Cases: FILES (one image each), --image a=FILE --image b=FILE (one case of
    a several-modality bundle) or --manifest M (one case per row). The bundle
    says what it needs; anything else is refused before a file is written.
    Each case gets a mask under OUT, mirroring its folder (manifest: named
    after case_id):

    * PNG: the source's height and width (0/255);
    * NIfTI: the source's shape, affine and header; 3D volumes are segmented
      slice by slice, and 'ct.nii.gz#slice=40' gives a 2D NIfTI placed where
      that slice lies in the volume.

    OUT/results.csv and OUT/results.json list per case: source, inputs
    (the modalities used), mask,
    probabilities, height, width, slices, foreground_fraction,
    mean_probability (inside the mask), status and error. A file that fails
    is listed with its error, the others are still written, and the exit
    code is 1.

    Examples:

        medalign predict masks --model runs/segment_kvasir/bundle \\
            new_frames/ --out preds/

        medalign predict masks -m runs/seg/bundle ct.nii.gz "mr.nii.gz#slice=12" \\
            --probabilities --out preds/

        medalign predict masks -m runs/lvit/bundle img1.png img2.png \\
            --text "the nuclei" --format png --threshold 0.4 --out preds/

        medalign predict masks -m quickstart_out/fuse/bundle \\
            --manifest quickstart_out/phantom/manifest.csv --split test -o preds/
    """
    try:
        rows = run_masks(
            model,
            inputs or [],
            out,
            images=image,
            manifest=manifest,
            split=split,
            modality=modality,
            text=text,
            threshold=threshold,
            fmt=format,
            probabilities=probabilities,
            overlap=overlap,
            device=device,
        )
    except ValueError as err:  # BatchInputError, PredictorError, BundleError: the message says what
        raise _user_error(err) from err
    _finish(rows, out)


def predict_classes(
    model: ModelOption,
    out: OutOption,
    inputs: InputsArgument = None,
    image: ImageOption = None,
    manifest: ManifestOption = None,
    split: SplitOption = None,
    modality: ModalityOption = None,
    labels: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            "-l",
            help="Class name (repeat per class). Zero-shot: prompted with the default templates; "
            "trained heads: renames the classes in order.",
        ),
    ] = None,
    templates: Annotated[
        str | None,
        typer.Option(
            help="Zero-shot template file or shipped name (e.g. busi); --label picks classes from it."
        ),
    ] = None,
    batch_size: BatchOption = 16,
    device: DeviceOption = "auto",
) -> None:
    """Classify image files and folders (or cases by modality): per-class probabilities and the top label.

    Cases come as in `predict masks`: FILES, --image a=FILE --image b=FILE,
    or --manifest M.

    Aligned (DualEncoder) bundles classify zero-shot from class names
    (--label, repeated) or a template file (--templates); clinical and fusion
    bundles with a classification head use it. OUT/results.csv and
    OUT/results.json hold per case: source, inputs, label (the most probable class),
    probability, p:<class> for every class, status and error. A file that
    fails is listed with its error, the others are still classified, and the
    exit code is 1.

    Examples:

        medalign predict classify --model runs/busi_align/bundle new/ \\
            --templates busi --out preds/

        medalign predict classify -m runs/align/bundle a.png b.png \\
            -l normal -l benign -l malignant -o preds/

        medalign predict classify -m quickstart_out/align/bundle \\
            --image a=scan_a.png --image b=scan_b.png --templates phantom_diagnosis -o preds/
    """
    try:
        rows = run_classes(
            model, inputs or [], out, images=image, manifest=manifest, split=split, modality=modality,
            labels=labels, templates=templates, batch_size=batch_size, device=device,
        )  # fmt: skip
    except ValueError as err:
        raise _user_error(err) from err
    _finish(rows, out)
