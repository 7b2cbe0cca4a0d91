"""Alignment quality: each recipe trained on this CPU, evaluated next to the same model untrained.

    python benchmarks/bench_align_quality.py phantom [--write]
    python benchmarks/bench_align_quality.py medpix  [--write]
    python benchmarks/bench_align_quality.py busi    [--write]   # after medpix: starts from its bundle

Protocols (also written into BENCHMARKS.md with the numbers):

* phantom: 480 cases (seed 0), patient-level 70/15/15 split; recipe configs/align/phantom.yaml;
  zero-shot diagnosis (prompt ensemble phantom_diagnosis) and report retrieval on the test split.
* medpix: MedPix 2.0 with its case-disjoint train/dev/test split (dev = val); recipe
  configs/align/medpix_scratch.yaml (random ViT); image<->caption retrieval on the 200 test images (a caption shared
  by several images counts every one of them as correct), zero-shot modality / plane / region.
  The pretrained (LiT) recipe configs/align/medpix.yaml is compared with this one in
  benchmarks/bench_pretrained.py.
* busi: 780 images, stratified 3-fold cross-validation (seeded; each fold's training part split
  85/15 into train/val); recipe configs/align/nextgen_uia_busi.yaml, initialised from the MedPix
  bundle; zero-shot (busi prompts) and linear probe (C chosen on val) on each held-out fold,
  before and after adapter fine-tuning; mean ± std over the folds.

"Untrained" is the identical architecture at the initialisation the recipe starts from.
``--write`` saves ``benchmarks/results/bench_align_<bench>.json`` and rewrites its block of
BENCHMARKS.md; ``blocks()`` renders every block from its results file alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import benchlib
from benchlib import DATA, REPO, RUNS, machine
from medalign.config import load_config
from medalign.data.dataset import dataset_for_model
from medalign.data.importers import load_dataset
from medalign.data.manifest import Manifest, assign_splits, write_manifest
from medalign.data.run_manifest import load_run_manifest
from medalign.evaluation import alignment as ev
from medalign.pipeline.run import build_model, run_training
from medalign.tasks.align import texts_from_labels
from medalign.tasks.columns import image_columns

TITLES = {
    "phantom": "Alignment on the phantom",
    "medpix": "Alignment on MedPix 2.0",
    "busi": "BUSI zero-shot and linear probe",
}


ZEROSHOT_KEYS = ("accuracy", "balanced_accuracy", "auc")
RETRIEVAL_KEYS = ("R@1", "R@5", "R@10", "median_rank", "n_queries")


def evaluate_model(
    model: Any, manifest: Manifest, keys: list[str], split: str, zeroshot: dict[str, str], retrieval: bool
) -> dict[str, Any]:
    """The headline numbers the tables show (zero-shot per label, retrieval both ways)."""
    results: dict[str, Any] = {}
    for label, templates in zeroshot.items():
        embeddings = ev.embed_split(model, dataset_for_model(manifest, model, split, label, keys))
        scores = ev.zero_shot(model, embeddings, templates)
        results[f"zeroshot:{label}"] = {k: scores[k] for k in ZEROSHOT_KEYS}
    if retrieval:
        embeddings = ev.embed_split(model, dataset_for_model(manifest, model, split, None, keys))
        both = ev.retrieval(embeddings)
        results["retrieval"] = {d: {k: both[d][k] for k in RETRIEVAL_KEYS} for d in ("image_to_text", "text_to_image")}
    return results


def train_and_compare(
    recipe: str, overrides: list[str], zeroshot: dict[str, str], retrieval: bool
) -> dict[str, Any]:
    """Train ``configs/align/<recipe>.yaml`` and evaluate it before and after."""
    config = load_config(REPO / "configs" / "align" / f"{recipe}.yaml", overrides)
    config.train.progress = False
    out = Path(config.out)
    torch.manual_seed(config.train.seed)
    from lightning.fabric.utilities.seed import seed_everything

    seed_everything(config.train.seed)
    manifest = load_run_manifest(config, out)
    if config.data.text_from_labels:
        manifest = texts_from_labels(manifest, config.data.text_from_labels, config.data.label or "label")
    untrained_model = build_model(config)
    keys = image_columns(config, manifest)
    before = evaluate_model(untrained_model, manifest, keys, config.eval.split, zeroshot, retrieval)
    start = time.perf_counter()
    run_training(config)
    seconds = time.perf_counter() - start
    from medalign.bundle import load_bundle

    trained = load_bundle(out / "bundle")
    after = evaluate_model(trained, manifest, keys, config.eval.split, zeroshot, retrieval)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "before": before,
        "after": after,
        "seconds": seconds,
        "steps": metrics["train"]["steps"],
        "metrics": metrics,
        "config": config,
    }


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def retrieval_rows(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    rows = []
    for direction in ("image_to_text", "text_to_image"):
        for key in ("R@1", "R@5", "R@10", "median_rank"):
            b, a = before["retrieval"][direction][key], after["retrieval"][direction][key]
            rows.append(f"| {direction.replace('_', '→').replace('to→', '')} {key} | {fmt(b)} | {fmt(a)} |")
    return rows


def zeroshot_rows(before: dict[str, Any], after: dict[str, Any], labels: list[str]) -> list[str]:
    rows = []
    for label in labels:
        for key in ("accuracy", "balanced_accuracy", "auc"):
            b, a = before[f"zeroshot:{label}"][key], after[f"zeroshot:{label}"][key]
            rows.append(f"| zero-shot {label} {key} | {fmt(b)} | {fmt(a)} |")
    return rows


SELECTION_NONE = "Selection: none: the recipe's fixed schedule, the model after the last step, no choice made on val or test."


def bench_phantom() -> dict[str, Any]:
    result = train_and_compare(
        "phantom", [f"out={RUNS / 'align_phantom'}"], {"label": "phantom_diagnosis"}, retrieval=True
    )
    return {k: result[k] for k in ("before", "after", "seconds", "steps")} | {"machine": machine()}


def render_phantom(results: dict[str, Any]) -> str:
    before, after = results["before"], results["after"]
    n_test = after["retrieval"]["image_to_text"]["n_queries"]
    zs, r10 = after["zeroshot:label"], after["retrieval"]["image_to_text"]["R@10"]
    return "\n".join(
        [
            f"Phantom, 480 cases, test split {n_test} cases; {results['steps']} steps in {results['seconds']:.0f} s "
            f"(recipe configs/align/phantom.yaml, align_small_minilm with a frozen MiniLM text tower, both modalities "
            f"stacked as channels). Chance: zero-shot accuracy 1/3, R@1 {1 / n_test:.3f}, R@10 {10 / n_test:.3f}. "
            f"{SELECTION_NONE} Machine: {results['machine']}.",
            "",
            "| metric | untrained | trained |",
            "|---|---|---|",
            *zeroshot_rows(before, after, ["label"]),
            *retrieval_rows(before, after),
            "",
            f"After the quickstart-sized run zero-shot diagnosis accuracy is {zs['accuracy']:.2f} against 1/3 "
            f"chance (AUC {zs['auc']:.2f}), and the right report is in the top 10 of {n_test} for "
            f"{100 * r10:.0f}% of images (chance {1000 / n_test:.0f}%).",
        ]
    )


def medpix_manifest() -> Path:
    path = RUNS / "data" / "medpix.csv"
    if not path.exists():
        write_manifest(load_dataset("medpix", DATA / "medpix-2"), path, root=DATA / "medpix-2")
    return path


MEDPIX_ZEROSHOT = {
    "label:modality": "medpix_modality",
    "label:plane": "medpix_plane",
    "label:region": "medpix_region",
}


def bench_medpix() -> dict[str, Any]:
    result = train_and_compare(
        "medpix_scratch",
        [f"out={RUNS / 'align_medpix'}", f"data.manifest={medpix_manifest()}"],
        MEDPIX_ZEROSHOT,
        retrieval=True,
    )
    return {k: result[k] for k in ("before", "after", "seconds", "steps")} | {"machine": machine()}


def render_medpix(results: dict[str, Any]) -> str:
    before, after = results["before"], results["after"]
    n_test = after["retrieval"]["image_to_text"]["n_queries"]
    return "\n".join(
        [
            f"MedPix 2.0, case-disjoint split (train 1653 / val 197 / test {n_test} images); "
            f"{results['steps']} steps in {results['seconds']:.0f} s on this CPU (recipe configs/align/medpix_scratch.yaml: "
            f"align_small_minilm, 128 px grayscale, batch 64 as 4 GradCache micro-batches of 16, "
            f"text-similarity soft targets). Retrieval chance: R@1 {1 / n_test:.3f}. The untrained text tower is "
            f"already the pretrained MiniLM, so \"untrained\" zero-shot is the image side at random. "
            f"{SELECTION_NONE} Machine: {results['machine']}.",
            "",
            "| metric | untrained | trained |",
            "|---|---|---|",
            *retrieval_rows(before, after),
            *zeroshot_rows(before, after, list(MEDPIX_ZEROSHOT)),
        ]
    )


def busi_folds() -> list[Path]:
    base = load_dataset("busi", DATA / "busi")
    table = base.table.copy()
    folds = assign_splits(table, {"f0": 1 / 3, "f1": 1 / 3, "f2": 1 / 3}, seed=0, stratify="label")
    paths = []
    for k in range(3):
        rest = table[folds != f"f{k}"]
        inner = assign_splits(rest, {"train": 0.85, "val": 0.15}, seed=k, stratify="label")
        split = folds.where(folds != f"f{k}", "test").copy()
        split[rest.index] = inner
        fold_table = table.assign(split=split.tolist())
        path = RUNS / "data" / f"busi_cv{k}.csv"
        write_manifest(Manifest(fold_table, base.base_dir, base.meta), path, root=DATA / "busi")
        paths.append(path)
    return paths


def bench_busi(init_from: Path) -> dict[str, Any]:
    rows: dict[str, dict[str, list[float]]] = {}
    seconds = []
    for k, manifest in enumerate(busi_folds()):
        overrides = [
            f"out={RUNS / f'align_busi_cv{k}'}",
            f"data.manifest={manifest}",
            f"model.init_from={init_from}",
        ]
        result = train_and_compare("nextgen_uia_busi", overrides, {"label": "busi"}, retrieval=False)
        seconds.append(result["seconds"])
        config = result["config"]
        for stage, model_metrics in (("before", result["before"]), ("after", result["after"])):
            for key in ("balanced_accuracy", "auc", "accuracy"):
                rows.setdefault(f"zero-shot {key}", {}).setdefault(stage, []).append(
                    model_metrics["zeroshot:label"][key]
                )
        probe_after = result["metrics"]["probe"]["test"]
        probe_before = probe_for(init_from, config)
        for stage, probe in (("before", probe_before), ("after", probe_after)):
            for key in ("balanced_accuracy", "auc", "accuracy"):
                rows.setdefault(f"linear probe {key}", {}).setdefault(stage, []).append(probe[key])
    return {"rows": rows, "seconds_per_fold": seconds, "machine": machine()}


def render_busi(results: dict[str, Any]) -> str:
    def ms(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    rows = results["rows"]
    lines = [
        "BUSI (780 images: benign 437 / malignant 210 / normal 133), stratified 3-fold CV (seed 0; 85/15 "
        "train/val inside each training part). Start: the MedPix-aligned bundle; fine-tuning: Mona adapters in "
        "the frozen vision tower + LoRA in the frozen text tower (recipe configs/align/nextgen_uia_busi.yaml; "
        f"texts from class prompts). {statistics.mean(results['seconds_per_fold']):.0f} s per fold on this CPU. "
        "Mean ± std over the 3 held-out folds. Selection: the linear probe's C on each fold's val part; the "
        "fine-tuning schedule is fixed; nothing is chosen on a held-out fold. "
        f"Machine: {results['machine']}.",
        "",
        "| metric | MedPix-aligned start | after BUSI adapter fine-tuning |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {ms(v['before'])} | {ms(v['after'])} |" for name, v in rows.items()]
    zs = rows["zero-shot balanced_accuracy"]
    lines += [
        "",
        "The fine-tuning trains on class prompts, so its \"zero-shot\" score after fine-tuning is "
        "prompt-supervised classification (as in NextGen-UIA's adapted CLIP): balanced accuracy "
        f"{statistics.mean(zs['before']):.2f} → {statistics.mean(zs['after']):.2f} (chance 0.33). The linear "
        "probe reads the frozen vision tower, which the adapters leave as it was learned on MedPix's CT/MR "
        "images. BUSI's NextGen-UIA fold files cover only benign and malignant images, so this benchmark uses "
        "its own seeded stratified folds over all 780 images.",
    ]
    return "\n".join(lines)


def probe_for(bundle: Path, config: Any) -> dict[str, Any]:
    from medalign.bundle import load_bundle

    model = load_bundle(bundle)
    from medalign.data.manifest import read_manifest

    manifest = read_manifest(config.data.manifest)
    keys = image_columns(config, manifest)
    splits = [
        ev.embed_split(model, dataset_for_model(manifest, model, s, "label", keys))
        for s in ("train", "val", "test")
    ]
    return ev.probe(*splits)["test"]


RENDER: dict[str, Callable[[dict[str, Any]], str]] = {
    "phantom": render_phantom,
    "medpix": render_medpix,
    "busi": render_busi,
}


def blocks() -> dict[str, str]:
    return benchlib.rendered({f"bench_align_{name}": render for name, render in RENDER.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=list(TITLES))
    parser.add_argument("--init-from", type=Path, default=RUNS / "align_medpix" / "bundle")
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    results = {"phantom": bench_phantom, "medpix": bench_medpix, "busi": lambda: bench_busi(args.init_from)}[
        args.bench
    ]()
    if args.write:
        heading = f"## {TITLES[args.bench]} (`benchmarks/bench_align_quality.py {args.bench}`)"
        print(benchlib.publish(f"bench_align_{args.bench}", results, RENDER[args.bench], heading))
    else:
        print(RENDER[args.bench](json.loads(json.dumps(results, default=float))))


if __name__ == "__main__":
    main()
