"""What a bundle's model takes as input, recorded in the bundle and checked wherever images enter.

A model trained on modalities *a* and *b* stacked as two channels gives a confident, wrong
answer when one image is repeated into both channels. So every bundle records its inputs
(``config.json`` key ``inputs``) and every entry point (the Predictor, ``predict``, ``eval``,
ONNX export, the web demo) arranges what the user gave through :meth:`InputSpec.arrange`,
which either returns ``{modality: image}`` in model order or raises :class:`InputError` with one
line naming what the bundle needs and how to pass it.

Layouts (how the modalities reach the model):

* ``single``: one image (one manifest column), ``channels`` channels;
* ``stacked``: every modality's image, in order, concatenated as channels of one input
  (early fusion; ``channels`` per modality);
* ``modalities``: one input per modality (fusion and clinical models); a subset may be given only
  where the model was trained for missing modalities (``missing_allowed``);
* ``any``: one image of any of the modalities at a time (trained on one row per modality,
  ``data.modality_rows``, or on the modalities as separate views);
* ``unrecorded``: a single-input model whose layout nothing tells (an old bundle with several
  channels and no run config beside it, or a 2- or 4+-channel model saved without a record): a
  ``channels``-channel image, or ``{modality: image}`` stacked in the given order; nothing is
  repeated into channels.

``convert_channels`` is training's channel rule for each modality image
(:func:`medalign.data.dataset.match_channels`: grey repeated to ``channels``, RGB averaged to
grey, RGBA to RGB). It applies within one modality, never across modalities.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Layout = Literal["single", "stacked", "modalities", "any", "unrecorded"]
LAYOUTS: tuple[str, ...] = ("single", "stacked", "modalities", "any", "unrecorded")
SINGLE_NAME = "image"  # the modality name of an unnamed `image` column
ANY_MODALITY = "*"  # the key a bare image gets under the `any` layout


class InputError(ValueError):
    """Images that do not fit what the bundle takes; the message says what it needs and how to pass it."""


def modality_name(column: str) -> str:
    """``image:a`` -> ``a``; ``image`` -> ``image``."""
    return column.split(":", 1)[1] if column.startswith("image:") else column


def column_name(modality: str) -> str:
    """``a`` -> ``image:a``; ``image`` -> ``image``."""
    return modality if modality == SINGLE_NAME else f"image:{modality}"


@dataclass(frozen=True)
class InputSpec:
    """The inputs of a bundle's model (see the module docstring for the layouts)."""

    layout: Layout
    modalities: tuple[str, ...]
    channels: int  # channels of each modality image as the model sees it
    columns: tuple[str, ...] = ()  # the manifest columns it was trained on, same order
    convert_channels: bool = True
    missing_allowed: bool = False
    image_size: int | None = None
    normalisation: str = "dtype"
    # "recorded" (written at training), "run config" / "model config" (inferred for an old bundle)
    source: str = "recorded"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown input layout {self.layout!r}; known: {list(LAYOUTS)}")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"input modalities must be distinct names, got {list(self.modalities)}")
        if self.channels < 1:
            raise ValueError(f"channels per modality must be >= 1, got {self.channels}")
        if not self.columns:
            object.__setattr__(self, "columns", tuple(column_name(m) for m in self.modalities))

    # -- record -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record.update(modalities=list(self.modalities), columns=list(self.columns))
        record.pop("source")
        record["description"] = self.describe()
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], source: str = "recorded") -> InputSpec:
        fields = {f.name for f in dataclasses.fields(cls)} - {"source"}
        values = {k: v for k, v in record.items() if k in fields}
        values["modalities"] = tuple(str(m) for m in values.get("modalities", ()))
        values["columns"] = tuple(str(c) for c in values.get("columns", ()))
        return cls(**values, source=source)

    # -- words ------------------------------------------------------------------------------------

    @property
    def total_channels(self) -> int:
        return self.channels * len(self.modalities) if self.layout == "stacked" else self.channels

    def describe(self) -> str:
        """One phrase: what the model takes, e.g. ``modalities a + b stacked as 2 channels (1 each)``."""
        names = " + ".join(self.modalities)
        each = f"{self.channels} channel{'s' if self.channels > 1 else ''}"
        rule = f", {self._rule()}" if self.convert_channels else ""
        if self.layout == "single":
            return f"one image ({self.columns[0]}) with {each}{rule}"
        if self.layout == "stacked":
            return f"modalities {names} stacked as {self.total_channels} channels ({each} each{rule})"
        if self.layout == "modalities":
            optional = "; any may be missing" if self.missing_allowed else "; all required"
            return f"modalities {names}, one image each ({each}{rule}{optional})"
        if self.layout == "any":
            return f"one image of any of the modalities {', '.join(self.modalities)} at a time ({each}{rule})"
        return (
            f"{each} per case, layout not recorded: one {self.channels}-channel image, or "
            "{modality: image} stacked as channels in the given order"
        )

    def _rule(self) -> str:
        if self.channels == 1:
            return "colour averaged to grey"
        return f"grey repeated to {self.channels}"

    def how_to_pass(self) -> str:
        """How to give every modality: the CLI, a manifest and the Python API."""
        names = self.modalities
        if self.layout in ("single", "any", "unrecorded") or len(names) == 1:
            return "pass one image file per case (or one image in Python)"
        cli = " ".join(f"--image {m}=FILE" for m in names)
        python = "{" + ", ".join(f"'{m}': image" for m in names) + "}"
        return f"pass {cli} on the command line, a manifest with columns {', '.join(self.columns)}, or {python} in Python"

    def _error(self, problem: str) -> InputError:
        how = self.how_to_pass()
        return InputError(f"this bundle takes {self.describe()}; {problem}. {how[0].upper()}{how[1:]}")

    # -- checking ---------------------------------------------------------------------------------

    def arrange(self, images: Any) -> dict[str, Any]:
        """What the user gave -> ``{modality: image (or list of images)}`` in model order.

        A bare image (path, array, tensor or a list of them) counts as one modality. Raises
        :class:`InputError` for missing or extra modalities; under ``any`` a bare image is keyed
        :data:`ANY_MODALITY`, and under ``unrecorded`` a dict keeps its order.
        """
        if not isinstance(images, Mapping):
            return self._bare(images)
        given = [str(k) for k in images]
        if not given and self.layout not in ("stacked", "modalities"):
            raise self._error("no image was given")
        if self.layout == "unrecorded":
            return {str(k): v for k, v in images.items()}
        aliases = {SINGLE_NAME: self.modalities[0]} if len(self.modalities) == 1 else {}
        named = {aliases.get(k, k): v for k, v in zip(given, images.values(), strict=True)}
        extra = [k for k in named if k not in self.modalities]
        if extra:
            raise self._error(f"{_list(extra)} {'is not one' if len(extra) == 1 else 'are not'} of its modalities")
        if self.layout == "any":
            if len(named) > 1:
                raise self._error(f"{_list(list(named))} were given together; give one image at a time")
            return named
        missing = [m for m in self.modalities if m not in named]
        if missing and (not named or not (self.layout == "modalities" and self.missing_allowed)):
            raise self._error(f"{_list(missing)} {'is' if len(missing) == 1 else 'are'} missing")
        return {m: named[m] for m in self.modalities if m in named}

    def _bare(self, images: Any) -> dict[str, Any]:
        if self.layout == "any":
            return {ANY_MODALITY: images}
        if len(self.modalities) == 1 or self.layout == "unrecorded":
            return {self.modalities[0]: images}
        raise self._error("one image was given without naming its modality")

    def columns_for(self, available: Sequence[str], chosen: Sequence[str] | None = None) -> list[str]:
        """The manifest columns to read for this bundle, in model order.

        ``chosen`` (``--modality COL ...``) maps columns onto the modalities position by
        position; otherwise the recorded columns must all be in ``available``.
        """
        if chosen:
            wanted = 1 if self.layout == "single" else len(self.modalities)
            if self.layout not in ("any", "unrecorded") and len(chosen) != wanted:
                raise self._error(
                    f"{len(chosen)} column(s) {list(chosen)} were chosen for {wanted} modalit"
                    f"{'y' if wanted == 1 else 'ies'}; name one column per modality, in this order: "
                    f"{', '.join(self.modalities)}"
                )
            missing = [c for c in chosen if c not in available]
            if missing:
                raise InputError(f"the manifest has no column(s) {missing}; its image columns: {list(available)}")
            return list(chosen)
        columns = list(self.columns)
        missing = [c for c in columns if c not in available]
        if missing:
            one_image = self.layout in ("single", "unrecorded")
            if one_image and available and (len(available) == 1 or self.columns == (SINGLE_NAME,)):
                return list(available[:1])  # the one (or, column name unrecorded, the first) image column
            raise self._error(
                f"the manifest lacks column(s) {missing} (it has {list(available)}); "
                "choose columns with --modality COL, one per modality in order"
            )
        return columns


