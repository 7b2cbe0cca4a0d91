"""The ``medalign`` command line: a thin layer over the library, one command per job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from medalign.cli_grammar import fail

app = typer.Typer(
    name="medalign",
    help="Multi-modal medical image analysis with contrastive learning. Add --debug to any command "
    "to see a traceback instead of a one-line error; `medalign COMMAND --help` shows an example of "
    "each command.\n\nExample (the whole path on the built-in phantom, CPU-friendly):\n\n"
    "    medalign quickstart --out /tmp/qs",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Import, validate, split and inspect datasets (manifests).\n\nExample:\n\n"
    "    medalign data import busi ~/data/busi -o data/busi.csv",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
eval_app = typer.Typer(
    help="Evaluate a trained bundle on a manifest split.\n\nExample:\n\n"
    "    medalign eval zeroshot --model runs/busi/bundle --manifest busi.csv --templates busi",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")
predict_app = typer.Typer(
    help="Run a trained bundle on new images.\n\nExample:\n\n"
    "    medalign predict masks --model runs/segment_kvasir/bundle new_frames/ --out preds/",
    no_args_is_help=True,
)
app.add_typer(predict_app, name="predict")
index_app = typer.Typer(
    help="Similar-case search: build an embedding index of known cases, search it.\n\nExample:\n\n"
    "    medalign index search --index indexes/medpix --image scan.png -k 5",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")


@data_app.command("validate")
def data_validate(
    manifest: Annotated[Path, typer.Argument(help="Manifest (.csv, .jsonl or .parquet).")],
    text_only: Annotated[
        bool, typer.Option("--text-only", help="Treat as text-only: image files are not required.")
    ] = False,
    no_images: Annotated[
        bool, typer.Option("--no-images", help="Skip decoding image and mask files.")
    ] = False,
    drop_invalid: Annotated[
        bool,
        typer.Option("--drop-invalid", help="Write a cleaned manifest without the rows that have errors."),
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Cleaned manifest path (default: <stem>.clean<suffix>).")
    ] = None,
    log: Annotated[
        Path | None, typer.Option(help="CSV log of dropped rows (default: <out>.dropped.csv).")
    ] = None,
) -> None:
    """Check every row of a manifest and print all problems at once (row, column, reason).

    Exit code 1 if any error is found. Example:

        medalign data validate data/busi.csv --drop-invalid --out data/busi.clean.csv
    """
    from medalign.data.manifest import ManifestError, read_manifest
    from medalign.data.validation import drop_invalid as drop_rows
    from medalign.data.validation import errors, validate_manifest

    try:
        loaded = read_manifest(manifest)
    except ManifestError as err:
        raise fail(str(err)) from err
    problems = validate_manifest(loaded, check_images=not no_images, text_only=text_only or None)
    for problem in problems:
        typer.echo(str(problem))
    n_errors = len(errors(problems))
    typer.echo(f"{manifest}: {len(loaded)} rows, {n_errors} errors, {len(problems) - n_errors} warnings")
    if drop_invalid:
        target = out or manifest.with_name(manifest.name.replace(manifest.suffix, f".clean{manifest.suffix}"))
        try:
            written, log_path, dropped = drop_rows(loaded, problems, target, log)
        except ValueError as err:
            raise fail(str(err)) from err
        typer.echo(
            f"wrote {written} ({len(loaded) - dropped} rows); dropped {dropped} rows, logged in {log_path}"
        )
        return
    if n_errors:
        raise fail(f"'{manifest}' has {n_errors} error(s), listed above")


# Sidecar lists that `data import` prints otherwise (warnings) or that are not findings.
NOT_NOTES = frozenset({"near_duplicate_stems_across_splits", "label_columns", "split_source"})


@data_app.command("import")
def data_import(
    format: Annotated[str, typer.Argument(help="Source layout; see `medalign data formats`.")],
    src: Annotated[Path, typer.Argument(help="Dataset folder (or file, for formats that read one).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest to write (.csv, .jsonl or .parquet).")],
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-O", help="Importer option name=value (repeatable); see `data formats FORMAT`."),
    ] = None,
) -> None:
    """Import a dataset into a manifest; the data is referenced, not copied.

    Importer options are given as -O name=value (repeatable); `medalign data formats FORMAT`
    lists them with type, default and meaning. The import summary accounts for every file and table row: imported,
    or listed with its reason (also in the manifest's sidecar). Examples:

        medalign data import busi ~/data/busi -o data/busi.csv -O fold=1

        medalign data import images ~/data/polyps -o data/polyps.csv -O images=Original -O "masks=Ground Truth"
    """
    from medalign.data.importers import DatasetImportError, get_importer, import_dataset
    from medalign.data.importers.ledger import REPORT_KEY, format_report
    from medalign.data.importers.registry import import_warnings
    from medalign.data.manifest import format_summary, summarize

    try:
        spec = get_importer(format)
        manifest = import_dataset(format, src, out, **spec.parse_pairs(option or []))
    except DatasetImportError as err:
        raise fail(f"import {format} from '{src}' failed: {err}") from err
    typer.echo(f"wrote {out}")
    typer.echo(format_summary(summarize(manifest)))
    extra = manifest.meta.extra
    if REPORT_KEY in extra:
        typer.echo("\n".join(format_report(extra[REPORT_KEY])))
    for key, value in extra.items():  # other importers' lists (unpaired, ignored files...) by name
        if isinstance(value, list) and value and key not in NOT_NOTES:
            more = f", ... ({len(value)} in all)" if len(value) > 5 else ""
            typer.echo(f"note: {key} ({len(value)}): {', '.join(map(str, value[:5]))}{more}")
    if manifest.meta.allow_outside_root:
        typer.echo(
            "note: some paths lie outside the dataset folder (an option or a symbolic link put them there); "
            "the sidecar sets allow_outside_root"
        )
    for line in import_warnings(manifest.meta):
        typer.secho(f"warning: {line}", fg=typer.colors.YELLOW)


@data_app.command("formats")
def data_formats(
    format: Annotated[
        str | None, typer.Argument(help="Show this format's options (type, default, meaning).")
    ] = None,
) -> None:
    """List the dataset layouts `medalign data import` understands, or one layout's options.

    Without FORMAT: one line per layout, the first word being the FORMAT argument of `medalign
    data import`. With FORMAT: its description and every option with type, default and meaning.
    Examples:

        medalign data formats

        medalign data formats images
    """
    from medalign.data.importers import IMPORTERS, DatasetImportError, get_importer
    from medalign.data.importers.options import describe_options

    if format is None:
        for name in sorted(IMPORTERS):
            typer.echo(f"{name:14s} {IMPORTERS[name].description}")
        return
    try:
        spec = get_importer(format)
    except DatasetImportError as err:
        raise fail(str(err)) from err
    typer.echo(f"{spec.name}: {spec.description}")
    typer.echo(f"usage: medalign data import {spec.name} SRC -o MANIFEST [-O name=value ...]")
    typer.echo("options:")
    typer.echo("\n".join(describe_options(spec.all_options)))


@data_app.command("phantom")
def data_phantom(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    n: Annotated[int, typer.Option(help="Number of cases.")] = 240,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives identical files.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
) -> None:
    """Generate the built-in multi-modal phantom (two modalities, masks, reports, labels, survival).

    Example:

        medalign data phantom --out data/phantom --n 500 --seed 1
    """
    from medalign.data.manifest import format_summary, read_manifest, summarize
    from medalign.data.phantom import PhantomConfig, generate_phantom

    path = generate_phantom(out, PhantomConfig(n=n, seed=seed, size=size))
    typer.echo(f"wrote {path}")
    typer.echo(format_summary(summarize(read_manifest(path))))


@data_app.command("split")
def data_split(
    manifest: Annotated[Path, typer.Argument(help="Manifest to split.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest to write with the new 'split' column.")],
    fractions: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.7,0.1,0.2",
    seed: Annotated[int, typer.Option(help="Seed of the patient shuffle.")] = 0,
    stratify: Annotated[str | None, typer.Option(help="Column to stratify by (e.g. label).")] = None,
    group_by: Annotated[
        str | None, typer.Option(help="Column whose value is the patient/group (default: patient_id).")
    ] = None,
    group_regex: Annotated[
        str | None,
        typer.Option(help="Regex on the image file name; its group 'group' (or first group) is the patient."),
    ] = None,
) -> None:
    """Assign patient-level train/val/test splits (deterministic for a seed).

    Each patient (patient_id, or the group from --group-by / --group-regex) lands in one split;
    near-duplicate file stems left in different splits are reported. Examples:

        medalign data split cases.csv -o cases.split.csv --fractions 0.8,0.1,0.1 --stratify label

        medalign data split frames.csv -o frames.split.csv --group-regex '^(?P<group>seq\\d+)_'
    """
    from medalign.data.groups import (
        GroupingError,
        format_near_duplicates,
        format_ungrouped,
        group_ids,
        near_duplicate_stems,
    )
    from medalign.data.manifest import SPLITS, ManifestError, assign_splits, read_manifest, write_manifest

    try:
        loaded = read_manifest(manifest)
        groups = None
        if group_by is not None or group_regex is not None:
            grouping = group_ids(loaded.table, group_by=group_by, group_regex=group_regex)
            groups = grouping.groups
            loaded.meta.extra["split_groups"] = grouping.source
        values = [float(v) for v in fractions.split(",")]
        loaded.table["split"] = assign_splits(
            loaded.table, dict(zip(SPLITS, values, strict=True)), seed=seed, stratify=stratify, groups=groups
        ).to_numpy()
    except (ManifestError, GroupingError, ValueError, KeyError) as err:
        raise fail(f"cannot split '{manifest}': {err}") from err
    write_manifest(loaded, out)
    counts = loaded.table["split"].value_counts()
    patients = f" ({groups.nunique()} groups by {grouping.source})" if groups is not None else ""
    typer.echo(f"wrote {out}: " + ", ".join(f"{s}={int(counts.get(s, 0))}" for s in SPLITS) + patients)
    if groups is not None and grouping.ungrouped:
        typer.secho(f"warning: {format_ungrouped(grouping.source, grouping.ungrouped)}", fg=typer.colors.YELLOW)
    near = near_duplicate_stems(loaded.table if groups is None else loaded.table.assign(patient_id=groups.to_numpy()))
    if near:
        typer.secho(f"warning: {format_near_duplicates(near)}", fg=typer.colors.YELLOW)


@data_app.command("shard")
def data_shard(
    manifest: Annotated[Path, typer.Argument(help="Manifest to shard.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New or empty folder for the shards and index.json.")],
    shard_size: Annotated[int, typer.Option(help="Samples per shard (the last of each split has fewer).")] = 1000,
) -> None:
    """Write a manifest as WebDataset tar shards (one split per shard) plus index.json.

    Training reads them with `data.shards: DIR` in a recipe. Example:

        medalign data shard data/busi.csv --out data/busi_shards --shard-size 500
    """
    from medalign.data.manifest import ManifestError, read_manifest
    from medalign.data.shards import ShardError, read_shard_index, shard_summary, write_shards

    try:
        index = write_shards(read_manifest(manifest), out, shard_size, source=manifest.name)
    except (ManifestError, ShardError) as err:
        raise fail(str(err)) from err
    typer.echo(f"wrote {index}: {shard_summary(read_shard_index(out))}")


@data_app.command("summary")
def data_summary(
    manifest: Annotated[Path, typer.Argument(help="Manifest to describe.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Print counts of cases, patients, splits, modalities, labels, attributes and survival.

    With --json the same summary is printed as JSON, for scripts. Example:

        medalign data summary data/busi.csv --json
    """
    from medalign.data.manifest import format_summary, read_manifest, summarize

    summary = summarize(read_manifest(manifest))
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML recipe (see configs/).")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from <out>/checkpoints/last.ckpt.")
    ] = False,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages",
            help="Curriculum files only: the stages to run as one chain, e.g. 1,2,3 or 2,3 (default: all).",
        ),
    ] = None,
) -> None:
    """Train from a recipe or a curriculum; any recipe key can be overridden after the options.

    The run folder (`out:` in the recipe) receives config.yaml, checkpoints/, logs/, tb/,
    bundle/ and metrics.json. Examples:

        medalign train --config configs/align/phantom.yaml
        medalign train --config configs/align/medpix.yaml --train.max_steps 200 --out runs/mp
        medalign train --config configs/align/medpix.yaml --resume
        torchrun --nproc_per_node 2 -m medalign.cli train --config configs/align/medpix.yaml --train.strategy ddp

    A curriculum (configs/curriculum/) chains Stage I -> II -> III, each stage starting from
    the previous stage's bundle; finished stages are reused and a killed stage resumes, so
    rerunning the same command continues where it stopped (``--resume`` is implied):

        medalign train --config configs/curriculum/phantom.yaml --stages 1,2,3
        medalign train --config configs/curriculum/phantom.yaml --stages 2,3 --stage3.train.epochs 5
    """
    from medalign.config import ConfigError, load_config, parse_cli_overrides
    from medalign.curriculum import is_curriculum, load_curriculum, parse_stages, run_curriculum
    from medalign.run import run_training

    try:
        overrides = parse_cli_overrides(list(ctx.args))
        if is_curriculum(config):
            curriculum = load_curriculum(config, overrides)
            run_curriculum(curriculum, parse_stages(stages, curriculum), echo=typer.echo)
            return
        if stages is not None:
            raise ConfigError(f"--stages needs a curriculum file; '{config}' is a single recipe")
        run_training(load_config(config, overrides), resume=resume, echo=typer.echo)
    except ValueError as err:  # ConfigError and the checks of a run (a bundle of the wrong kind, ...)
        raise fail(str(err)) from err


