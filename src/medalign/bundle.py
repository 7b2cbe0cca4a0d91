"""Model bundles: a folder that holds everything needed to use a trained model offline.

``config.json`` (architecture, inputs and preprocessing (``inputs``: :mod:`medalign.inputs`),
provenance), ``model.safetensors`` (weights,
no pickle), ``tokenizer/`` (the text tokenizer's own files) and, when known, ``metrics.json``.
A tower that came from a pretrained source is stored by its full architecture config, so
loading never needs that source (or the network) again.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

BUNDLE_FORMAT = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class BundleError(ValueError):
    """A folder is not a usable bundle; the message names the folder and what is wrong."""


# Bundle kind -> "module:function" building the model from its stored config dict. A model class
# names its kind in ``bundle_kind``; adding a kind is one line here, and only the module a
# bundle needs is imported when it loads.
BUILDERS: dict[str, str] = {
    "DualEncoder": "medalign.models.dual_encoder:build_dual_encoder",
    "segmentation": "medalign.models.segmentation:build_segmentation_model",
    "fusion": "medalign.models.fusion:build_fusion_model",
    "pretrain": "medalign.models.mae:build_mae_model",
    "clinical": "medalign.models.heads:build_clinical_model",
    "report": "medalign.models.report:build_report_model",
    "instruct": "medalign.models.instruct:build_instruct_model",
}


def _builder(kind: Any) -> Any:
    import importlib

    if kind not in BUILDERS:
        return None
    module, function = BUILDERS[kind].split(":")
    import medalign.models  # noqa: F401  (registers every architecture)

    return getattr(importlib.import_module(module), function)


def _kind(model: Any) -> str:
    kind = getattr(model, "bundle_kind", None)
    if not isinstance(kind, str):
        raise BundleError(f"{type(model).__name__} has no bundle_kind; it cannot be saved as a bundle")
    return kind


def save_bundle(
    model: Any, directory: str | os.PathLike, *, extra: dict[str, Any] | None = None, inputs: Any = None
) -> Path:
    """Write a model as a self-contained bundle.

    ``inputs`` (a :class:`medalign.inputs.InputSpec`) records the modalities, their order and
    channel layout and the preprocessing the model was trained with; ``medalign train`` passes
    it. Without it the model's own config is recorded (one image for a single-input model;
    several channels are then never filled by repeating one image).
    """
    from medalign import __version__
    from medalign.inputs import spec_for_model

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.portable_config().to_dict()
    if config.get("text"):
        config["text"]["tokenizer"] = None  # set to the bundle's own tokenizer folder at load time
    state = _unshared({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    normalisation = ((extra or {}).get("preprocess") or {}).get("normalisation") or "dtype"
    spec = inputs if inputs is not None else spec_for_model(model, normalisation)
    payload = {
        "format": BUNDLE_FORMAT,
        "kind": _kind(model),
        "medalign_version": __version__,
        "model": config,
        **(extra or {}),
        "inputs": spec.to_dict(),
        "preprocess": {**((extra or {}).get("preprocess") or {}), "normalisation": spec.normalisation},
    }
    (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # safetensors creates its file 0600; a bundle's files share one mode (the umask's, as config.json got)
    os.chmod(tmp / WEIGHTS_NAME, (tmp / CONFIG_NAME).stat().st_mode & 0o777)
    from medalign.model_card import write_model_card

    write_model_card(tmp, model, {**(extra or {}), "inputs": spec.to_dict()})  # what it is, trained on, scores, limits
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def _unshared(state: dict[str, Any]) -> dict[str, Any]:
    """Tied weights (an LM's input and output embeddings) as separate copies: safetensors refuses
    tensors that share memory, and loading writes the same values into both again."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        pointer = value.untyped_storage().data_ptr()
        out[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    return out


def read_bundle_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise BundleError(f"'{directory}' is not a medalign bundle: {CONFIG_NAME} is missing")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"cannot parse '{path}': {err}") from err
    if payload.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"'{path}': unsupported bundle format {payload.get('format')!r} (expected {BUNDLE_FORMAT})"
        )
    return payload


def is_pickle(path: Path) -> bool:
    """Whether a file is (or holds) a pickle, judged by its name *and* its bytes.

    A renamed pickle is as dangerous as one called ``.pt``: protocol 2-5 pickles start with
    ``0x80`` and the protocol byte, and ``torch.save`` writes a zip whose members include
    ``data.pkl``. Loading such a file can run arbitrary code, so the bundle is refused before
    anything in it is read.
    """
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with path.open("rb") as handle:
        head = handle.read(9)
    if _is_safetensors(head, path.stat().st_size):
        return False  # its 8-byte header length may well start with 0x80 0x02..0x05
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(".pkl") for name in archive.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: a little-endian u64 JSON header length, then the header's opening brace."""
    return len(head) == 9 and head[8:9] == b"{" and 8 < int.from_bytes(head[:8], "little") + 8 <= size


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and is_pickle(p)
    )
    if pickles:
        raise BundleError(
            f"refusing to load '{directory}': it contains pickle-based files {pickles}; "
            "bundles hold only JSON, safetensors and tokenizer files"
        )


def resolve_bundle(name_or_path: str | os.PathLike) -> Path:
    """A local folder, or a Hugging Face Hub repo id downloaded once into the local cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        raise BundleError(f"bundle '{text}' does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id=text, allow_patterns=["*.json", "*.safetensors", "tokenizer/*", "*.md"])
        )
    except Exception as err:  # offline, unknown repo, ...
        raise BundleError(
            f"'{text}' is neither a local bundle folder nor a reachable hub repo: {err}"
        ) from err


def load_bundle(name_or_path: str | os.PathLike) -> Any:
    """Load a bundle with no network access (unless given a hub id that is not cached yet)."""
    directory = resolve_bundle(name_or_path)
    _refuse_pickles(directory)
    payload = read_bundle_config(directory)
    model_config = payload["model"]
    if model_config.get("text"):
        model_config["text"]["tokenizer"] = str(directory / TOKENIZER_DIR)
    builder = _builder(payload.get("kind"))
    if builder is None:
        raise BundleError(f"'{directory}': unknown model kind {payload.get('kind')!r}")
    model = builder(model_config)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise BundleError(f"'{directory}' has no {WEIGHTS_NAME}")
    try:
        model.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as err:
        raise BundleError(f"'{weights}' does not match the architecture in {CONFIG_NAME}: {err}") from err
    model.eval()
    model.bundle_info = {k: v for k, v in payload.items() if k != "model"}
    from medalign.inputs import spec_from_bundle

    model.bundle_inputs = spec_from_bundle(payload, model, directory)  # recorded, or inferred for old bundles
    return model
