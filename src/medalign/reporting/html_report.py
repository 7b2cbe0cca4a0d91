"""One self-contained HTML page per run folder: what was trained, on what, and how well.

``write_html_report(run_dir)`` reads only what the run wrote (``config.yaml``, ``metrics.json``,
``logs/metrics.csv``, ``bundle/config.json``, the PNGs beside them, ``reports.jsonl``) and
renders ``report.html``: inline CSS, every image a base64 ``data:`` URI, no script and no
external URL, so the file can be mailed, archived or opened on an offline machine.
``write_eval_report`` renders the page of a ``medalign eval`` command (``FILE.html`` beside its
``--out FILE.json``) with the same sections: its ``RunFiles`` is synthesised from the bundle,
the manifest and the command's arguments instead of read from a run folder.

Every number on the page is copied from the run's files, never recomputed (a recomputation
could disagree with ``metrics.json``). The exceptions are pictures: learning curves, the
confusion matrix and ROC curves are drawn from saved values (``per_case`` probability rows),
segmentation overlays re-predict the best and worst cases (by the saved Dice) with the bundle,
using the run's own preprocessing, because masks are not saved, and retrieval examples show
their query images read from the run's manifest beside the saved top texts.
"""

# Why one module: one self-contained page: every section reads the same run files and uses the
# same HTML and figure helpers.

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from medalign.bundle.model_card import flatten_scalars
from medalign.data.run_manifest import run_manifest_path

