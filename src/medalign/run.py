"""From a recipe to a trained, evaluated bundle: the body of ``medalign train``.

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
from medalign.data.dataset import Collator, ManifestDataset, dataset_for_model
from medalign.data.manifest import Manifest, read_manifest
from medalign.progress import progress


def manifest_file(config: RunConfig, out: Path) -> Path | None:
    """Where a run's manifest lives: ``data.manifest``, or the phantom generated into the run folder."""
    if config.data.manifest:
        return Path(config.data.manifest)
    if config.data.phantom is None:
        return None
    name = "manifest.csv" if config.data.phantom.manifest == "cases" else "prompts.csv"
    return out / "data" / "phantom" / name


def load_run_manifest(config: RunConfig, out: Path) -> Manifest:
    """The run's manifest, generating the phantom into the run folder when the recipe asks for it."""
    path = manifest_file(config, out)
    assert path is not None  # validate_ranges requires data.manifest or data.phantom
    if not config.data.manifest:
        from medalign.data.phantom import PhantomConfig, generate_phantom

        source = config.data.phantom
        generate_phantom(path.parent, PhantomConfig(n=source.n, seed=source.seed, size=source.size))
    return read_manifest(path)


def texts_from_labels(manifest: Manifest, templates: str, label: str) -> Manifest:
    """Fill empty text cells from the label with a prompt template (for datasets without reports).

    The template of each case is fixed by its case_id, so runs are reproducible.
    """
    import zlib

    from medalign.zeroshot import build_class_prompts, load_templates, resolve_classes

    spec = load_templates(templates)
    classes = manifest.classes(label)
    prompts = build_class_prompts(spec["templates"], resolve_classes(spec, classes))
    by_class = dict(zip(classes, prompts, strict=True))
    table = manifest.table.copy()
    if "text" not in table.columns:
        table["text"] = ""
    for row, (case_id, value) in enumerate(zip(table["case_id"], table[label], strict=True)):
        if table.at[row, "text"] == "" and value in by_class:
            options = by_class[value]
            table.at[row, "text"] = options[zlib.crc32(case_id.encode()) % len(options)]
    return Manifest(table, manifest.base_dir, manifest.meta)


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


def modality_rows(manifest: Manifest, columns: list[str]) -> Manifest:
    """One row per (case, modality) with the image in a single ``image`` column.

    The case keeps its ``patient_id``, split, text and labels, so patient-level splits still
    hold; ``case_id`` becomes ``<case>/<modality>`` and ``attr:modality`` names the source
    column. A case without an image in a column has no row for it (nothing to learn from).
    """
    import pandas as pd

    table = manifest.table
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"data.modalities {missing} are not columns of the manifest ({manifest.image_columns})")
    keep = [c for c in table.columns if c not in manifest.image_columns]
    parts = []
    for column in columns:
        part = table.loc[table[column] != "", keep].copy()
        part["image"] = table.loc[table[column] != "", column]
        part["case_id"] = part["case_id"] + "/" + column.split(":", 1)[-1]
        part["attr:modality"] = column.split(":", 1)[-1]
        parts.append(part)
    rows = pd.concat(parts).sort_index(kind="stable").reset_index(drop=True)
    return Manifest(rows, manifest.base_dir, manifest.meta)


def image_columns(config: RunConfig, manifest: Manifest) -> list[str]:
    """The recipe's modalities (stacked as channels when several), else the first image column."""
    if config.data.modality_rows:
        return ["image"]
    if config.data.modalities:
        missing = [m for m in config.data.modalities if m not in manifest.image_columns]
        if missing:
            raise ValueError(
                f"data.modalities {missing} are not columns of the manifest ({manifest.image_columns})"
            )
        return list(config.data.modalities)
    if not manifest.image_columns:
        raise ValueError("the manifest has no image column")
    return manifest.image_columns[:1]


