"""The manifest a run reads: where it lives, the phantom generated for it, and the views of it
training takes (one row per modality, a fraction of the train split).

The run pipeline, the HTML report and the model card all need the same answer to "which rows
did this run train on", so it is computed here, below all of them.
"""

from __future__ import annotations

from pathlib import Path

from medalign.config import RunConfig
from medalign.data.manifest import Manifest, read_manifest


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


def run_manifest_path(run_dir: Path, config: RunConfig) -> Path | None:
    """The manifest a run trained on, when it is still there (:func:`manifest_file`)."""
    path = manifest_file(config, run_dir)
    return path if path is not None and path.is_file() else None