@app.command("ablate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ablate(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="Curriculum YAML (configs/curriculum/).")],
    variants: Annotated[
        str | None,
        typer.Option(
            "--variants",
            help="Chains to compare, ';'-separated, e.g. '1,2,3;2,3;1,3;3' (default: the full chain, "
            "each earlier stage skipped, and the last stage alone).",
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds",
            help="Run the whole ablation with N consecutive training seeds (from the recipe's train.seed), "
            "each in <out>/seed_<s>, and report every metric as mean ± std.",
        ),
    ] = 1,
) -> None:
    """Run a curriculum with stages skipped and tabulate the last stage's headline metrics.

    Chains share their common prefixes (Stage I is trained once); results go to
    <out>/ablation.md, <out>/ablation.json and <out>/ablation.html (a bar chart with error bars
    over the seeds). Recipe overrides work as in `train`. Examples:

        medalign ablate --config configs/curriculum/phantom.yaml --seeds 3
        medalign ablate --config configs/curriculum/phantom.yaml --variants '1,2,3;3' --stage3.train.epochs 5
    """
    from medalign.config import ConfigError, parse_cli_overrides
    from medalign.curriculum import is_curriculum, load_curriculum, parse_stages, run_ablation

    try:
        if not is_curriculum(config):
            raise ConfigError(f"'{config}' is not a curriculum file (no top-level `curriculum:`)")
        curriculum = load_curriculum(config, parse_cli_overrides(list(ctx.args)))
        chains = [parse_stages(v, curriculum) for v in variants.split(";")] if variants else None
        run_ablation(curriculum, chains, seeds=seeds, echo=typer.echo)
    except ValueError as err:  # ConfigError and the checks of a run (a bundle of the wrong kind, ...)
        raise fail(str(err)) from err