def run_training(config: RunConfig, *, resume: bool = False, echo: Any = print) -> Path:
    """Dispatch on ``config.task``."""
    if config.task == "segment":
        return run_segmentation(config, resume=resume, echo=echo)
    if config.task == "fuse":
        return run_fusion(config, resume=resume, echo=echo)
    if config.task == "pretrain":
        from medalign.tasks.pretrain import run_pretrain

        return run_pretrain(config, resume=resume, echo=echo)
    if config.task == "clinical":
        from medalign.tasks.clinical import run_clinical

        return run_clinical(config, resume=resume, echo=echo)
    if config.task == "report":
        from medalign.tasks.report import run_report

        return run_report(config, resume=resume, echo=echo)
    if config.task == "instruct":
        from medalign.tasks.instruct import run_instruct

        return run_instruct(config, resume=resume, echo=echo)
    return run_alignment(config, resume=resume, echo=echo)


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


def subsample_train(manifest: Manifest, fraction: float, seed: int) -> Manifest:
    """Keep ``fraction`` of the train split's patients (at least one); other splits untouched.

    Patients are ranked by a seeded hash of their id, so subsets are nested (10% inside 50%)
    and independent of row order; a patient's rows stay together.
    """
    import hashlib
    import math

    table = manifest.table
    if "split" not in table.columns:
        raise ValueError("data.train_fraction needs a manifest with a 'split' column")
    train = table["split"] == "train"
    patients = sorted(
        set(table.loc[train, "patient_id"]),
        key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest(),
    )
    keep = set(patients[: max(1, math.ceil(fraction * len(patients)))])
    return manifest.subset(~train | table["patient_id"].isin(keep))


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
    config: RunConfig,
    out: Path,
    model: Any,
    task: Any,
    dataset: ManifestDataset,
    evaluate: Callable[[Any], dict[str, Any]],
    *,
    resume: bool,
    echo: Any,
    collate: Callable[[list[Any]], dict[str, Any]] | None = None,
    batch_size: int | None = None,
) -> Path:
    """Train through the engine, then (on rank 0) evaluate, write metrics.json and the bundle.

    ``collate`` batches the samples (default: ``Collator`` tokenising ``text`` for the model);
    ``batch_size`` counts the dataset's items per batch (default ``data.batch_size``; a dataset
    whose items are groups of samples gives fewer).
    """
    from medalign.bundle import save_bundle
    from medalign.engine import Engine
    from medalign.html_report import write_html_report

    engine = Engine(config.train, config.optim, out)
    if resume and not engine.checkpoint_path.is_file() and (out / "bundle").is_dir() and (out / "metrics.json").is_file():
        raise ValueError(
            f"run '{out}' has finished and kept no checkpoint to resume (set train.keep_checkpoints: true "
            f"to keep it); to train further, start a new run with model.init_from: {out / 'bundle'}"
        )
    start = time.perf_counter()
    state = engine.fit(
        task,
        training_source(config, dataset),
        collate or Collator(model.tokenizer, max_length=config.data.text_max_length),
        batch_size=batch_size or config.data.batch_size,
        num_workers=config.data.num_workers,
        drop_last=config.data.drop_last,
        resume=resume,
    )
    seconds = time.perf_counter() - start
    engine.close()
    if engine.fabric.global_rank != 0:
        return out
    model.cpu().float().eval()
    metrics = evaluate(model)
    metrics["train"] = {"steps": state.step, "seconds": round(seconds, 1), "final": state.history[-1:]}
    from medalign.metrics import without_rows

    extra = {
        "metrics": without_rows(metrics),
        "recipe": str(config.out),
        # what a Predictor must repeat to see images as training did
        "preprocess": {"normalisation": config.data.normalisation},
    }
    save_bundle(model, out / "bundle", extra=extra, inputs=training_inputs(config, model, dataset))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n", encoding="utf-8")
    report = write_html_report(out)  # after metrics.json: it reads every file the run wrote
    if not config.train.keep_checkpoints:
        engine.drop_checkpoints()  # finished: the bundle and metrics are the result
    echo(f"trained {state.step} steps in {seconds:.0f}s; bundle: {out / 'bundle'}; report: {report}")
    return out


def training_inputs(config: RunConfig, model: Any, dataset: ManifestDataset) -> Any:
    """The bundle's input record: the columns, channels and preprocessing the train split was read with."""
    from medalign.inputs import spec_for_training

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
        separate_images=config.task == "instruct" and config.instruct.images == "separate",
    )


