"""``medalign eval ...``: score a trained bundle on a manifest split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from medalign.cli.app import ModalityOption, eval_app
from medalign.cli_grammar import fail


def _bundle_columns(loaded_model: Any, loaded: Any, modality: list[str] | None) -> tuple[Any, list[str]]:
    """The manifest (one row per modality for ``any``-layout bundles) and the image columns the
    bundle's input record asks for (``--modality`` maps others onto them, in order)."""
    from medalign.bundle.inputs import input_spec
    from medalign.data.run_manifest import modality_rows

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
    from medalign.bundle import load_bundle
    from medalign.data.dataset import dataset_for_model
    from medalign.data.manifest import read_manifest
    from medalign.evaluation import alignment as ev

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
    from medalign.bundle.inputs import input_spec
    from medalign.config import RunConfig

    config = RunConfig(task=task)  # type: ignore[arg-type]
    config.data.manifest, config.eval.split = str(manifest), split
    if model is not None:
        config.data.normalisation = input_spec(model).normalisation  # type: ignore[assignment]
    return config


def _write_metrics(metrics: dict[str, Any], out: Path | None, echo: bool = True) -> None:
    """All of ``metrics`` to ``out``; the terminal gets them without per-case rows (``echo``)."""
    from medalign.evaluation.metrics import without_rows

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
    from medalign.reporting.html_report import write_eval_report

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
    from medalign.evaluation import alignment as ev

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
    from medalign.evaluation import alignment as ev

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
    from medalign.data.dataset import dataset_for_model
    from medalign.evaluation import alignment as ev

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
    from medalign.tasks.segment import evaluate_segmentation

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
    from medalign.tasks.fuse import evaluate_fusion

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