ModalityOption = Annotated[
    list[str] | None,
    typer.Option(
        "--modality",
        help="Image column per bundle modality, in the bundle's order (default: the columns it records).",
    ),
]


def _bundle_columns(loaded_model: Any, loaded: Any, modality: list[str] | None) -> tuple[Any, list[str]]:
    """The manifest (one row per modality for ``any``-layout bundles) and the image columns the
    bundle's input record asks for (``--modality`` maps others onto them, in order)."""
    from medalign.inputs import input_spec
    from medalign.run import modality_rows

    spec = input_spec(loaded_model)
    try:
        keys = spec.columns_for(loaded.image_columns, modality)
    except ValueError as err:
        raise fail(str(err)) from err
    if spec.layout == "any":  # one image at a time: every modality's image is its own row
        return modality_rows(loaded, keys), ["image"]
    return loaded, keys


def _eval_common(
    model: Path,
    manifest: Path,
    split: str,
    label: str | None,
    modality: list[str] | None,
    features: str = "embedding",
) -> tuple[Any, Any, Any, list[str]]:
    from medalign import evaluate as ev
    from medalign.bundle import load_bundle
    from medalign.data.dataset import dataset_for_model
    from medalign.data.manifest import read_manifest

    loaded_model = load_bundle(model)
    loaded = read_manifest(manifest)
    if label and label not in loaded.table.columns:
        raise fail(f"manifest '{manifest}' has no column '{label}'")
    loaded, keys = _bundle_columns(loaded_model, loaded, modality)
    dataset = dataset_for_model(loaded, loaded_model, split, label, keys)
    return loaded_model, loaded, ev.embed_split(loaded_model, dataset, features=features), keys


