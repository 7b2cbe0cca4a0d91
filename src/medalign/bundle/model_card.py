"""``MODEL_CARD.md``: what a bundle is, what it was trained and evaluated on, and what not to use it for.

Written by :func:`medalign.bundle.save_bundle` into every bundle, from the model's own config
(architecture, towers, input description, parameter count) and the ``extra`` that
``medalign.pipeline.run.fit_and_save`` passes (``metrics``: the evaluation summary; ``recipe``: the run
folder, whose ``config.yaml`` names the training data). Every number in the card is copied from
those sources. A bundle saved without metrics still gets a card, saying it is unevaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODEL_CARD_NAME = "MODEL_CARD.md"
# Metrics worth a line in the card (the last key of a flattened metrics.json path).
HEADLINE = {
    "accuracy", "balanced_accuracy", "macro_f1", "auc", "ece", "c_index", "dice", "iou", "pooled_dice",
    "hd95", "nsd", "R@1", "R@5", "R@10", "median_rank", "reconstruction", "rouge_l", "bleu_1", "bleu_4",
}  # fmt: skip
# Metrics where a drop of at least FAILURE_GAP against the full modality set is called a failure mode.
SUBSET_METRICS = ("auc", "dice", "c_index", "accuracy")
FAILURE_GAP = 0.05
SMALL_EVALUATION = 30  # fewer evaluated cases than this: say the numbers are uncertain


def write_model_card(bundle_dir: str | Path, model: Any, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``MODEL_CARD.md`` into ``bundle_dir`` for ``model`` (see the module docstring)."""
    path = Path(bundle_dir) / MODEL_CARD_NAME
    path.write_text(model_card_text(model, extra or {}), encoding="utf-8")
    return path