REPORT_NAME = "report.html"
OVERLAY_CASES = 3  # best and worst cases shown as segmentation overlays
REPORT_EXAMPLES = 5  # reports.jsonl rows shown for report generation
HEADLINE_KEYS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auc", "ece")
SEGMENTATION_KEYS = (
    "dice", "iou", "dice_std", "pooled_dice", "hd95", "hd95_worst", "nsd", "n_images", "n_empty_gt"
)  # fmt: skip
RETRIEVAL_PAIRS = (("image_to_text", "text_to_image"), ("first_to_second", "second_to_first"))

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.meta td{text-align:left}.note{color:#666;font-style:italic}pre{background:#f7f7f7;padding:1em;overflow:auto}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}.examples td{text-align:left;vertical-align:top}
.examples img{max-width:240px}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
"""


class RunReportError(ValueError):
    """A folder cannot be reported on; the message names the folder and the missing/bad file."""


@dataclass
class RunFiles:
    """What a run folder holds, read once; or what an evaluation wrote (``evaluation`` set)."""

    run_dir: Path  # the run folder, or the folder of an evaluation's metrics file (figures live here)
    config: Any  # medalign.config.RunConfig (an evaluation's is synthesised from its arguments)
    config_text: str
    metrics: dict[str, Any]
    bundle: dict[str, Any] | None  # bundle/config.json, None when the run has no bundle
    curves: Any  # pandas DataFrame (step, key, value) of train/* rows, or None
    metrics_file: Path | None = None  # default run_dir/metrics.json
    bundle_dir: Path | None = None  # default run_dir/bundle
    evaluation: dict[str, Any] | None = None  # a `medalign eval` command's arguments; None for a run

    @property
    def metrics_path(self) -> Path:
        return self.metrics_file or self.run_dir / "metrics.json"

    @property
    def bundle_path(self) -> Path:
        return self.bundle_dir or self.run_dir / "bundle"


# ---------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------


def read_run(run_dir: str | Path) -> RunFiles:
    """The files of a run folder; a missing folder, config.yaml or metrics.json is a RunReportError."""
    from medalign.config import ConfigError, load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunReportError(f"run folder '{run_dir}' does not exist")
    for name in ("config.yaml", "metrics.json"):
        if not (run_dir / name).is_file():
            raise RunReportError(
                f"'{run_dir}' is not a finished run folder: {name} is missing "
                "(`medalign train` writes it when training and evaluation complete)"
            )
    try:
        config = load_config(run_dir / "config.yaml")
    except ConfigError as err:
        raise RunReportError(f"'{run_dir / 'config.yaml'}': {err}") from err
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunReportError(f"cannot parse '{run_dir / 'metrics.json'}': {err}") from err
    if not isinstance(metrics, dict):
        raise RunReportError(f"'{run_dir / 'metrics.json'}' must hold a JSON object")
    bundle_file = run_dir / "bundle" / "config.json"
    bundle = json.loads(bundle_file.read_text(encoding="utf-8")) if bundle_file.is_file() else None
    return RunFiles(
        run_dir=run_dir,
        config=config,
        config_text=(run_dir / "config.yaml").read_text(encoding="utf-8"),
        metrics=metrics,
        bundle=bundle,
        curves=_read_curves(run_dir / "logs" / "metrics.csv"),
    )


def read_eval(
    metrics: dict[str, Any], metrics_file: Path, bundle_dir: Path, config: Any, arguments: dict[str, Any]
) -> RunFiles:
    """An evaluation as a report source: ``config`` carries the manifest (``data.manifest``), the
    split (``eval.split``) and the columns the command used, so sections re-read data as it did."""
    bundle_file = bundle_dir / "config.json"
    bundle = json.loads(bundle_file.read_text(encoding="utf-8")) if bundle_file.is_file() else None
    return RunFiles(
        run_dir=metrics_file.parent,
        config=config,
        config_text=yaml_text(arguments),
        metrics=metrics,
        bundle=bundle,
        curves=None,
        metrics_file=metrics_file,
        bundle_dir=bundle_dir,
        evaluation=arguments,
    )


def yaml_text(values: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}, sort_keys=False)


def _read_curves(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        return None
    table = pd.read_csv(path)
    if not {"step", "key", "value"} <= set(table.columns):
        return None
    table = table[table["key"].astype(str).str.startswith("train/")]
    return table if len(table) else None


def report_manifest(run: RunFiles) -> tuple[Path, Any]:
    """The run's manifest as training saw it (one row per modality when ``data.modality_rows``)."""
    from medalign.data.manifest import read_manifest
    from medalign.data.run_manifest import modality_rows

    config = run.config
    path = run_manifest_path(run.run_dir, config)
    if path is None:
        raise FileNotFoundError(
            f"the run's manifest ({config.data.manifest or 'data/phantom'}) is not available"
        )
    manifest = read_manifest(path)
    if config.data.modality_rows:
        manifest = modality_rows(manifest, config.data.modalities or manifest.image_columns)
    return path, manifest


# ---------------------------------------------------------------------------------------------
# HTML and figure helpers
# ---------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """How a value appears on the page (tests format expected numbers the same way)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>'


def _key_values(pairs: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> str:
    chosen = [(k, pairs[k]) for k in (keys or tuple(pairs)) if k in pairs and _is_scalar(pairs[k])]
    return _table(["metric", "value"], [[k, v] for k, v in chosen])


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _walk(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every dict in ``tree`` with its key path (lists such as per_case rows are not entered)."""
    if isinstance(tree, dict):
        yield path, tree
        for key, value in tree.items():
            if key != "subsets":
                yield from _walk(value, (*path, str(key)))


def _title(path: tuple[str, ...], default: str) -> str:
    return " / ".join(path) if path else default


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _header(run: RunFiles) -> str:
    if run.evaluation is not None:
        return _eval_header(run, run.evaluation)
    from medalign.version import __version__

    config = run.config
    written = dt.datetime.fromtimestamp(run.metrics_path.stat().st_mtime)
    rows = [
        ["task", config.task],
        ["model", config.model.name],
        ["run folder", str(run.run_dir.resolve())],
        ["evaluated on", run.metrics.get("split", config.eval.split)],
        ["run finished", written.strftime("%Y-%m-%d %H:%M")],
        ["report written", dt.datetime.now().strftime("%Y-%m-%d %H:%M")],
        ["medalign version", __version__],
    ]
    train = run.metrics.get("train", {})
    if isinstance(train, dict):
        rows += [["training steps", train.get("steps")], ["training seconds", train.get("seconds")]]
    return f"<h1>medalign run: {html.escape(config.task)} · {html.escape(config.model.name)}</h1>" + _table(
        ["", ""], rows, "meta"
    )


def _eval_header(run: RunFiles, arguments: dict[str, Any]) -> str:
    from medalign.version import __version__

    split = run.metrics.get("split", run.config.eval.split)
    written = dt.datetime.fromtimestamp(run.metrics_path.stat().st_mtime)
    rows = [
        ["command", f"medalign {arguments['command']}"],
        ["bundle", str(run.bundle_path.resolve())],
        ["manifest", str(Path(run.config.data.manifest).resolve())],
        ["split", split],
        ["metrics file", str(run.metrics_path.resolve())],
        ["evaluated", written.strftime("%Y-%m-%d %H:%M")],
        ["report written", dt.datetime.now().strftime("%Y-%m-%d %H:%M")],
        ["medalign version", __version__],
    ]
    title = f"Evaluation of {run.bundle_path} on {run.config.data.manifest} ({split})"
    return f"<h1>medalign {html.escape(arguments['command'])}</h1><p>{html.escape(title)}</p>" + _table(
        ["", ""], rows, "meta"
    )


def _config_section(run: RunFiles) -> str:
    what = "resolved config.yaml" if run.evaluation is None else "evaluation arguments"
    out = "<h2>Configuration</h2>"
    out += f"<details><summary>{what}</summary><pre>{html.escape(run.config_text)}</pre></details>"
    if run.bundle is not None:
        model = run.bundle.get("model", {})
        rows = [["bundle kind", run.bundle.get("kind")]]
        rows += [[k, model[k]] for k in ("arch", "image_size", "in_channels", "modalities") if k in model]
        rows.append(
            ["values in model.safetensors", _stored_values(run.bundle_path / "model.safetensors")]
        )
        out += _table(["model", ""], rows, "meta")
        out += (
            "<details><summary>bundle config.json (model)</summary>"
            f"<pre>{html.escape(json.dumps(model, indent=2))}</pre></details>"
        )
    else:
        out += _note(f"No bundle at {run.bundle_path}.")
    return out


def _stored_values(path: Path) -> int | None:
    """Number of values stored in the weights file (parameters and buffers), read from its header."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
            count = 1
            for size in handle.get_slice(name).get_shape():
                count *= size
            total += count
    return total


def _data_section(run: RunFiles) -> str:
    from medalign.data.manifest import read_manifest, summarize

    out = "<h2>Data</h2>"
    path = run_manifest_path(run.run_dir, run.config)
    if path is None:
        where = run.config.data.manifest or "the run's data/phantom folder"
        return out + _note(f"The manifest ({where}) is not available here; no data summary.")
    summary = summarize(read_manifest(path))
    rows = [["manifest", str(path)], ["source", summary.get("source") or "–"], ["cases", summary["cases"]]]
    if "patients" in summary:
        rows.append(["patients", summary["patients"]])
    rows.append(["modalities", ", ".join(summary["modalities"])])
    for name, count in summary.get("masks", {}).items():
        rows.append([f"masks ({name})", count])
    if "texts" in summary:
        rows.append(
            ["texts (mean words)", f"{summary['texts']['non_empty']} ({summary['texts']['mean_words']})"]
        )
    if "survival" in summary:
        survival = summary["survival"]
        rows.append(
            ["survival", f"median time {survival['median_time']:.4g}, event rate {survival['event_rate']}"]
        )
    out += _table(["", ""], rows, "meta")
    if "splits" in summary:
        out += "<h3>Splits</h3>" + _table(list(summary["splits"]), [list(summary["splits"].values())])
    for column, counts in summary.get("labels", {}).items():
        out += f"<h3>{html.escape(column)}</h3>" + _table(
            ["class", "cases"], [[k, v] for k, v in counts.items()]
        )
    return out


def _curves_section(run: RunFiles) -> str:
    if run.evaluation is not None:  # an evaluation trains nothing
        return ""
    out = "<h2>Learning curves</h2>"
    if run.curves is None:
        return out + _note("logs/metrics.csv holds no train/* values.")
    keys = sorted(
        run.curves["key"].unique(), key=lambda k: (k != "train/loss", k in ("train/lr", "train/epoch"), k)
    )
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    figure = _figure(3.6 * cols, 2.6 * rows)
    for i, key in enumerate(keys):
        ax = figure.add_subplot(rows, cols, i + 1)
        series = run.curves[run.curves["key"] == key].sort_values("step")
        ax.plot(series["step"], series["value"].astype(float), marker="o" if len(series) < 20 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    return out + _img(_png(figure), "learning curves")


def _confusion_png(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    import numpy as np

    values = np.asarray(matrix)
    figure = _figure(1.2 + 0.7 * len(classes), 1.0 + 0.6 * len(classes))
    ax = figure.add_subplot()
    ax.imshow(values, cmap="Blues")
    for (i, j), count in np.ndenumerate(values):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            color="black" if count <= values.max() / 2 else "white",
        )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _png(figure)


def _roc_png(per_case: list[dict[str, Any]], block: Mapping[str, Any]) -> bytes | None:
    """One-vs-rest ROC curves from the saved per-case probabilities; AUCs in the legend from metrics.json."""
    import numpy as np
    from sklearn.metrics import roc_curve

    rows = [r for r in per_case if "probs" in r and r.get("label", -1) >= 0]
    classes = list(block["class_names"])
    if not rows or any(list(r["probs"]) != classes for r in rows):
        return None
    labels = np.array([r["label"] for r in rows])
    probs = np.array([[r["probs"][c] for c in classes] for r in rows])
    figure = _figure(4.2, 4.0)
    ax = figure.add_subplot()
    for k, name in enumerate(classes):
        if (labels == k).any() and (labels != k).any():
            fpr, tpr, _ = roc_curve(labels == k, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {fmt(block['per_class_auc'].get(name))})")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one-vs-rest", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(figure)


def _probability_rows(run: RunFiles, path: tuple[str, ...], block: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-case rows behind a classification block: its own (zero-shot) or, for a clinical
    run's diagnosis, the top-level rows it shares with the survival block."""
    if isinstance(block.get("per_case"), list):
        return block["per_case"]
    return run.metrics.get("per_case", []) if path == ("diagnosis",) else []


def _classification_sections(run: RunFiles, used: set[str]) -> str:
    out = ""
    for path, block in _walk(run.metrics):
        if "confusion_matrix" not in block or "class_names" not in block:
            continue
        title = _title(path, "classification")
        classes = list(block["class_names"])
        out += f"<h2>Classification: {html.escape(title)}</h2>" + _key_values(block, HEADLINE_KEYS)
        out += _table(
            ["class", "recall", "AUC (one-vs-rest)"],
            [
                [c, block.get("per_class_recall", {}).get(c), block.get("per_class_auc", {}).get(c)]
                for c in classes
            ],
        )
        out += _img(
            _confusion_png(block["confusion_matrix"], classes, f"confusion matrix: {title}"), "confusion"
        )
        roc = _roc_png(_probability_rows(run, path, block), block)
        if roc is not None:
            out += _img(roc, "ROC curves")
        else:
            out += _note("No ROC curves: the run does not save per-case scores for this evaluation.")
        out += _run_png(run, block.get("figure"), used)
    return out


def _run_png(run: RunFiles, name: Any, used: set[str]) -> str:
    if not isinstance(name, str) or not (run.run_dir / name).is_file():
        return ""
    used.add(name)
    return _img((run.run_dir / name).read_bytes(), name)


def _retrieval_sections(run: RunFiles) -> str:
    out = ""
    for path, block in _walk(run.metrics):
        for first, second in RETRIEVAL_PAIRS:
            if isinstance(block.get(first), dict) and isinstance(block.get(second), dict):
                ks = [k for k in block[first] if k.startswith("R@")]
                header = ["direction", *ks, "median_rank", "mean_rank", "n_queries"]
                rows = [[d, *(block[d].get(k) for k in header[1:])] for d in (first, second)]
                out += f"<h2>Retrieval: {html.escape(_title(path, 'retrieval'))}</h2>" + _table(header, rows)
                if isinstance(block.get("examples"), list) and block["examples"]:
                    out += _retrieval_examples(run, block["examples"])
    return out


def _retrieval_examples(run: RunFiles, examples: list[dict[str, Any]]) -> str:
    """Query thumbnails beside their saved top texts (the ranking is the run's, not redone here)."""
    k = max(len(e["top"]) for e in examples)
    out = f"<h3>Examples: top {k} texts for {len(examples)} query images</h3>"
    try:
        pictures = [
            _img(png, f"query {e['case_id']}")
            for e, png in zip(examples, query_thumbnails(run, examples), strict=True)
        ]
    except (OSError, ValueError, KeyError) as err:  # manifest or images not on this machine, ...
        pictures = [""] * len(examples)
        out += _note(f"Thumbnails left out: {err}")
    rows = ""
    for example, picture in zip(examples, pictures, strict=True):
        ranked = "".join(
            f"<li>{'✓' if t['correct'] else '✗'} {html.escape(t['text'])} ({fmt(t['similarity'])})</li>"
            for t in example["top"]
        )
        rows += (
            f"<tr><td>{picture}<br>{html.escape(example['case_id'])}</td>"
            f"<td>{html.escape(example['text'])}</td><td><ol>{ranked}</ol></td></tr>"
        )
    out += f'<table class="examples"><tr><th>query image</th><th>its own text</th><th>retrieved (cosine)</th></tr>{rows}</table>'
    return out + _note(
        "Distinct texts of the split ranked by cosine similarity to the image; ✓ = the query's own "
        "text (the R@K rule)."
    )


def query_thumbnails(run: RunFiles, examples: list[dict[str, Any]]) -> list[bytes]:
    """One PNG per example: each of the case's image columns, read from the run's manifest."""
    from medalign.data.readers import read_image
    from medalign.tasks.columns import image_columns

    path, manifest = report_manifest(run)
    keys = image_columns(run.config, manifest)
    index = {c: i for i, c in enumerate(manifest.table["case_id"])}
    pictures = []
    for example in examples:
        if example["case_id"] not in index:
            raise KeyError(f"case {example['case_id']!r} of metrics.json is not in {path}")
        figure = _figure(1.7 * len(keys), 1.9)
        for i, key in enumerate(keys):
            ax = figure.add_subplot(1, len(keys), i + 1)
            cell = manifest.table.at[index[example["case_id"]], key]
            if cell:
                ax.imshow(_displayable(read_image(manifest.resolve(cell)).array), cmap="gray")
            ax.set_title(key, fontsize=7)
            ax.axis("off")
        pictures.append(_png(figure))
    return pictures


def _displayable(array: Any) -> Any:
    """A 2D grey or RGB picture of any image: the middle slice of a volume, RGB kept, else channel 0."""
    import numpy as np

    from medalign.data.transforms import to_channel_first

    image = to_channel_first(array)
    if image.ndim == 4:  # (C, D, H, W)
        image = image[:, image.shape[1] // 2]
    if image.shape[0] not in (3, 4):
        return image[0]
    rgb = np.moveaxis(image[:3], 0, -1).astype(np.float64)
    return (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-12)


def _segmentation_section(run: RunFiles) -> str:
    metrics = run.metrics
    if "dice" not in metrics or not isinstance(metrics.get("per_case"), list):
        return ""
    out = "<h2>Segmentation</h2>" + _key_values(metrics, SEGMENTATION_KEYS) + _prompt_ablation(metrics)
    cases = [r for r in metrics["per_case"] if isinstance(r.get("dice"), (int, float))]
    ranked = sorted(cases, key=lambda r: r["dice"])
    groups = [("best", ranked[::-1][:OVERLAY_CASES]), ("worst", ranked[:OVERLAY_CASES])]
    try:
        pictures = segmentation_overlays(run, groups)
    except (OSError, ValueError, KeyError) as err:  # no bundle or data on this machine, ...
        return out + _note(f"Overlays left out: {err}")
    for (name, rows), png in zip(groups, pictures, strict=True):
        cases = ", ".join(f"{r['case_id']} (Dice {fmt(r['dice'])})" for r in rows)
        out += f"<h3>{name} {len(rows)} cases by Dice</h3>" + _img(png, f"{name} cases: {cases}")
    return out + _note(
        "Overlays: green outline = ground truth, red fill = prediction (probability > 0.5), re-predicted with the bundle."
    )


PROMPT_ABLATION_NOTE = (
    "The same images and targets, with each prompt replaced: 'shuffled' = another image's "
    "prompt (one that differs from the true one), 'empty' = no prompt. A model that reads "
    "its prompt loses Dice without the true one; one that ignores it scores the same in all three rows."
)


def _prompt_ablation(metrics: Mapping[str, Any]) -> str:
    """True / shuffled / empty prompt side by side (prompt-guided models only)."""
    ablation = metrics.get("prompt_ablation")
    if not isinstance(ablation, Mapping):
        return ""
    columns = ("dice", "iou", "pooled_dice", "n_images")
    rows = [[variant, *(values.get(c) for c in columns)] for variant, values in ablation.items()]
    return "<h3>Prompt ablation</h3>" + _table(["prompt", *columns], rows) + _note(PROMPT_ABLATION_NOTE)


def segmentation_overlays(run: RunFiles, groups: list[tuple[str, list[dict[str, Any]]]]) -> list[bytes]:
    """One PNG per group: each case's first image channel with ground truth and prediction outlines."""
    import torch

    from medalign.bundle import load_bundle
    from medalign.data.dataset import Collator
    from medalign.tasks.columns import fusion_columns, image_columns
    from medalign.tasks.fuse import fusion_dataset
    from medalign.tasks.segment import segmentation_dataset

    config, split = run.config, run.metrics.get("split", run.config.eval.split)
    path, manifest = report_manifest(run)
    model = load_bundle(run.bundle_path)
    fuse = config.task == "fuse"
    if fuse:
        keys = fusion_columns(config, manifest, model)
        dataset = fusion_dataset(config, manifest, model, keys, split, augment=False)
    else:
        keys = image_columns(config, manifest)
        dataset = segmentation_dataset(config, manifest, model, keys, split, augment=False)
    index = {c: i for i, c in enumerate(dataset.manifest.table["case_id"])}
    collate = Collator(model.tokenizer, max_length=config.data.text_max_length)
    pictures = []
    for _, rows in groups:
        missing = [r["case_id"] for r in rows if r["case_id"] not in index]
        if missing:
            raise KeyError(f"cases {missing} of metrics.json are not in split {split!r} of {path}")
        batch = collate([dataset[index[r["case_id"]]] for r in rows])
        with torch.no_grad():
            if fuse:
                from medalign.tasks.fuse import predict

                probs = predict(model, batch, keys, batch["modalities_present"].bool()).numpy()
            else:
                from medalign.tasks.segment import predict_probabilities

                probs = predict_probabilities(model, batch, keys)
        images = batch[keys[0]][:, 0].numpy()
        masks = batch[config.data.mask][:, 0].numpy()
        pictures.append(_overlay_png(images, masks, probs > 0.5, rows))
    return pictures


def _overlay_png(images: Any, masks: Any, predictions: Any, rows: list[dict[str, Any]]) -> bytes:
    import numpy as np
    from matplotlib.colors import ListedColormap

    red = ListedColormap(["red"])
    figure = _figure(2.6 * len(rows), 2.9)
    for i, row in enumerate(rows):
        ax = figure.add_subplot(1, len(rows), i + 1)
        ax.imshow(images[i], cmap="gray")
        ax.imshow(np.ma.masked_where(~predictions[i], predictions[i]), cmap=red, alpha=0.45)
        truth = masks[i] > 0.5
        if truth.any() and not truth.all():
            ax.contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
        ax.set_title(f"{row['case_id']}\nDice {fmt(row['dice'])}", fontsize=8)
        ax.axis("off")
    return _png(figure)


def _subsets_section(run: RunFiles) -> str:
    subsets = run.metrics.get("subsets")
    if not isinstance(subsets, dict) or not subsets:
        return ""
    flat = {name: flatten_scalars(values) for name, values in subsets.items()}
    columns = list(dict.fromkeys(k for values in flat.values() for k, v in values.items() if _is_scalar(v)))
    rows = [[name, *(values.get(c) for c in columns)] for name, values in flat.items()]
    return (
        "<h2>Per modality subset</h2>"
        + _note("Each row hides the other modalities from the model; the last row is the full set.")
        + _table(["modalities", *columns], rows)
    )


def _survival_sections(run: RunFiles, used: set[str]) -> str:
    out = ""
    for path, block in _walk(run.metrics):
        if "c_index" not in block or "risk_groups" not in block:
            continue
        rows = [["n", block.get("n")], ["events", block.get("n_events")], ["C-index", block["c_index"]]]
        td = block.get("td_auc")
        if isinstance(td, dict):
            rows += [
                [f"td-AUC at t={t:.4g}", a]
                for t, a in zip(td.get("times", []), td.get("auc", []), strict=False)
            ]
            rows.append(["td-AUC mean", td.get("mean")])
        groups = block["risk_groups"]
        rows += [["low-risk cases", groups.get("n_low")], ["high-risk cases", groups.get("n_high")]]
        if groups.get("logrank"):
            rows.append(["log-rank p", groups["logrank"].get("p_value")])
        out += f"<h2>Survival: {html.escape(_title(path, 'survival'))}</h2>" + _table(
            ["metric", "value"], rows
        )
        out += _note(str(groups.get("rule", ""))) + _run_png(run, block.get("figure"), used)
    return out


def _report_section(run: RunFiles) -> str:
    metrics = run.metrics
    if not isinstance(metrics.get("generated"), dict) or "rouge_l" not in metrics["generated"]:
        return ""
    systems = [s for s in ("generated", "retrieval", "constant") if isinstance(metrics.get(s), dict)]
    columns = list(metrics["generated"])
    out = "<h2>Report generation</h2>" + _table(
        ["system", *columns], [[s, *(metrics[s].get(c) for c in columns)] for s in systems]
    )
    out += _key_values(metrics, ("n_cases", "mean_generated_words", "mean_reference_words",
                                 "generated_repeating_3gram", "reference_repeating_3gram"))  # fmt: skip
    if isinstance(metrics.get("findings"), dict):
        flat = flatten_scalars(metrics["findings"])
        out += "<h3>Findings</h3>" + _table(["metric", "value"], [[k, v] for k, v in flat.items()])
    path = run.run_dir / "reports.jsonl"
    if path.is_file():
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [
            [r["case_id"], r["reference"], r["generated"], r.get("retrieved")]
            for r in lines[:REPORT_EXAMPLES]
        ]
        out += f"<h3>Examples (first {len(rows)} of {len(lines)})</h3>"
        out += _table(["case", "reference", "generated", "retrieved"], rows, "examples")
    return out


def _pretrain_section(run: RunFiles) -> str:
    if "reconstruction" not in run.metrics or "mask_ratio" not in run.metrics:
        return ""
    keys = ("reconstruction", "n_reconstructed", "mask_ratio", "mask_seed", "n_pairs", "views")
    return "<h2>Pretraining</h2>" + _key_values(run.metrics, keys)


def _other_figures(run: RunFiles, used: set[str]) -> str:
    if run.evaluation is not None:  # an --out folder may hold anyone's PNGs; metrics name the eval's own
        return ""
    rest = sorted(p.name for p in run.run_dir.glob("*.png") if p.name not in used)
    if not rest:
        return ""
    return "<h2>Other figures</h2>" + "".join(
        f"<h3>{html.escape(n)}</h3>{_run_png(run, n, used)}" for n in rest
    )


def _all_metrics(run: RunFiles) -> str:
    flat = flatten_scalars(run.metrics)
    return (
        "<h2>All metrics</h2><details><summary>every scalar of metrics.json</summary>"
        + _table(["key", "value"], [[k, v] for k, v in flat.items()])
        + "</details>"
    )


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def build_html(run: RunFiles) -> str:
    """The whole page for a run, sections in reading order; task sections appear when metrics hold them."""
    used: set[str] = set()
    body = "".join(
        [
            _header(run),
            _config_section(run),
            _data_section(run),
            _curves_section(run),
            _pretrain_section(run),
            _segmentation_section(run),
            _classification_sections(run, used),
            _survival_sections(run, used),
            _subsets_section(run),
            _retrieval_sections(run),
            _report_section(run),
            _other_figures(run, used),
            _all_metrics(run),
        ]
    )
    name = run.run_dir.name if run.evaluation is None else run.metrics_path.name
    title = html.escape(f"medalign report: {name}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


ABLATION_REPORT_NAME = "ablation.html"


def _ablation_png(rows: list[dict[str, Any]], headline: list[str], seeds: int) -> bytes:
    """One panel per headline metric: a bar per chain at the mean over seeds, the sample std as
    error bar and every seed's value as a dot (so a spread of three is seen, not summarised away)."""
    keys = [k for k in headline if any(isinstance(row.get(k), float) for row in rows)]
    figure = _figure(max(3.0, 2.6 * len(keys)), 3.0)
    for i, key in enumerate(keys):
        axes = figure.add_subplot(1, len(keys), i + 1)
        means = [row.get(key) if isinstance(row.get(key), float) else 0.0 for row in rows]
        stds = [row.get("std", {}).get(key) or 0.0 for row in rows]
        positions = list(range(len(rows)))
        axes.bar(positions, means, yerr=stds if seeds > 1 else None, capsize=4, color="#9ecae1")
        for x, row in zip(positions, rows, strict=True):
            values = [v for v in row.get("per_seed", {}).get(key, []) if isinstance(v, (int, float))]
            axes.plot([x] * len(values), values, "k.", markersize=4)
        axes.set_xticks(positions, [row["stages"] for row in rows])
        axes.set_title(key, fontsize=9)
        low = min(means) - 2 * max(stds)
        axes.set_ylim(max(0.0, low - 0.05), None)
    return _png(figure)


def ablation_html(result: dict[str, Any]) -> str:
    """The page of a curriculum ablation (``medalign ablate``): each chain's headline metrics."""
    rows, headline, seeds = result["rows"], list(result["headline"]), list(result.get("seeds") or [0])
    spread = len(seeds) > 1
    header = ["stages run", *headline]
    table_rows = [
        [
            row["stages"],
            *(
                f"{fmt(row.get(k))} ± {fmt(row['std'].get(k))}" if spread and row.get(k) is not None else row.get(k)
                for k in headline
            ),
        ]
        for row in rows
    ]
    what = (
        f"mean ± sample standard deviation over {len(seeds)} training seeds ({fmt(seeds)}); "
        "dots: each seed's value"
        if spread
        else f"one training seed ({seeds[0]}): differences smaller than the seed spread are noise"
    )
    body = (
        f"<h1>Curriculum ablation: {html.escape(Path(result['curriculum']).name)}</h1>"
        + _note(f"The last stage's test metrics for each chain of stages; {what}.")
        + "<h2>Chains side by side</h2>"
        + _table(header, table_rows)
        + _img(_ablation_png(rows, headline, len(seeds)), "chain comparison with error bars")
        + "<h2>Run folders</h2>"
        + _table(["stages run", "runs"], [[row["stages"], "; ".join(row.get("runs", []))] for row in rows], "meta")
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>medalign ablation</title>'
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def write_ablation_report(out: str | Path, result: dict[str, Any]) -> Path:
    """Write ``out/ablation.html`` (self-contained, like the run reports); returns its path."""
    path = Path(out) / ABLATION_REPORT_NAME
    path.write_text(ablation_html(result), encoding="utf-8")
    return path


def write_html_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's self-contained HTML report (default ``run_dir/report.html``); returns its path."""
    run = read_run(run_dir)
    path = Path(out) if out is not None else run.run_dir / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_html(run), encoding="utf-8")
    return path


def write_eval_report(
    metrics: dict[str, Any], metrics_file: Path, bundle_dir: Path, config: Any, arguments: dict[str, Any]
) -> Path:
    """Write ``metrics_file`` with ``.html``: the page of one ``medalign eval`` command; returns its path."""
    path = metrics_file.with_suffix(".html")
    page = build_html(read_eval(metrics, metrics_file, bundle_dir, config, arguments))
    path.write_text(page, encoding="utf-8")
    return path


def report_command(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A run folder written by `medalign train` (config.yaml, metrics.json, ...)."),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML file to write (default: RUN_DIR/report.html).")
    ] = None,
) -> None:
    """Write a self-contained HTML report of a run: config, data, curves, metrics and figures.

    Images are embedded and nothing is fetched, so the file opens offline. Example:

        medalign report runs/segment_phantom_text --out segment.html
    """
    try:
        path = write_html_report(run_dir, out)
    except RunReportError as err:
        from medalign.cli_grammar import fail

        raise fail(str(err)) from err
    typer.echo(f"wrote {path}")