def _eval_config(task: str, manifest: Path, split: str, model: Any = None) -> Any:
    """The RunConfig an eval command stands for: it tells the shared code (and the HTML report)
    which manifest, split and columns the evaluation used, and preprocesses as the bundle records."""
    from medalign.config import RunConfig
    from medalign.inputs import input_spec

    config = RunConfig(task=task)  # type: ignore[arg-type]
    config.data.manifest, config.eval.split = str(manifest), split
    if model is not None:
        config.data.normalisation = input_spec(model).normalisation  # type: ignore[assignment]
    return config


def _write_metrics(metrics: dict[str, Any], out: Path | None, echo: bool = True) -> None:
    """All of ``metrics`` to ``out``; the terminal gets them without per-case rows (``echo``)."""
    from medalign.metrics import without_rows

    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2, default=float) + "\n", encoding="utf-8")
    if echo:
        typer.echo(json.dumps(without_rows(metrics), indent=2, default=float))


def _write_eval(
    command: str, metrics: dict[str, Any], out: Path | None, model: Path, config: Any, echo: bool = True,
    **options: Any,
) -> None:
    """The metrics JSON and, with ``--out FILE.json``, the self-contained ``FILE.html`` beside it."""
    from medalign.html_report import write_eval_report

    _write_metrics(metrics, out, echo)
    if out:
        arguments = {"command": f"eval {command}", "model": model, "manifest": config.data.manifest,
                     "split": config.eval.split, **options}  # fmt: skip
        typer.echo(f"wrote {write_eval_report(metrics, out, model, config, arguments)}")


@eval_app.command("zeroshot")
def eval_zeroshot(
    model: Annotated[Path, typer.Option("--model", "-m", help="Bundle folder.")],
    manifest: Annotated[Path, typer.Option(help="Manifest with images and labels.")],
    templates: Annotated[str, typer.Option(help="Template YAML or a shipped name (e.g. busi).")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    label: Annotated[str, typer.Option(help="Label column.")] = "label",
    modality: ModalityOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the metrics JSON here, with each case's class probabilities.")
    ] = None,
) -> None:
    """Zero-shot classification with a prompt-template ensemble: ACC, balanced ACC, macro-F1, AUC.

    Example:

        medalign eval zeroshot --model runs/busi/bundle --manifest busi.csv --templates busi
    """
    from medalign import evaluate as ev

    loaded_model, _, embeddings, keys = _eval_common(model, manifest, split, label, modality)
    config = _eval_config("align", manifest, split, loaded_model)
    config.eval.zeroshot, config.eval.zeroshot_label, config.data.label = templates, label, label
    metrics = ev.zero_shot(loaded_model, embeddings, templates)
    _write_eval("zeroshot", metrics, out, model, config, templates=templates, label=label, modality=keys)


@eval_app.command("retrieval")
def eval_retrieval(
    model: Annotated[Path, typer.Option("--model", "-m", help="Bundle folder.")],
    manifest: Annotated[Path, typer.Option(help="Manifest with images and text.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    modality: ModalityOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the metrics JSON here.")] = None,
) -> None:
    """Image->text and text->image retrieval: R@1/5/10, median and mean rank.

    Example:

        medalign eval retrieval --model runs/medpix/bundle --manifest medpix.csv
    """
    from medalign import evaluate as ev

    loaded_model, _, embeddings, keys = _eval_common(model, manifest, split, None, modality)
    config = _eval_config("align", manifest, split, loaded_model)
    _write_eval("retrieval", ev.retrieval(embeddings), out, model, config, modality=keys)