def model_card_text(model: Any, extra: Mapping[str, Any]) -> str:
    """The card's Markdown."""
    from medalign.version import __version__

    config = model.portable_config()
    record = config.to_dict()
    run = _run_config(extra.get("recipe"))
    metrics = extra.get("metrics") if isinstance(extra.get("metrics"), Mapping) else None
    data = _data_summary(run, extra)
    name = run.model.name if run is not None else type(model).__name__
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [
        f"# Model card: {name}",
        "",
        f"A medalign `{model.bundle_kind}` bundle ({type(model).__name__}), written by medalign {__version__}.",
        "",
        "## Model",
        "",
        f"- architecture: {_architecture(record, type(model).__name__)}",
        f"- parameters: {total:,} ({trainable:,} trainable)",
        *_towers(record),
        "",
        "## Input",
        "",
        *_inputs(config, record, extra.get("inputs")),
        "",
        "## Training",
        "",
        *_training(run, metrics),
        "",
        "## Training data",
        "",
        *_data_lines(data),
        "",
        "## Evaluation",
        "",
        *_evaluation(metrics),
        "",
        "## Intended use",
        "",
        "Research on multi-modal medical image analysis: reproducing and comparing methods, "
        "benchmarking, and teaching. **Not for clinical decisions**: the model is not a medical "
        "device, has not been validated prospectively or on data from other sites, and its outputs "
        "must not be used to diagnose, treat or triage patients.",
        "",
        "## Limitations",
        "",
        *_limitations(record, run, metrics, data),
        "",
        "## Licence of the training data",
        "",
        _licence(data),
        "",
        "## How to load",
        "",
        "```python",
        "import medalign",
        "",
        'model = medalign.load("path/to/this/folder")  # offline; safetensors weights, no pickle',
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _run_config(recipe: Any) -> Any:
    """The run's resolved config (``<run>/config.yaml``), or None when the bundle came from elsewhere."""
    from medalign.config import ConfigError, load_config

    if not isinstance(recipe, str) or not (Path(recipe) / "config.yaml").is_file():
        return None
    try:
        return load_config(Path(recipe) / "config.yaml")
    except ConfigError:
        return None


def _data_summary(run: Any, extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """``extra["data"]`` when given, else :func:`summarize` of the run's manifest, plus its meta."""
    from medalign.data.manifest import read_manifest, summarize
    from medalign.data.run_manifest import run_manifest_path

    if isinstance(extra.get("data"), Mapping):
        return dict(extra["data"])
    if run is None:
        return None
    path = run_manifest_path(Path(extra["recipe"]), run)
    if path is None:
        return None
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError):  # moved or edited since training: the card says the data is unknown
        return None
    summary = summarize(manifest)
    summary["manifest"] = str(path)
    summary["description"] = manifest.meta.description
    summary["licence"] = manifest.meta.extra.get("licence") or manifest.meta.extra.get("license") or ""
    return summary


def flatten_scalars(tree: Any, skip: tuple[str, ...] = ("per_case",), prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and the ``skip`` keys are left out."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key in skip or isinstance(value, list):
            continue
        out.update(flatten_scalars(value, skip, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _flatten(tree: Any) -> dict[str, Any]:
    """The card's scalars: :func:`flatten_scalars` without per-case rows, subsets and bins."""
    return flatten_scalars(tree, skip=("per_case", "subsets", "reliability"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _architecture(record: Mapping[str, Any], class_name: str) -> str:
    parts = [f"`{record['arch']}`" if "arch" in record else class_name]
    for key in ("fusion", "task_head", "survival", "num_classes", "hidden_size", "channels"):
        if record.get(key) not in (None, "none"):
            parts.append(f"{key}={record[key]}")
    return ", ".join(parts)


def _towers(record: Mapping[str, Any]) -> list[str]:
    lines = []
    for name in ("vision", "text"):
        tower = record.get(name)
        if not isinstance(tower, Mapping):
            continue
        arch = tower.get("config") or {}
        details = [f"{k}={arch[k]}" for k in ("variant", "hidden_size", "num_hidden_layers", "patch_size") if k in arch]
        origin = f", initialised from `{tower['source']}`" if tower.get("source") else ""
        shape = f" ({', '.join(details)})" if details else ""
        lines.append(f"- {name} tower: {tower.get('kind')}{shape}{origin}")
    return lines


def _inputs(config: Any, record: Mapping[str, Any], inputs: Any) -> list[str]:
    from medalign.bundle.inputs import InputSpec

    lines = [
        f"- image size: {record.get('image_size', '–')} x {record.get('image_size', '–')} px",
        f"- channels: {record.get('in_channels', '–')}",
    ]
    if isinstance(inputs, Mapping):
        spec = InputSpec.from_dict(inputs)
        lines += [
            f"- modalities: {', '.join(spec.modalities)} (columns {', '.join(spec.columns)})",
            f"- takes: {spec.describe()}; normalisation `{spec.normalisation}`",
            f"- to predict: {spec.how_to_pass()}",
        ]
    elif record.get("modalities"):
        lines.append(f"- modalities: {', '.join(record['modalities'])} (one image each; any may be missing)")
    if hasattr(config, "image_stats"):
        mean, std = config.image_stats()
        lines.append(
            f"- normalisation: pixels in [0, 1], then (x - mean) / std inside the model with "
            f"mean={[round(m, 4) for m in mean]}, std={[round(s, 4) for s in std]}"
        )
    else:
        lines.append("- normalisation: pixels in [0, 1]; the network normalises internally")
    if record.get("text"):
        limit = f"up to {record['max_text_length']} tokens, " if record.get("max_text_length") else ""
        lines.append(f"- text: {limit}tokenizer in `tokenizer/`")
    return lines


def _training(run: Any, metrics: Mapping[str, Any] | None) -> list[str]:
    train = metrics.get("train") if metrics else None
    if run is None and not train:
        return [
            "No training record: this bundle was saved outside `medalign train` (untrained or trained elsewhere)."
        ]
    lines = []
    if run is not None:
        lines += [
            f"- task: {run.task}; recipe model `{run.model.name}`"
            + (f", initialised from `{run.model.init_from}`" if run.model.init_from else ""),
            f"- schedule: {run.train.epochs} epochs"
            + (f" (capped at {run.train.max_steps} steps)" if run.train.max_steps else "")
            + f", batch {run.data.batch_size}, lr {run.optim.lr}, precision {run.train.precision}, "
            f"seed {run.train.seed}",
        ]
    if isinstance(train, Mapping):
        lines.append(f"- trained: {train.get('steps')} steps in {train.get('seconds')} s")
    return lines


def _data_lines(data: Mapping[str, Any] | None) -> list[str]:
    if data is None:
        return ["Unknown: the bundle does not name its training data."]
    lines = [f"- source: {data.get('source') or 'unnamed'}; {data.get('cases')} cases"]
    if data.get("manifest"):
        lines[0] += f" (manifest `{data['manifest']}`)"
    if data.get("description"):
        lines.append(f"- description: {data['description']}")
    if isinstance(data.get("splits"), Mapping):
        lines.append("- splits: " + ", ".join(f"{k} {v}" for k, v in data["splits"].items()))
    for column, counts in (data.get("labels") or {}).items():
        lines.append(f"- {column}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return lines


def _evaluation(metrics: Mapping[str, Any] | None) -> list[str]:
    if not metrics:
        return [
            "**Unevaluated**: this bundle carries no metrics (it is untrained, or was saved without an evaluation)."
        ]
    rows = [
        (k, v)
        for k, v in _flatten(metrics).items()
        if k.split(".")[-1] in HEADLINE and not k.startswith("train")
    ]
    lines = [f"On the `{metrics.get('split', '?')}` split (the evaluation saved with this bundle):", ""]
    lines += ["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows)]
    subsets = metrics.get("subsets")
    if isinstance(subsets, Mapping) and subsets:
        flat = {name: _flatten(values) for name, values in subsets.items()}
        columns = [
            c for c in dict.fromkeys(k for v in flat.values() for k in v) if c.split(".")[-1] in HEADLINE
        ]
        lines += ["", "Per modality subset (the others hidden from the model):", ""]
        lines += ["| modalities | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [
            f"| {name} | " + " | ".join(_fmt(v.get(c)) for c in columns) + " |" for name, v in flat.items()
        ]
    return lines


def failure_modes(metrics: Mapping[str, Any]) -> list[str]:
    """Weak spots the metrics show: classes rarely recalled, weak modality subsets, worst-value images."""
    found = []
    for path, value in _flatten(metrics).items():
        if ".per_class_recall." in f".{path}" and isinstance(value, float) and value < 0.5:
            found.append(f"class `{path.rsplit('.', 1)[-1]}` has recall {value:.4f} ({path})")
        if path.endswith("hd95_worst") and isinstance(value, int) and value > 0:
            found.append(
                f"{value} images have an empty prediction or an empty ground truth (not both): "
                "HD95 scores them with the image diagonal and NSD with 0"
            )
        if path.split(".")[-1] == "auc" and value is None:
            found.append(f"AUC undefined ({path}): fewer than two classes among the evaluated cases")
    subsets = metrics.get("subsets")
    if isinstance(subsets, Mapping) and len(subsets) > 1:
        flat = {name: _flatten(values) for name, values in subsets.items()}
        full_name, full = list(flat.items())[-1]
        for name, values in list(flat.items())[:-1]:
            for key, value in values.items():
                reference = full.get(key)
                comparable = isinstance(value, float) and isinstance(reference, float)
                if comparable and key.split(".")[-1] in SUBSET_METRICS and reference - value >= FAILURE_GAP:
                    found.append(
                        f"with only `{name}`: {key} {value:.4f} vs {reference:.4f} with `{full_name}`"
                    )
    return found


def _limitations(
    record: Mapping[str, Any], run: Any, metrics: Mapping[str, Any] | None, data: Mapping[str, Any] | None
) -> list[str]:
    lines = []
    if data is not None:
        lines.append(
            f"- Trained on {data.get('source') or 'one dataset'} only ({data.get('cases')} cases); expect worse "
            "results on other scanners, sites, populations and protocols."
        )
    if "image_size" in record:
        lines.append(
            f"- Trained at {record['image_size']} px: images are resized to it, so structures smaller "
            "than a few pixels at that size are lost."
        )
    if metrics and isinstance(metrics.get("train"), Mapping):
        lines.append(
            f"- Trained for {metrics['train'].get('steps')} steps. The shipped recipes use short schedules sized "
            "for a CPU, far shorter than published ones; the numbers are those of such a schedule."
        )
    if not metrics:
        lines.append("- Untrained or unevaluated: nothing is known about its accuracy.")
    else:
        n = metrics.get("n", metrics.get("n_images", metrics.get("n_cases")))
        if isinstance(n, int) and n < SMALL_EVALUATION:
            lines.append(f"- Evaluated on only {n} cases: the metrics carry wide uncertainty.")
        lines += [f"- Known failure mode: {m}." for m in failure_modes(metrics)]
    if run is None and data is None:
        lines.append("- Training data and recipe unknown (the bundle was saved outside `medalign train`).")
    return lines


def _licence(data: Mapping[str, Any] | None) -> str:
    if data is None:
        return "Unknown: the bundle does not name its training data; find out before sharing the model."
    if data.get("licence"):
        return f"{data['licence']} (from the manifest's metadata)."
    if data.get("source") == "phantom":
        return "Synthetic data generated by medalign (the built-in phantom): no patient data, no third-party terms."
    source = data.get("source") or "the training dataset"
    return (
        f"Not recorded in the manifest. The terms of use of {source} apply to this model's weights as a "
        "derivative; check them before redistributing it."
    )
