"""Helpers the benchmark scripts share: where data and runs live, the machine line, cached training,
results files, and the marker-delimited blocks of README.md and BENCHMARKS.md.

Every number in README.md and BENCHMARKS.md is written by a script, never by hand. The protocol:

* a benchmark run saves what it measured (numbers, protocol, machine, date) with
  ``save_results(name, data)`` to ``benchmarks/results/<name>.json``, which is committed;
* the script defines ``blocks() -> dict[str, str]``: marker name -> markdown, rendered from the
  committed results files alone (``load_results``), so a block can be rebuilt without training;
* ``write_blocks(script.blocks())`` puts each block between ``<!-- NAME:begin -->`` and
  ``<!-- NAME:end -->`` in whichever of README.md / BENCHMARKS.md holds those markers;
* ``python benchmarks/render_docs.py --check`` (run by the test suite) re-renders every block of
  every ``bench_*.py`` and fails on any difference, so a number edited by hand, or a results file
  changed without rewriting its block, fails CI.

Scripts run as ``python benchmarks/<script>.py``, so ``benchmarks/`` is on ``sys.path`` and
``import benchlib`` works. ``medalign`` is imported inside the functions that need it: some scripts
(bench_gradcache_memory) measure the resident memory of fresh processes that import this module,
and the package's import cost must not show up in their baseline.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDALIGN_SHARED_DATA", REPO.parent / "shared" / "data"))
RUNS = Path(os.environ.get("MEDALIGN_BENCH_RUNS", "/tmp/medalign-bench"))
BENCHMARKS = REPO / "BENCHMARKS.md"
README = REPO / "README.md"
DOCS = (README, BENCHMARKS)
RESULTS = REPO / "benchmarks" / "results"
STAMP = "bench_overrides.json"
NO_RESULTS = "(no current results file)"  # said before a pending block; dropped when it is written


def machine(cores: str = "", versions: str = "") -> str:
    """The protocol's machine line; ``cores`` follows the core count (sharing, threads, precision),
    ``versions`` follows the torch version (other library versions, precision)."""
    return (
        f"{platform.machine()}, {os.cpu_count()} cores{cores}, torch {torch.__version__}{versions}, "
        f"{dt.date.today().isoformat()}"
    )


def imported(name: str, fmt: str, src: str, **options: Any) -> Path:
    """Import a shared dataset once into the benchmark folder and return the manifest's path.

    The file name carries the importer options (``busi_fold1.csv``) so that variants do not
    overwrite each other; ``fractions`` is left out because callers name their split in ``name``.
    """
    from medalign.data.importers import load_dataset
    from medalign.data.manifest import write_manifest

    suffix = "_".join(f"{k}{v}" for k, v in options.items() if k != "fractions")
    path = RUNS / "data" / (f"{name}_{suffix}.csv" if suffix else f"{name}.csv")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_manifest(load_dataset(fmt, DATA / src, **options), path)
    return path


def finished(run: str, overrides: list[str]) -> dict[str, Any] | None:
    """The metrics.json of ``RUNS/<run>`` if that run finished with exactly these overrides."""
    out = RUNS / run
    stamp, metrics_path = out / STAMP, out / "metrics.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == overrides and metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    return None


def train(
    recipe: str,
    run: str,
    overrides: list[str],
    *,
    folder: str = "",
    echo: Callable[..., Any] = print,
) -> dict[str, Any]:
    """Train ``configs/<folder>/<recipe>.yaml`` into ``RUNS/<run>`` and return its metrics.json.

    The overrides are stamped into the run folder before training, so a finished run with the
    same overrides is reused (benchmarks take minutes per run) and an interrupted one resumes
    from its checkpoint; different overrides start the run again.
    """
    from medalign.config import load_config
    from medalign.pipeline.run import run_training

    out = RUNS / run
    stamp, metrics_path = out / STAMP, out / "metrics.json"
    done = finished(run, overrides)
    if done is not None:
        return done
    same = stamp.is_file() and json.loads(stamp.read_text()) == overrides
    config = load_config(REPO / "configs" / folder / f"{recipe}.yaml", [f"out={out}", *overrides])
    config.train.progress = False
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(overrides))
    start = time.perf_counter()
    run_training(config, resume=same, echo=echo)
    echo(f"{run}: {time.perf_counter() - start:.0f} s (training + evaluation)")
    return json.loads(metrics_path.read_text())


def replace_section(body: str, begin: str, end: str, heading: str, path: Path = BENCHMARKS) -> None:
    """Put ``body`` between the ``begin`` and ``end`` markers of ``path``, leaving the rest as is.

    A file without the markers gets ``heading`` (a markdown heading, possibly followed by the
    protocol) and empty markers appended first, so a new benchmark creates its own section.
    """
    text = path.read_text(encoding="utf-8")
    if begin not in text:
        text = f"{text.rstrip()}\n\n{heading}\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}", encoding="utf-8")


def write_section(
    name: str, body: str, *, script: str, title: str, prefix: str = "", path: Path = BENCHMARKS
) -> None:
    """The section of sub-benchmark ``name`` of ``benchmarks/<script>.py``.

    Markers ``<!-- <prefix>_<name>:begin/end -->`` (``prefix`` defaults to the script's name) and,
    when new, the heading ``## <title> (`benchmarks/<script>.py <name>`)``.
    """
    marker = f"{prefix or script}_{name}"
    heading = f"## {title} (`benchmarks/{script}.py {name}`)"
    replace_section(body, f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->", heading, path)


def results_path(name: str) -> Path:
    return RESULTS / f"{name}.json"


def save_results(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (committed: the source every block is rendered from)."""
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
    return path


def load_results(name: str) -> dict[str, Any]:
    """The committed results of ``name``; a missing file is an error naming the script to run."""
    path = results_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the benchmark that writes it")
    return json.loads(path.read_text(encoding="utf-8"))


def rendered(renderers: dict[str, Callable[[dict[str, Any]], str]]) -> dict[str, str]:
    """``blocks()`` of a script: marker -> markdown for every results file of the script that
    exists (results file and marker share the name). A doc block whose results file is missing
    is not rendered by anyone, which ``render_docs --check`` reports."""
    return {name: render(load_results(name)) for name, render in renderers.items() if results_path(name).is_file()}


def publish(name: str, results: dict[str, Any], render: Callable[[dict[str, Any]], str], heading: str) -> str:
    """Save ``results`` as ``benchmarks/results/<name>.json`` and write its block, rendered from the
    saved file (so what is written is exactly what ``render_docs --check`` re-renders). A block
    without markers takes the place of a ``<!-- NAME:pending -->`` line (a section whose numbers
    were removed until the benchmark runs again), or else gets ``heading`` and markers appended to
    BENCHMARKS.md. Returns the block."""
    save_results(name, results)
    body = render(load_results(name))
    begin, end = _markers(name)
    if name not in doc_blocks():
        pending = f"<!-- {name}:pending -->"
        holder = next((doc for doc in DOCS if pending in doc.read_text(encoding="utf-8")), None)
        if holder is not None:
            text = holder.read_text(encoding="utf-8").replace(f" {NO_RESULTS}.\n\n{pending}", f".\n\n{pending}", 1)
            holder.write_text(text.replace(pending, f"{begin}\n{end}", 1), encoding="utf-8")
        else:
            replace_section(body, begin, end, heading)
    write_blocks({name: body})
    return body


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def doc_blocks(docs: tuple[Path, ...] | None = None) -> dict[str, tuple[Path, str]]:
    """Every marker block of the docs: name -> (file, content between the markers, stripped)."""
    import re

    found: dict[str, tuple[Path, str]] = {}
    docs = DOCS if docs is None else docs
    pattern = re.compile(r"<!-- ([\w.-]+):begin -->\n(.*?)<!-- \1:end -->", re.S)
    for doc in docs:
        for match in pattern.finditer(doc.read_text(encoding="utf-8")):
            if match.group(1) in found:
                raise ValueError(f"marker {match.group(1)!r} appears twice ({found[match.group(1)][0]}, {doc})")
            found[match.group(1)] = (doc, match.group(2).strip("\n"))
    return found


def write_blocks(blocks: dict[str, str], docs: tuple[Path, ...] | None = None) -> None:
    """Replace each named block in the doc that holds its markers; unknown names are an error."""
    existing = doc_blocks(docs)
    missing = sorted(set(blocks) - set(existing))
    if missing:
        names = [d.name for d in (DOCS if docs is None else docs)]
        raise KeyError(f"no markers for {missing} in {names}: add them where the block belongs")
    for name, body in blocks.items():
        path = existing[name][0]
        begin, end = _markers(name)
        text = path.read_text(encoding="utf-8")
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        path.write_text(f"{head}{begin}\n{body.strip(chr(10))}\n{end}{tail}", encoding="utf-8")


# Every real-data training run of a benchmark: one data worker (the machine's other core is busy),
# one cache of decoded, resized images shared by all runs, few checkpoints.
REAL_DATA_RUN = ["data.num_workers=1", f"data.cache={RUNS / 'cache'}", "train.checkpoint_every=1000"]


def slug(text: str) -> str:
    """A run-folder-safe form of a variant's name (``encoder lr x0.1`` -> ``encoder_lr_x0_1``)."""
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def carve_val(source: Path, name: str, fraction: float, *, seed: int = 0, rename: dict[str, str] | None = None) -> Path:
    """A copy of a manifest whose ``val`` split is a seeded ``fraction`` of its train patients.

    Benchmarks choose recipes on this val split and read their test split once. ``rename`` maps
    the source's other split names first (BUSI: the fold's held-out ``val`` list becomes
    ``test``), so an existing val split never mixes with the carved one. Stratified by ``label``
    when the manifest has one. Written once next to ``source`` as ``<name>.csv``.
    """
    from medalign.data.manifest import Manifest, assign_splits, read_manifest, write_manifest

    path = source.with_name(f"{name}.csv")
    if path.is_file():
        return path
    manifest = read_manifest(source)
    table = manifest.table.copy()
    table["split"] = table["split"].replace(rename or {})
    if (table["split"] == "val").any():
        raise ValueError(f"{source} already has a val split; rename it (rename={{'val': ...}})")
    train = table["split"] == "train"
    stratify = "label" if "label" in table.columns else None
    carved = assign_splits(table[train], {"train": 1 - fraction, "val": fraction}, seed=seed, stratify=stratify)
    table.loc[train, "split"] = carved.values
    write_manifest(Manifest(table, manifest.base_dir, manifest.meta), path)
    return path
