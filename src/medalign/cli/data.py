"""``medalign data ...``: import, validate, split, shard and summarise manifests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from medalign.cli.app import data_app
from medalign.cli_grammar import fail


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