@eval_app.command("probe")
def eval_probe(
    model: Annotated[Path, typer.Option("--model", "-m", help="Bundle folder.")],
    manifest: Annotated[Path, typer.Option(help="Manifest with train/val/test splits and labels.")],
    label: Annotated[str, typer.Option(help="Label column.")] = "label",
    split: Annotated[str, typer.Option(help="Split to report.")] = "test",
    features: Annotated[
        str,
        typer.Option(
            help="'embedding' (the model's image embedding) or 'tower' (the vision tower's pooled "
            "features: any bundle with a vision tower, e.g. a clinical one)."
        ),
    ] = "embedding",
    modality: ModalityOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the metrics JSON here.")] = None,
) -> None:
    """Linear probe: logistic regression on frozen image embeddings, C chosen on the val split.

    Example:

        medalign eval probe --model runs/busi/bundle --manifest busi.csv --label label
        medalign eval probe --model runs/clinical_busi/bundle --manifest busi.csv --features tower
    """
    from medalign import evaluate as ev
    from medalign.data.dataset import dataset_for_model

    try:
        loaded_model, loaded, test, keys = _eval_common(model, manifest, split, label, modality, features)
        train_val = [
            ev.embed_split(loaded_model, dataset_for_model(loaded, loaded_model, s, label, keys), features=features)
            for s in ("train", "val")
        ]
    except ValueError as err:
        raise fail(str(err)) from err
    config = _eval_config("align", manifest, split, loaded_model)
    config.eval.probe_label, config.data.label = label, label
    _write_eval("probe", ev.probe(*train_val, test), out, model, config, label=label, features=features, modality=keys)


@eval_app.command("segment")
def eval_segment(
    model: Annotated[Path, typer.Option("--model", "-m", help="Segmentation bundle folder.")],
    manifest: Annotated[
        Path, typer.Option(help="Manifest with images, masks (and text for text-guided models).")
    ],
    modality: ModalityOption = None,
    mask: Annotated[str, typer.Option(help="Mask column.")] = "mask",
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the metrics JSON here.")] = None,
) -> None:
    """Per-image Dice/IoU (LViT/C2FVL protocol), pooled Dice, HD95 and NSD over every image.

    A prompt-guided (text or attribute) model is scored three times: with each row's true
    prompt, with another image's (shuffled) and with the empty prompt; how much Dice it loses
    without the true prompt is how much it uses it.

    Example:

        medalign eval segment --model runs/seg/bundle --manifest phantom/prompts.csv \\
            --modality image:a --modality image:b --out metrics.json
    """
    from medalign.bundle import load_bundle
    from medalign.data.manifest import read_manifest
    from medalign.run import evaluate_segmentation

    loaded_model = load_bundle(model)
    loaded, keys = _bundle_columns(loaded_model, read_manifest(manifest), modality)
    config = _eval_config("segment", manifest, split, loaded_model)
    config.data.mask, config.data.modalities = mask, keys
    try:
        metrics = evaluate_segmentation(loaded_model, loaded, config, keys, split)
    except (ValueError, KeyError) as err:
        raise fail(str(err)) from err
    _write_eval("segment", metrics, out, model, config, modality=keys, mask=mask)
    for prompt, row in metrics.get("prompt_ablation", {}).items():  # a prompt-guided model
        typer.echo(f"{prompt:>8} prompt: Dice {row['dice']:.4f}  IoU {row['iou']:.4f}  ({row['n_images']} images)")


@eval_app.command("fuse")
def eval_fuse(
    model: Annotated[Path, typer.Option("--model", "-m", help="Fusion bundle folder.")],
    manifest: Annotated[
        Path, typer.Option(help="Manifest with every modality's column and masks or labels.")
    ],
    modality: ModalityOption = None,
    mask: Annotated[str, typer.Option(help="Mask column (segmentation head).")] = "mask",
    label: Annotated[str, typer.Option(help="Label column (classification head).")] = "label",
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the metrics JSON here.")] = None,
) -> None:
    """Metrics for every non-empty subset of the model's modalities (a, b, a+b, ...), one row each.

    Segmentation: per-image Dice/IoU, pooled Dice, HD95; classification: ACC, balanced ACC,
    macro-F1, AUC. Example:

        medalign eval fuse --model runs/fuse_phantom/bundle --manifest phantom/manifest.csv
    """
    from medalign.bundle import load_bundle
    from medalign.data.manifest import read_manifest
    from medalign.models.fusion import FusionModel
    from medalign.run import evaluate_fusion

    loaded_model = load_bundle(model)
    if not isinstance(loaded_model, FusionModel):
        raise fail(f"'{model}' is not a fusion bundle; use medalign eval segment (or zeroshot, ...)")
    loaded, keys = _bundle_columns(loaded_model, read_manifest(manifest), modality)
    config = _eval_config("fuse", manifest, split, loaded_model)
    config.data.mask, config.data.label, config.data.modalities = mask, label, keys
    try:
        metrics = evaluate_fusion(loaded_model, loaded, config, keys, split)
    except (ValueError, KeyError) as err:
        raise fail(str(err)) from err
    segment = loaded_model.config.task_head == "segment"
    columns = (
        ("dice", "iou", "pooled_dice", "hd95")
        if segment
        else ("accuracy", "balanced_accuracy", "macro_f1", "auc")
    )
    width = max(len(k) for k in [*metrics["subsets"], "modalities"])
    typer.echo(f"{'modalities':<{width}}  {'n':>5}  " + "  ".join(f"{c:>17}" for c in columns))
    for key, row in metrics["subsets"].items():
        n = row.get("n_images", row.get("n", 0))
        cells = [row.get(c) for c in columns]
        shown = "  ".join(f"{'-' if v is None else f'{v:.4f}':>17}" for v in cells)
        typer.echo(f"{key:<{width}}  {n:>5}  {shown}")
    _write_eval("fuse", metrics, out, model, config, echo=False, modality=keys, mask=mask, label=label)