def _list(names: Sequence[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


# -- the record of a trained model ----------------------------------------------------------------


def spec_for_training(
    task: str,
    model: Any,
    columns: Sequence[str],
    *,
    channels: int,
    image_size: int | None,
    normalisation: str,
    modality_rows: Sequence[str] | None = None,
    separate_images: bool = False,
) -> InputSpec:
    """The record of what a run trained on: its task, image columns and per-modality channels.

    ``modality_rows``: the columns a ``data.modality_rows`` run turned into rows (its dataset
    reads one ``image`` column); ``separate_images``: each column is its own input of one tower
    (MAE views, instruct ``images: separate``).
    """
    common = {"channels": channels, "image_size": image_size, "normalisation": normalisation}
    multi_input = getattr(model, "bundle_kind", None) in ("fusion", "clinical")
    if multi_input:
        names = tuple(str(m) for m in model.config.modalities)
        missing = float(getattr(model.config, "modality_dropout", 0.0) or 0.0) > 0
        return InputSpec("modalities", names, columns=tuple(columns), missing_allowed=missing, **common)
    if modality_rows:
        return InputSpec("any", tuple(modality_name(c) for c in modality_rows), columns=tuple(modality_rows), **common)
    names = tuple(modality_name(c) for c in columns)
    if len(columns) == 1:
        return InputSpec("single", names, columns=tuple(columns), **common)
    layout: Layout = "any" if separate_images or task == "pretrain" else "stacked"
    return InputSpec(layout, names, columns=tuple(columns), **common)


def spec_for_model(model: Any, normalisation: str = "dtype") -> InputSpec:
    """What a model saved outside ``medalign train`` takes, from its own config.

    Multi-input models name their modalities; a one- or three-channel model takes one image
    under training's channel rule, as :func:`medalign.data.dataset.dataset_for_model` reads one
    image column by default; other channel counts are stacked modalities of unknown names
    (``unrecorded``). ``medalign train`` records the real layout instead.
    """
    config = model.config
    size = getattr(config, "image_size", None)
    if getattr(model, "bundle_kind", None) in ("fusion", "clinical"):
        return spec_for_training("", model, [], channels=_per_modality(config), image_size=size, normalisation=normalisation)
    channels = int(getattr(config, "in_channels", 1) or 1)
    if channels in (1, 3):  # grey, or colour (grey repeated to RGB, as the training default does)
        return InputSpec("single", (SINGLE_NAME,), channels, image_size=size, normalisation=normalisation)
    # 2 or 4+ channels are no image format: stacked modalities whose names the model does not know
    return InputSpec("unrecorded", (SINGLE_NAME,), channels, convert_channels=False, image_size=size,
                     normalisation=normalisation)  # fmt: skip


def legacy_spec(model: Any, normalisation: str = "dtype") -> InputSpec:
    """An old bundle (no record, no run config beside it): what its model config safely tells.

    Multi-input models name their modalities and a one-channel tower takes one grey image; a
    several-channel tower may have learnt one colour image or stacked modalities, so it gets
    ``unrecorded``: an image with exactly its channels, or named images stacked in the given order.
    """
    spec = spec_for_model(model, normalisation)
    if spec.layout == "single" and spec.channels > 1:
        spec = dataclasses.replace(spec, layout="unrecorded", convert_channels=False)
    return dataclasses.replace(spec, source="model config")


def _per_modality(config: Any) -> int:
    return int(getattr(config, "channels_per_modality", None) or getattr(config, "in_channels", 1) or 1)


def spec_from_bundle(payload: Mapping[str, Any], model: Any, directory: str | os.PathLike | None = None) -> InputSpec:
    """The bundle's recorded inputs; for an old bundle, what its run's config or its model config tells."""
    normalisation = str((payload.get("preprocess") or {}).get("normalisation") or "dtype")
    if isinstance(payload.get("inputs"), Mapping):
        return InputSpec.from_dict(payload["inputs"])
    if getattr(model, "bundle_kind", None) not in ("fusion", "clinical") and directory is not None:
        from_run = _spec_from_run_folder(Path(directory), model, normalisation)
        if from_run is not None:
            return from_run
    return legacy_spec(model, normalisation)


def _spec_from_run_folder(directory: Path, model: Any, normalisation: str) -> InputSpec | None:
    """An old bundle still inside its run folder: the run's ``config.yaml`` names its columns."""
    recipe = directory.parent / "config.yaml"
    if directory.name != "bundle" or not recipe.is_file():
        return None
    from medalign.config import ConfigError, load_config

    try:
        config = load_config(recipe)
    except (ConfigError, OSError):
        return None
    data = config.data
    channels = int(model.config.in_channels)
    if data.modality_rows:
        rows = list(data.modalities or [])
        if not rows:
            return None
        per = data.channels or channels
        spec = spec_for_training(config.task, model, ["image"], channels=per, image_size=model.config.image_size,
                                 normalisation=normalisation, modality_rows=rows)  # fmt: skip
    elif data.modalities:
        columns = list(data.modalities)
        separate = config.task == "pretrain" or (config.task == "instruct" and config.instruct.images == "separate")
        per = data.channels or (channels if separate else channels // len(columns))
        spec = spec_for_training(config.task, model, columns, channels=per, image_size=model.config.image_size,
                                 normalisation=normalisation, separate_images=separate)  # fmt: skip
    else:  # one column (the manifest's first image column): one image, training's channel rule
        spec = InputSpec("single", (SINGLE_NAME,), data.channels or channels, image_size=model.config.image_size,
                         normalisation=normalisation)  # fmt: skip
    return dataclasses.replace(spec, source="run config")


def input_spec(model: Any) -> InputSpec:
    """A model's inputs: the record its bundle carried (:func:`medalign.bundle.load_bundle` sets it),
    else what its own config says (a model built in memory)."""
    spec = getattr(model, "bundle_inputs", None)
    return spec if isinstance(spec, InputSpec) else spec_for_model(model)


def parse_image_options(values: Sequence[str]) -> dict[str, str] | list[str]:
    """``--image`` values: ``NAME=FILE`` pairs (in order) or plain files, never a mix.

    A value whose whole text is an existing file is a plain file even if it holds ``=``.
    """
    named: dict[str, str] = {}
    plain: list[str] = []
    for value in values:
        name, sep, path = str(value).partition("=")
        if sep and name and path and name.replace("_", "").replace("-", "").isalnum() and not Path(value).exists():
            if name in named:
                raise InputError(f"--image {name}= is given twice")
            named[name] = path
        else:
            plain.append(str(value))
    if named and plain:
        raise InputError(f"name every --image (NAME=FILE) or none; unnamed: {plain}")
    return named or plain