def run_alignment(config: RunConfig, *, resume: bool = False, echo: Any = print) -> Path:
    from medalign.tasks.align import AlignTask

    out, manifest = prepare_run(config)
    if config.data.text_from_labels:
        manifest = texts_from_labels(manifest, config.data.text_from_labels, config.data.label or "label")
    model = build_model(config, echo)
    image_keys = image_columns(config, manifest)
    if model.config.in_channels % len(image_keys):
        raise ValueError(
            f"model in_channels={model.config.in_channels} cannot hold {len(image_keys)} stacked modalities"
        )
    dataset = dataset_for_model(
        manifest, model, "train", config.data.label, image_keys, data=config.data, augment=True
    )
    task = AlignTask(model, config.loss, image_keys=image_keys)
    return fit_and_save(
        config,
        out,
        model,
        task,
        dataset,
        lambda m: evaluate_alignment(m, manifest, config, image_keys),
        resume=resume,
        echo=echo,
    )


def evaluate_alignment(
    model: Any, manifest: Manifest, config: RunConfig, image_keys: list[str]
) -> dict[str, Any]:
    """Zero-shot / retrieval / probe on ``eval.split`` as the recipe asks; each split embedded once."""
    from functools import cache

    from medalign import evaluate as ev

    ev_cfg = config.eval

    @cache
    def embed(split: str, label: str | None) -> ev.SplitEmbeddings:
        label = label if label in manifest.table.columns else None
        dataset = dataset_for_model(manifest, model, split, label, image_keys, data=config.data)
        return ev.embed_split(model, dataset)

    results: dict[str, Any] = {"split": ev_cfg.split}
    if ev_cfg.zeroshot:
        results["zeroshot"] = ev.zero_shot(model, embed(ev_cfg.split, ev_cfg.zeroshot_label), ev_cfg.zeroshot)
    if ev_cfg.retrieval:
        test = embed(ev_cfg.split, ev_cfg.zeroshot_label if ev_cfg.zeroshot else None)
        if test.text is not None:
            results["retrieval"] = {**ev.retrieval(test), "examples": ev.retrieval_examples(test)}
    if ev_cfg.probe:
        label = ev_cfg.probe_label
        results["probe"] = ev.probe(embed("train", label), embed("val", label), embed(ev_cfg.split, label))
    return results


def segmentation_dataset(
    config: RunConfig, manifest: Manifest, model: Any, image_keys: list[str], split: str, augment: bool
) -> ManifestDataset:
    return dataset_for_model(
        manifest, model, split, None, image_keys, mask=config.data.mask, data=config.data, augment=augment
    )


def run_segmentation(config: RunConfig, *, resume: bool = False, echo: Any = print) -> Path:
    from medalign.tasks.segment import SegmentTask, is_prompt_guided, prompt_training_data

    out, manifest = prepare_run(config)
    model = build_model(config, echo)
    image_keys = image_columns(config, manifest)
    assert config.data.mask is not None  # validate_ranges checked it
    dataset = segmentation_dataset(config, manifest, model, image_keys, "train", augment=True)
    task = SegmentTask(model, config.seg_loss, image_keys, config.data.mask)
    collate = Collator(model.tokenizer, max_length=config.data.text_max_length)
    source, batch_size = dataset, config.data.batch_size
    if is_prompt_guided(model):
        if config.data.shards and config.data.prompts != type(config.data.prompts)():
            raise ValueError("data.prompts (grouped prompts, negatives, dropout) cannot read data.shards")
        source, collate, batch_size = prompt_training_data(
            dataset, config.data.prompts, config.data.mask, collate, config.data.batch_size
        )
    return fit_and_save(
        config,
        out,
        model,
        task,
        source,
        lambda m: evaluate_segmentation(m, manifest, config, image_keys, config.eval.split),
        resume=resume,
        echo=echo,
        collate=collate,
        batch_size=batch_size,
    )


