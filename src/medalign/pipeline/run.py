"""From a recipe to a trained, evaluated bundle: the body of ``medalign train``, for every task.

One pipeline: checks and the run folder (:func:`prepare_run`), the recipe's model
(:func:`build_model`, started from ``model.init_from``), the task's
:class:`~medalign.tasks.base.TrainingPlan` (the task registered under ``config.task`` says what
the engine steps, on which split, and how the result is evaluated), then the engine, the
evaluation, ``metrics.json``, the bundle and the HTML report (:func:`fit_and_save`). Nothing
here names a task.

A run folder holds ``config.yaml`` (the resolved recipe), ``checkpoints/last.ckpt`` (while it
trains; a finished run drops it unless ``train.keep_checkpoints``), ``logs/metrics.csv``, ``tb/`` (TensorBoard), ``bundle/`` (the trained model) and
``metrics.json`` (evaluation on ``eval.split``, never used for any training decision).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.seed import seed_everything

from medalign.config import RunConfig, save_config, validate_ranges
from medalign.data.dataset import Collator, ManifestDataset
from medalign.data.manifest import Manifest
from medalign.data.run_manifest import load_run_manifest, modality_rows, subsample_train
from medalign.tasks.base import TrainingPlan, get_task

TRANSFERRED_FIELDS = ("vision", "text", "image_size")


def tower_input(config: Any) -> tuple[int, list[float], list[float]]:
    """Channels and per-channel ``(mean, std)`` of ONE vision-tower input of a model config.

    That is ``in_channels`` and its statistics, except for a late-fusion dual encoder
    (``image_modalities`` M > 1), whose input stacks M tower inputs: one modality's share
    (the first modality's statistics).
    """
    groups = getattr(config, "image_modalities", 1)
    channels = config.in_channels // groups
    mean, std = config.image_stats()
    return channels, mean[:channels], std[:channels]


def build_model(config: RunConfig, echo: Callable[..., Any] = print) -> Any:
    """The recipe's model: ``model.name`` with its overrides, started from ``model.init_from`` if set.

    ``init_from`` names a bundle. A bundle of the same kind (alignment -> alignment,
    segmentation -> segmentation, ...) loads into the new model by weight name: a differing
    shape is an error, and so is a partial load (weights of the model the bundle lacks, or
    weights of the bundle the model has no place for, both listed) unless the recipe says
    ``model.init_from_partial: true``; a half-loaded model must not train silently. A bundle
    of another kind hands over its towers: this is how the curriculum chains Stage I (MAE) ->
    Stage II (alignment) -> Stage III (heads), and how an aligned or pretrained encoder starts a
    ``clip_decoder`` or ``unet_pretrained`` (NextGen-UIA's path). The new model takes the source's
    tower architectures and input description
    (``TRANSFERRED_FIELDS`` its config has, and the channels and statistics of one tower input,
    ``tower_input``, repeated for each modality a late-fusion dual encoder stacks: the weights
    only fit the architecture they were trained in, and the preprocessing they were trained
    with), then loads the source's
    ``vision`` and, when both have one, ``text`` tower weights strictly; ``model.overrides``
    set everything else. A pairing with no tower in common is a ValueError.
    """
    from medalign.bundle import load_bundle
    from medalign.models import DualEncoder, create_model
    from medalign.models.adapters import apply_adapters

    name, overrides, init_from = config.model.name, config.model.overrides, config.model.init_from
    source = load_bundle(init_from) if init_from else None
    model = create_model(name, **overrides)
    if source is not None:
        if source.bundle_kind == model.bundle_kind:
            loaded = load_matching_weights(
                model, source.state_dict(), init_from, name, partial=config.model.init_from_partial
            )
            if loaded.missing or loaded.unexpected:
                echo(loaded.describe())
        else:
            model = _from_towers(source, model, name, overrides, init_from)
    if config.model.adapters:
        if not isinstance(model, DualEncoder):
            raise ValueError(f"model.adapters apply to alignment models (dual encoders), not {name!r}")
        model = apply_adapters(model, config.model.adapters)
    return model


def _from_towers(source: Any, model: Any, name: str, overrides: dict[str, Any], init_from: str) -> Any:
    """``name`` rebuilt on ``source``'s towers and input description, tower weights copied."""
    import dataclasses

    from medalign.models import create_model

    towers = [t for t in ("vision", "text") if _tower(source, t) is not None and _tower(model, t) is not None]
    if "vision" not in towers:
        raise ValueError(
            f"init_from '{init_from}' is a {source.bundle_kind} bundle, which cannot initialise {name!r} "
            f"({model.bundle_kind}): they share no vision tower. A bundle of another kind can start "
            "any model with a `vision` tower (alignment, unet_pretrained, clip_decoder, clinical, report, MAE)"
        )
    portable = source.portable_config()
    target_fields = {f.name for f in dataclasses.fields(model.config)}
    inherited: dict[str, Any] = {}
    for key in TRANSFERRED_FIELDS:
        if key in target_fields and hasattr(portable, key) and (key not in ("vision", "text") or key in towers):
            inherited[key] = getattr(portable, key)
    if hasattr(portable, "image_stats") and "in_channels" in target_fields:
        channels, mean, std = tower_input(portable)
        groups = getattr(model.config, "image_modalities", 1)  # the target's own, from its overrides
        inherited["in_channels"] = channels * groups
        if {"image_mean", "image_std"} <= target_fields:
            inherited["image_mean"], inherited["image_std"] = mean * groups, std * groups
    model = create_model(name, **{**overrides, **inherited})
    for tower in towers:
        try:
            _tower(model, tower).load_state_dict(_tower(source, tower).state_dict(), strict=True)
        except RuntimeError as err:  # adapters on the source, or an architecture the target changed
            raise ValueError(f"init_from '{init_from}': its {tower} tower does not fit {name!r}: {err}") from err
    return model


def _tower(model: Any, name: str) -> Any:
    from medalign.models.towers import ImageTower, TextTower

    tower = getattr(model, name, None)
    return tower if isinstance(tower, (ImageTower, TextTower)) else None


@dataclass(frozen=True)
class PartialLoad:
    """What an ``init_from`` load left out: model weights the bundle lacks, bundle weights unused."""

    init_from: str
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

    def describe(self, shown: int = 8) -> str:
        def names(keys: tuple[str, ...]) -> str:
            more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
            return ", ".join(keys[:shown]) + more if keys else "none"

        return (
            f"init_from '{self.init_from}' loads partially: {len(self.missing)} weights of the model are "
            f"not in the bundle (they keep their fresh initialisation: {names(self.missing)}); "
            f"{len(self.unexpected)} weights of the bundle have no place in the model "
            f"({names(self.unexpected)})"
        )


def load_matching_weights(
    model: Any, weights: dict[str, Any], init_from: str, name: str, *, partial: bool = False
) -> PartialLoad:
    """Load a same-kind bundle's weights by name; a shape mismatch, no match at all, or (unless
    ``partial``) any missing or unexpected key is a ValueError that lists them."""
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # same name, different shape
        raise ValueError(f"init_from '{init_from}': its weights do not fit model {name!r}: {err}") from err
    if len(result.unexpected_keys) == len(weights):
        raise ValueError(f"init_from '{init_from}': none of its weights fit model {name!r}")
    loaded = PartialLoad(init_from, tuple(result.missing_keys), tuple(result.unexpected_keys))
    if (loaded.missing or loaded.unexpected) and not partial:
        raise ValueError(
            f"{loaded.describe()}. Fix the recipe's model to match the bundle, or set "
            "model.init_from_partial: true to accept the partial load"
        )
    return loaded


def run_training(config: RunConfig, *, resume: bool = False, echo: Any = print) -> Path:
    """Train ``config.task`` end to end: run folder, manifest, model, the task's plan, engine, bundle."""
    task = get_task(config.task)
    out, manifest = prepare_run(config)
    model = build_model(config, echo)
    task.check_model(model, config)
    plan = task.plan(config, manifest, model, out, echo)
    return fit_and_save(config, out, model, plan, resume=resume, echo=echo)


def prepare_run(config: RunConfig) -> tuple[Path, Manifest]:
    """Checks, the run folder with its resolved config, the seed, and the manifest."""
    validate_ranges(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    seed_everything(config.train.seed, verbose=False)  # model initialisation is part of the run's randomness
    manifest = load_run_manifest(config, out)
    if config.data.modality_rows:
        manifest = modality_rows(manifest, config.data.modalities or manifest.image_columns)
    if config.data.train_fraction < 1:
        manifest = subsample_train(manifest, config.data.train_fraction, config.train.seed)
    return out, manifest


def training_source(config: RunConfig, dataset: ManifestDataset) -> Any:
    """The train split as the recipe asks to read it: ``dataset`` itself, or the same from shards."""
    if not config.data.shards:
        return dataset
    from medalign.data.shards import ShardDataset

    shards = ShardDataset.like(
        dataset,
        config.data.shards,
        "train",
        seed=config.train.seed,
        buffer=config.data.shard_buffer,
        resample=config.data.resample,
    )
    if shards.total != len(dataset):
        raise ValueError(
            f"data.shards '{config.data.shards}' holds {shards.total} train samples but the manifest's "
            f"train split has {len(dataset)}: shard the manifest the run reads (medalign data shard)"
        )
    return shards


def fit_and_save(
    config: RunConfig, out: Path, model: Any, plan: TrainingPlan, *, resume: bool, echo: Any
) -> Path:
    """Train ``plan`` through the engine, then (on rank 0) evaluate, write metrics.json and the bundle.

    ``plan.collate`` batches the samples (default: ``Collator`` tokenising ``text`` for the model).
    """
    from medalign.bundle import save_bundle
    from medalign.reporting.html_report import write_html_report
    from medalign.training.engine import Engine

    engine = Engine(config.train, config.optim, out)
    if resume and not engine.checkpoint_path.is_file() and (out / "bundle").is_dir() and (out / "metrics.json").is_file():
        raise ValueError(
            f"run '{out}' has finished and kept no checkpoint to resume (set train.keep_checkpoints: true "
            f"to keep it); to train further, start a new run with model.init_from: {out / 'bundle'}"
        )
    start = time.perf_counter()
    dataset = plan.dataset
    state = engine.fit(
        plan.step,
        training_source(config, dataset),
        plan.collate or Collator(model.tokenizer, max_length=config.data.text_max_length),
        batch_size=plan.batch_size or config.data.batch_size,
        num_workers=config.data.num_workers,
        drop_last=config.data.drop_last,
        resume=resume,
    )
    seconds = time.perf_counter() - start
    engine.close()
    if engine.fabric.global_rank != 0:
        return out
    model.cpu().float().eval()
    metrics = plan.evaluate(model)
    metrics["train"] = {"steps": state.step, "seconds": round(seconds, 1), "final": state.history[-1:]}
    from medalign.evaluation.metrics import without_rows

    extra = {
        "metrics": without_rows(metrics),
        "recipe": str(config.out),
        # what a Predictor must repeat to see images as training did
        "preprocess": {"normalisation": config.data.normalisation},
    }
    save_bundle(model, out / "bundle", extra=extra, inputs=training_inputs(config, model, dataset, plan.separate_images))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n", encoding="utf-8")
    report = write_html_report(out)  # after metrics.json: it reads every file the run wrote
    if not config.train.keep_checkpoints:
        engine.drop_checkpoints()  # finished: the bundle and metrics are the result
    echo(f"trained {state.step} steps in {seconds:.0f}s; bundle: {out / 'bundle'}; report: {report}")
    return out


def training_inputs(config: RunConfig, model: Any, dataset: ManifestDataset, separate_images: bool = False) -> Any:
    """The bundle's input record: the columns, channels and preprocessing the train split was read with."""
    from medalign.bundle.inputs import spec_for_training

    rows = None
    if config.data.modality_rows:
        table = dataset.manifest.table
        seen = config.data.modalities or list(dict.fromkeys(table.get("attr:modality", [])))
        rows = [c if c.startswith("image") else f"image:{c}" for c in seen]
    size = dataset.config.preprocess.size
    return spec_for_training(
        config.task,
        model,
        list(dataset.image_keys),
        channels=int(dataset.config.channels or model.config.in_channels),
        image_size=int(size[0]) if size else getattr(model.config, "image_size", None),
        normalisation=config.data.normalisation,
        modality_rows=rows,
        separate_images=separate_images,
    )