@eval_app.command("clinical")
def eval_clinical(
    model: Annotated[Path, typer.Option("--model", "-m", help="Clinical bundle folder (task: clinical).")],
    manifest: Annotated[Path, typer.Option(help="Manifest with the model's modalities, labels and/or time/event.")],
    modality: ModalityOption = None,
    label: Annotated[str, typer.Option(help="Label column of the diagnosis head.")] = "label",
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for metrics.json, reliability.png and km_risk_groups.png.")
    ] = None,
) -> None:
    """Diagnosis (ACC, balanced ACC, macro-F1, AUC, ECE) and prognosis (C-index, td-AUC, log-rank).

    Rows sharing a patient_id are also scored per patient (mean probability / risk). Example:

        medalign eval clinical --model runs/clinical_phantom/bundle --manifest phantom/manifest.csv --out eval_out
    """
    from medalign.bundle import load_bundle
    from medalign.data.manifest import read_manifest
    from medalign.models.heads import ClinicalModel
    from medalign.tasks.clinical import evaluate_clinical

    loaded_model = load_bundle(model)
    if not isinstance(loaded_model, ClinicalModel):
        raise fail(f"'{model}' is not a clinical bundle (task: clinical)")
    loaded, keys = _bundle_columns(loaded_model, read_manifest(manifest), modality)
    config = _eval_config("clinical", manifest, split, loaded_model)
    config.data.label, config.data.modalities = label, keys
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    try:
        metrics = evaluate_clinical(loaded_model, loaded, config, keys, split, out=out)
    except (ValueError, KeyError) as err:
        raise fail(str(err)) from err
    levels = [("row", metrics)] + ([("patient", metrics["patient_level"])] if "patient_level" in metrics else [])
    for level, block in levels:
        if "diagnosis" in block:
            d = block["diagnosis"]
            typer.echo(
                f"diagnosis ({level}, n={d['n']}): accuracy {d['accuracy']:.4f}, balanced accuracy "
                f"{d['balanced_accuracy']:.4f}, macro-F1 {d['macro_f1']:.4f}, AUC {d['auc']:.4f}, ECE {d['ece']:.4f}"
            )
        if "survival" in block:
            s = block["survival"]
            logrank = s["risk_groups"].get("logrank")
            p = f"{logrank['p_value']:.3g}" if logrank else "n/a"
            typer.echo(
                f"prognosis ({level}, n={s['n']}, events {s['n_events']}): C-index {s['c_index']:.4f}, "
                f"mean td-AUC {s['td_auc']['mean']:.4f}, log-rank p (median risk split) {p}"
            )
    if out is not None:  # the report reads the figures evaluate_clinical wrote into the same folder
        _write_eval("clinical", metrics, out / "metrics.json", model, config, echo=False, modality=keys, label=label)