def evaluate_segmentation(
    model: Any, manifest: Manifest, config: RunConfig, image_keys: list[str], split: str
) -> dict[str, Any]:
    """Per-image Dice/IoU (LViT/C2FVL protocol), pooled Dice, HD95, NSD on one split.

    A prompt-guided model is also evaluated with every row's prompt replaced by another
    image's (``shuffled``) and by the empty prompt (``empty``); ``prompt_ablation`` holds the
    three side by side (``true`` repeats the top-level numbers, which are the true prompt's).
    """
    import torch

    from medalign.metrics import SegmentationMetrics, without_rows
    from medalign.tasks.segment import (
        PROMPT_VARIANTS,
        is_prompt_guided,
        predict_probabilities,
        prompt_variant,
    )

    dataset = segmentation_dataset(config, manifest, model, image_keys, split, augment=False)
    variants = PROMPT_VARIANTS if is_prompt_guided(model) else PROMPT_VARIANTS[:1]
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        loader = torch.utils.data.DataLoader(
            prompt_variant(dataset, variant),
            batch_size=config.data.eval_batch_size,
            collate_fn=Collator(model.tokenizer, max_length=config.data.text_max_length),
        )
        metrics = SegmentationMetrics()
        label = split if variant == "true" else f"{split}, {variant} prompts"
        for batch in progress(loader, desc=f"evaluate {label}"):
            metrics.update(
                predict_probabilities(model, batch, image_keys),
                batch[config.data.mask][:, 0].numpy(),
                batch["case_id"],
            )
        results[variant] = metrics.aggregate()
    out: dict[str, Any] = {"split": split, **results["true"]}
    if len(results) > 1:
        keep = ("dice", "iou", "pooled_dice", "n_images")
        out["prompt_ablation"] = {v: {k: without_rows(r)[k] for k in keep} for v, r in results.items()}
    return out


def fusion_columns(config: RunConfig, manifest: Manifest, model: Any) -> list[str]:
    """The image columns of a fusion model, position by position with ``model.config.modalities``.

    ``data.modalities`` when the recipe names them, else ``image:<name>`` for every modality name.
    """
    names = list(model.config.modalities)
    if config.data.modalities:
        keys = image_columns(config, manifest)
    else:
        keys = [f"image:{name}" for name in names]
        missing = [k for k in keys if k not in manifest.image_columns]
        if missing:
            raise ValueError(
                f"the model's modalities {names} need columns {missing}, which the manifest lacks "
                f"({manifest.image_columns}); set data.modalities to the columns to use, in model order"
            )
    if len(keys) != len(names):
        raise ValueError(f"data.modalities {keys} must list one column per model modality {names}, in order")
    return keys


def per_modality_data(config: RunConfig, model: Any) -> Any:
    """The recipe's data section for models that take each modality as its own input of one
    tower (MAE, clinical): ``in_channels`` channels per modality, not the stacked total."""
    import dataclasses

    return dataclasses.replace(config.data, channels=config.data.channels or model.config.in_channels)


def check_num_classes(dataset: ManifestDataset, num_classes: int, label: str | None) -> None:
    """A classification head must have one output per class of the label column."""
    if len(dataset.classes) != num_classes:
        raise ValueError(
            f"column {label!r} has {len(dataset.classes)} classes {dataset.classes}; "
            f"set model.overrides.num_classes to {len(dataset.classes)}"
        )


def fusion_dataset(
    config: RunConfig, manifest: Manifest, model: Any, image_keys: list[str], split: str, augment: bool
) -> ManifestDataset:
    """Masks for a segmentation head, labels for a classification head; every modality of each case."""
    segment = model.config.task_head == "segment"
    return dataset_for_model(
        manifest,
        model,
        split,
        None if segment else config.data.label,
        image_keys,
        mask=config.data.mask if segment else None,
        data=config.data,
        augment=augment,
    )


