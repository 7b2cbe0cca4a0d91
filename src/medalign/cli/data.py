"""``medalign data ...``: import, validate, split, shard and summarise manifests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from medalign.cli.app import data_app
from medalign.cli_grammar import fail


def _parse_options(options: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as YAML scalars/lists so ``fold=1`` is an int."""
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"option {option!r} is not key=value")
        parsed[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return parsed


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


@data_app.command("import")
def data_import(
    format: Annotated[str, typer.Argument(help="Source layout; see `medalign data formats`.")],
    src: Annotated[Path, typer.Argument(help="Dataset folder (or file, for JSON formats).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest to write (.csv, .jsonl or .parquet).")],
    option: Annotated[
        list[str] | None, typer.Option("--option", "-O", help="Importer option key=value (repeatable).")
    ] = None,
) -> None:
    """Import a dataset in its released layout into a manifest; the data is referenced, not copied.

    Example:

        medalign data import busi ~/data/busi --out data/busi.csv --option fold=1
    """
    from medalign.data.importers import DatasetImportError, import_dataset
    from medalign.data.manifest import format_summary, summarize

    try:
        manifest = import_dataset(format, src, out, **_parse_options(option or []))
    except (DatasetImportError, TypeError) as err:
        raise fail(f"import {format} from '{src}' failed: {err}") from err
    typer.echo(f"wrote {out}")
    typer.echo(format_summary(summarize(manifest)))
    for key, value in manifest.meta.extra.items():  # the sidecar's lists (unpaired, ignored files...) by name
        if isinstance(value, list) and value:
            more = f", ... ({len(value)} in all)" if len(value) > 5 else ""
            typer.echo(f"note: {key} ({len(value)}): {', '.join(map(str, value[:5]))}{more}")
    if manifest.meta.allow_outside_root:
        typer.echo("note: some paths lie outside the dataset folder; the sidecar sets allow_outside_root")


@data_app.command("formats")
def data_formats() -> None:
    """List the dataset layouts `medalign data import` understands, one per line with its description.

    The first word of each line is the FORMAT argument of `medalign data import`. Example:

        medalign data formats
    """
    from medalign.data.importers import IMPORTERS

    for name in sorted(IMPORTERS):
        typer.echo(f"{name:14s} {IMPORTERS[name].description}")


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
) -> None:
    """Assign patient-level train/val/test splits (deterministic for a seed).

    Example:

        medalign data split cases.csv --out cases.split.csv --fractions 0.8,0.1,0.1 --stratify label
    """
    from medalign.data.manifest import SPLITS, assign_splits, read_manifest, write_manifest

    loaded = read_manifest(manifest)
    try:
        values = [float(v) for v in fractions.split(",")]
        loaded.table["split"] = assign_splits(
            loaded.table, dict(zip(SPLITS, values, strict=True)), seed=seed, stratify=stratify
        )
    except ValueError as err:
        raise fail(f"cannot split '{manifest}': {err}") from err
    write_manifest(loaded, out)
    counts = loaded.table["split"].value_counts()
    typer.echo(f"wrote {out}: " + ", ".join(f"{s}={int(counts.get(s, 0))}" for s in SPLITS))


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