@predict_app.command("segment")
def predict_segment(
    model: Annotated[Path, typer.Option("--model", "-m", help="Segmentation bundle folder.")],
    image: Annotated[
        list[str],
        typer.Option(
            help="Image file; for a bundle of several modalities one per modality, named: --image a=FILE --image b=FILE."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Mask to write (.png, or .nii/.nii.gz).")],
    text: Annotated[
        str | None,
        typer.Option(help="Prompt naming what to segment (text-guided models; '' = no prompt)."),
    ] = None,
    attribute: Annotated[
        list[str] | None,
        typer.Option(help="NAME=VALUE finding of an attribute-guided model (C2FVL); repeat per attribute."),
    ] = None,
    overlay_path: Annotated[Path | None, typer.Option("--overlay", help="Also write an overlay PNG.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")] = False,
    threshold: Annotated[float, typer.Option(help="Foreground probability threshold.")] = 0.5,
    bf16: Annotated[
        bool, typer.Option("--bf16", help="Run the model under bfloat16 autocast (faster).")
    ] = False,
) -> None:
    """Segment one case of any size (sliding windows at the training size; a prompt-guided
    model sees the whole image at its training size, as ``medalign eval segment`` does).

    The bundle records which images it takes; a bundle trained on several modalities needs each
    one, named. Example:

        medalign predict segment --model runs/seg/bundle --image a=a.png --image b=b.png \\
            --text "the lesion in the right lower zone" --out mask.png --overlay overlay.png
    """
    from medalign.inference import overlay, save_mask
    from medalign.inputs import parse_image_options
    from medalign.predict import Predictor, prepare

    predictor = Predictor.from_bundle(model)
    try:
        parsed = parse_image_options(image)
        if isinstance(parsed, list) and len(parsed) > 1:
            raise ValueError(
                f"{len(parsed)} unnamed --image for one case; this bundle takes {predictor.inputs.describe()}. "
                f"{predictor.inputs.how_to_pass()}"
            )
        case: Any = parsed if isinstance(parsed, dict) else parsed[0]
        used = [name for name in predictor.arrange(case) if name != "*"] or list(predictor.inputs.modalities[:1])
        findings = _parse_attributes(attribute) if attribute else None
        probabilities = predictor.segment(case, text=text, attributes=findings, flip_tta=tta, bf16=bf16)
    except ValueError as err:
        raise fail(str(err)) from err
    mask = probabilities > threshold
    save_mask(mask, out)
    if overlay_path:
        first = next(iter(case.values())) if isinstance(case, dict) else case
        overlay(prepare(first, 1, None, predictor.normalisation)[None], mask).save(overlay_path)
    typer.echo(f"wrote {out}: {int(mask.sum())} foreground pixels of {mask.size} (inputs: {'+'.join(used)})")


def _parse_attributes(pairs: list[str]) -> dict[str, str]:
    """``["side=left", "zone=lower"]`` -> ``{"side": "left", "zone": "lower"}``."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--attribute {pair!r} is not NAME=VALUE")
        found[name.strip()] = value.strip()
    return found


@index_app.command("build")
def index_build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder to write.")],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Bundle that embeds the manifest's images (or texts).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Manifest of the cases to index.")] = None,
    column: Annotated[
        str | None, typer.Option(help="Image column for a one-image bundle, or 'text' (default: the columns the bundle records).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Index only this split (default: every row).")] = None,
    embeddings: Annotated[
        Path | None, typer.Option(help="Precomputed [N, D] embeddings (.npy) instead of --model/--manifest.")
    ] = None,
    ids: Annotated[Path | None, typer.Option(help="With --embeddings: a text file with one id per line.")] = None,
    float16: Annotated[bool, typer.Option("--float16", help="Store half-precision rows (half the disk).")] = False,
) -> None:
    """Embed a manifest with a bundle (or take precomputed embeddings) and save a searchable index.

    Rows are L2-normalised, so search scores are cosine similarities; the folder keeps each
    row's id (case_id) and metadata (split, text, labels, path) and the model that made it.

    Examples:

        medalign index build --model runs/align_medpix/bundle --manifest data/medpix.csv --out indexes/medpix
        medalign index build --embeddings emb.npy --ids ids.txt --out indexes/big --float16
    """
    import numpy as np

    from medalign import retrieval

    dtype = "float16" if float16 else "float32"
    if embeddings is not None:
        if model is not None or manifest is not None:
            raise fail("give either --embeddings or --model with --manifest, not both")
        names = retrieval.read_ids(ids.read_text(encoding="utf-8").splitlines()) if ids else None
        index = retrieval.EmbeddingIndex.from_embeddings(
            np.load(embeddings, mmap_mode="r", allow_pickle=False), names, dtype=dtype, info={"source": str(embeddings)}
        )
    elif model is not None and manifest is not None:
        import medalign

        index = retrieval.build_from_manifest(medalign.load(str(model)), manifest, column=column, split=split, dtype=dtype)
        index.info["model"] = str(model.resolve())
    else:
        raise fail("give --model and --manifest (or --embeddings)")
    index.save(out)
    typer.echo(f"wrote {out}: {len(index)} rows x {index.dim} dims ({dtype})")


@index_app.command("search")
def index_search(
    index: Annotated[Path, typer.Option(help="Index folder (medalign index build).")],
    image: Annotated[
        list[str] | None,
        typer.Option(help="Query image(s), repeat for several; one case of a several-modality bundle: --image a=F --image b=F."),
    ] = None,
    text: Annotated[list[str] | None, typer.Option(help="Query text(s) (needs an alignment bundle).")] = None,
    queries: Annotated[Path | None, typer.Option(help="Precomputed [Q, D] query embeddings (.npy).")] = None,
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Bundle that embeds the queries (default: the one that built the index).")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Results per query.")] = 10,
    backend: Annotated[str, typer.Option(help="exact (chunked products) or faiss (extra [faiss]).")] = "exact",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the results JSON here.")] = None,
) -> None:
    """The k most similar indexed cases for each query image, text or embedding.

    Examples:

        medalign index search --index indexes/medpix --image scan.png -k 5
        medalign index search --index indexes/medpix --text "axial CT of the chest" --out hits.json
    """
    import json

    import numpy as np

    from medalign import retrieval

    found = retrieval.EmbeddingIndex.load(index)
    given = [name for name, value in (("--image", image), ("--text", text), ("--queries", queries)) if value]
    if len(given) != 1:
        raise fail("give exactly one of --image, --text, --queries")
    labels: list[str]
    if queries is not None:
        vectors = np.load(queries, allow_pickle=False)
        labels = [f"query {i}" for i in range(len(np.atleast_2d(vectors)))]
    else:
        source = model or found.info.get("model")
        if source is None:
            raise fail("this index records no model: give --model to embed the queries")
        import medalign
        from medalign.inputs import parse_image_options

        predictor = medalign.load(str(source))
        if image:
            try:
                parsed = parse_image_options(image)
                vectors = predictor.embed_image(parsed)
            except ValueError as err:
                raise fail(str(err)) from err
            labels = [" ".join(f"{k}={v}" for k, v in parsed.items())] if isinstance(parsed, dict) else list(parsed)
        else:
            vectors, labels = predictor.embed_text(list(text or [])), list(text or [])
    result = found.search(vectors, k, backend=backend)
    rows = []
    for query, hits, scores, ids in zip(labels, result.indices, result.scores, result.ids, strict=True):
        matches = [
            {"id": name, "score": round(float(score), 5), **(found.metadata[int(row)] if found.metadata else {})}
            for name, score, row in zip(ids, scores, hits, strict=True)
        ]
        rows.append({"query": query, "matches": matches})
        typer.echo(query)
        for rank, match in enumerate(matches, 1):
            typer.echo(f"  {rank:>2}. {match['id']}  {match['score']:.4f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2), encoding="utf-8")


@app.command("chat")
def chat(
    model: Annotated[Path, typer.Option("--model", "-m", help="Instruct bundle folder (task: instruct).")],
    image: Annotated[
        list[str],
        typer.Option(help="Image file; repeat for several images, or name the bundle's modalities: --image a=FILE --image b=FILE."),
    ],
    question: Annotated[
        str | None, typer.Option(help="One question; without it, questions are read line by line from stdin.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    sample: Annotated[bool, typer.Option("--sample", help="Sample (temperature, top-p) instead of greedy.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
) -> None:
    """Ask an instruction-tuned model about images; the answer streams as it is generated.

    Example:

        medalign chat --model runs/instruct/phantom_tiny/stages_1-2/bundle \\
            --image a=a.png --image b=b.png --question "How many lesions are there?"
    """
    import sys

    from medalign.inputs import parse_image_options
    from medalign.predict import Predictor

    predictor = Predictor.from_bundle(model)
    try:
        images: Any = parse_image_options(image)
    except ValueError as err:
        raise fail(str(err)) from err
    history: list[dict[str, str]] = []
    questions = [question] if question is not None else (line.strip() for line in sys.stdin)
    for asked in questions:
        if not asked:
            continue
        try:
            answer = predictor.chat(
                images, asked, history, stream=lambda piece: typer.echo(piece, nl=False),
                max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
            )  # fmt: skip
        except ValueError as err:
            raise fail(str(err)) from err
        typer.echo("")
        history += [{"from": "human", "value": asked}, {"from": "gpt", "value": answer}]


def _register_commands() -> None:
    """Commands whose modules own their Typer definitions (imports stay light: no onnx at import)."""
    from medalign.batch_predict import predict_classes, predict_masks
    from medalign.export import export_app
    from medalign.html_report import report_command
    from medalign.serve.command import serve_command

    app.command("report")(report_command)
    app.command("serve")(serve_command)
    app.add_typer(export_app, name="export")
    predict_app.command("masks")(predict_masks)
    predict_app.command("classify")(predict_classes)


_register_commands()


@app.command("quickstart")
def quickstart(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working folder for the phantom and outputs.")] = Path(
        "quickstart_out"
    ),
    n: Annotated[int, typer.Option(help="Number of phantom cases.")] = 480,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    steps: Annotated[
        int | None, typer.Option(help="Cap each training stage at this many steps (smoke test).")
    ] = None,
    keep_checkpoints: Annotated[
        bool,
        typer.Option(
            "--keep-checkpoints", help="Keep each finished run's optimiser checkpoint (checkpoints/last.ckpt)."
        ),
    ] = False,
) -> None:
    """Run the whole path on the built-in phantom: generate, validate, align images and reports, evaluate.

    Example:

        medalign quickstart --out /tmp/qs
    """
    from medalign.quickstart import run_quickstart

    code = run_quickstart(out, n=n, seed=seed, echo=typer.echo, max_steps=steps, keep_checkpoints=keep_checkpoints)
    if code:
        raise fail(f"the quickstart stopped at a failed step (above); outputs so far in {out}")


DEBUG_FLAG = "--debug"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every failure ends in one red ``error: ...`` line and exit code 1.

    A command's own check (:func:`~medalign.cli_grammar.fail`), a usage mistake (an
    unknown option gets the closest real one: ``--prompt`` -> ``--text``) and anything the
    library raises (a missing file, a bad manifest row, a bundle of the wrong kind) all print
    one line (:func:`~medalign.cli_grammar.error_line`); ``--debug`` anywhere on the command
    line shows the full traceback instead.
    """
    import sys

    from medalign.cli_grammar import (
        Abort,
        ClickException,
        NoArgsIsHelpError,
        error_line,
        leaf_command,
        repeated_option,
    )

    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    root = typer.main.get_command(app)
    try:
        command, rest = leaf_command(root, args)
        twice = repeated_option(command, rest)
        if twice is not None:
            raise fail(f"option {twice} is given more than once; it takes one value (see --help)")
        code = root.main(args=args, prog_name="medalign", standalone_mode=False)
    except NoArgsIsHelpError as err:  # `medalign`, `medalign data`: the help
        typer.echo(err.format_message())
        raise SystemExit(0) from None
    except typer.Exit as done:  # a command's own failure: its error line is printed
        raise SystemExit(done.exit_code) from None
    except (KeyboardInterrupt, Abort):
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        raise SystemExit(130) from None
    except Exception as err:
        if debug and not isinstance(err, ClickException):
            raise
        typer.secho(error_line(err), fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