def run_fusion(config: RunConfig, *, resume: bool = False, echo: Any = print) -> Path:
    """``task: fuse``: a fusion model (``medalign.models.fusion``) through the one engine."""
    from medalign.models.fusion import FusionModel
    from medalign.tasks.fuse import FuseTask

    out, manifest = prepare_run(config)
    model = build_model(config, echo)
    if not isinstance(model, FusionModel):
        raise ValueError(
            f"task fuse needs a fusion model (fuse_adf, fuse_moe, ...), not {config.model.name!r}"
        )
    image_keys = fusion_columns(config, manifest, model)
    dataset = fusion_dataset(config, manifest, model, image_keys, "train", augment=True)
    if model.config.task_head == "classify":
        check_num_classes(dataset, model.num_classes, config.data.label)
    task = FuseTask(
        model, config.fuse_loss, config.seg_loss, image_keys, config.data.mask, config.data.label or "label"
    )
    return fit_and_save(
        config,
        out,
        model,
        task,
        dataset,
        lambda m: evaluate_fusion(m, manifest, config, image_keys, config.eval.split),
        resume=resume,
        echo=echo,
    )


def modality_subsets(names: list[str]) -> list[tuple[int, ...]]:
    """Every non-empty subset of modality indices: singles first, the full set last."""
    import itertools

    return [s for r in range(1, len(names) + 1) for s in itertools.combinations(range(len(names)), r)]


def evaluate_fusion(
    model: Any, manifest: Manifest, config: RunConfig, image_keys: list[str], split: str
) -> dict[str, Any]:
    """The metric for every non-empty subset of modalities, keyed like ``"a"``, ``"b"``, ``"a+b"``.

    Each subset hides the other modalities from the model (``present`` False), so one trained
    model answers "how good is it with only these scans". A case is scored on a subset when it
    has at least one of the subset's modalities. Segmentation: per-image Dice/IoU, pooled Dice,
    HD95, NSD (``SegmentationMetrics``); classification: ACC, balanced ACC, macro-F1, AUC
    (``classification_metrics``; cases without a label are left out and counted). The top
    level repeats the full set's metrics (with per-case rows) so the run reads like any other.
    """
    import numpy as np
    import torch

    from medalign.metrics import SegmentationMetrics, classification_metrics, without_rows
    from medalign.tasks.fuse import predict

    names = list(model.config.modalities)
    segment = model.config.task_head == "segment"
    dataset = fusion_dataset(config, manifest, model, image_keys, split, augment=False)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.data.eval_batch_size,
        collate_fn=Collator(model.tokenizer, max_length=config.data.text_max_length),
    )
    subsets = modality_subsets(names)
    keys = ["+".join(names[i] for i in s) for s in subsets]
    seg = {k: SegmentationMetrics() for k in keys}
    scores: dict[str, list[Any]] = {k: [] for k in keys}
    labels: dict[str, list[Any]] = {k: [] for k in keys}
    unlabelled = 0
    for batch in progress(loader, desc=f"evaluate {split}"):
        available = batch["modalities_present"].bool()
        if not segment:
            unlabelled += int((batch["label"] < 0).sum())
        for subset, key in zip(subsets, keys, strict=True):
            chosen = torch.zeros(len(names), dtype=torch.bool)
            chosen[list(subset)] = True
            present = available & chosen
            rows = present.any(dim=1) if segment else present.any(dim=1) & (batch["label"] >= 0)
            if not rows.any():
                continue
            output = predict(model, batch, image_keys, present)[rows].cpu().numpy()
            if segment:
                ids = [c for c, keep in zip(batch["case_id"], rows.tolist(), strict=True) if keep]
                seg[key].update(output, batch[config.data.mask][rows][:, 0].numpy(), ids)
            else:
                scores[key].append(output)
                labels[key].append(batch["label"][rows].numpy())

    results: dict[str, Any] = {"split": split, "modalities": names, "subsets": {}}
    for key in keys:
        if segment:
            metrics = seg[key].aggregate() if len(seg[key]) else None
        elif scores[key]:
            metrics = classification_metrics(
                np.concatenate(labels[key]),
                np.concatenate(scores[key]),
                dataset.classes,
                scores_are="probabilities",
            )
        else:
            metrics = None
        if metrics is None:
            results["subsets"][key] = {"n_images": 0}
            continue
        results["subsets"][key] = without_rows(metrics)
        if key == keys[-1]:
            results.update(metrics)
    if not segment:
        results["n_unlabelled"] = unlabelled
    return results
