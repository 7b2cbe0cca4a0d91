"""Segmentation quality and inference speed, each next to its reference in one run.

    python benchmarks/bench_segment.py step     [--write]   # one training step: ours vs the MONAI loop, same precision
    python benchmarks/bench_segment.py sliding  [--write]   # ours vs MONAI sliding_window_inference, same precision
    python benchmarks/bench_segment.py phantom  [--write]   # prompt-selected lesion: text vs image-only
    python benchmarks/bench_segment.py monuseg  [--write]   # LViT protocol, text-guided vs U-Net
    python benchmarks/bench_segment.py busi     [--write]   # 3 folds: pretrained U-Net, CLIP decoder, scratch U-Net
    python benchmarks/bench_segment.py kvasir   [--write]   # 900/100: pretrained U-Net vs scratch U-Net

``--epochs N`` / ``--seeds K`` shrink a schedule (the defaults are what BENCHMARKS.md reports;
kvasir and busi also take ``--select-epochs``, ``--size`` and kvasir ``--scratch-seeds``). kvasir
and busi save ``benchmarks/results/bench_segment_<name>.json`` and render their block from it
(``blocks()``); ``python benchmarks/render_docs.py`` rewrites it without training.
Each run lives in ``$MEDALIGN_BENCH_RUNS/<name>`` (default /tmp/medalign-bench); a finished run
(``metrics.json`` written by the same schedule) is reused, an interrupted one resumes.
``--write`` saves ``benchmarks/results/bench_segment_<bench>.json`` and rewrites its block of
BENCHMARKS.md; ``blocks()`` renders every block from its results file alone.

Protocols (written into BENCHMARKS.md with the numbers):

* monuseg: MoNuSeg with LViT's text, LViT's own Train/Val/Test folders (24/6/14 images), images
  and masks resized to 224 px, per-image Dice and IoU averaged over the 14 test images (LViT's
  metric), recipes configs/segment/lvit_monuseg.yaml and unet_monuseg.yaml, 3 seeds.
* kvasir: 1000 pairs split 900 train / 100 test (seeded; PraNet's file list is not shipped with
  the data). The encoder learning rate of the pretrained U-Net is chosen on 90 val images carved
  from the 900 (fractions 0.81/0.09/0.1 give the same 100 test images); then the pretrained U-Net
  (configs/segment/kvasir.yaml) and the from-scratch MONAI U-Net (kvasir_unet.yaml) train on all
  900 and the test split is read once; per-image mean Dice/IoU.
* busi: the 3 NextGen-UIA folds of benign+malignant images (folds/busi_{train,val}k.txt): train
  on train k, evaluate once on the held-out val k; pretrained U-Net (busi.yaml), CLIP-feature
  decoder on the same pretrained encoder (clipseg_busi.yaml), from-scratch U-Net (busi_unet.yaml);
  encoder learning rates chosen on 10% of fold 1's train list; Dice / IoU / HD95 over every image,
  mean ± std over folds.
* phantom: the phantom's per-lesion prompts (one lesion of a case is the target); text-guided
  U-Net (phantom_text.yaml) vs the same data through an image-only U-Net and through C2FVL-style
  attributes (c2fvl_attributes.yaml).
* sliding: one 1024x1024 image, U-Net at 224 px; ours = medalign.inference.sliding_window.predict_probabilities
  (Gaussian blending, 1 window per pass on CPU, inference mode, fp32 or bf16) vs MONAI's
  ``sliding_window_inference`` with the same blending under ``torch.inference_mode`` at the same
  precision (the headline ratio), and MONAI at its defaults (constant blending, fp32) as a
  secondary row; same model and image, median of interleaved runs.
* step: one training step of the Kvasir recipe's U-Net; the headline reference is the plain MONAI
  loop (DiceCELoss, torch AdamW) under the same bf16 autocast; the same loop in fp32 is a
  labelled secondary row, compared with medalign in fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import benchlib
from benchlib import (
    REAL_DATA_RUN,
    RUNS,
    carve_val,
    imported,
    load_results,
    machine,
    results_path,
    save_results,
    slug,
    train,
    write_blocks,
)

SHARED = (
    " shared with other benchmark processes (train times are indicative, not comparable across rows; "
    "1-2 torch threads per process)"
)

LVIT_PUBLISHED = {"LViT-T (published)": (80.36, 67.31), "U-Net (published in LViT)": (76.45, 62.86)}
KVASIR_PUBLISHED = {"U-Net (published, PraNet paper)": 0.818, "PraNet (published)": 0.898}


def pct(values: list[float]) -> str:
    """``mean ± std`` in percent (std over runs; single runs show the value alone)."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def num(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def seconds(runs: list[dict[str, Any]]) -> str:
    return f"{sum(r['train_seconds'] for r in runs) / len(runs):.0f} s"


def run_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the tables need from one run's metrics.json."""
    keep = ("dice", "iou", "hd95", "hd95_worst", "nsd", "n_images")
    return {**{k: metrics[k] for k in keep if k in metrics}, "train_seconds": metrics["train"]["seconds"]}


SELECTION = "Selection: none: a fixed schedule, the model after the last epoch, no choice made on val or test."


# ---------------------------------------------------------------------------------------------


MONUSEG_MODELS = {"lvit_monuseg": "medalign text_unet (MiniLM text)", "unet_monuseg": "medalign U-Net"}


def bench_monuseg(epochs: int, seeds: int) -> dict[str, Any]:
    manifest = imported("monuseg_text", "lvit", "monuseg-text")
    rows = {
        recipe: [
            run_summary(
                train(
                    recipe,
                    f"seg_{recipe}_s{seed}",
                    [f"data.manifest={manifest}", f"train.epochs={epochs}", f"train.seed={seed}"],
                    folder="segment",
                )
            )
            for seed in range(seeds)
        ]
        for recipe in MONUSEG_MODELS
    }
    return {"epochs": epochs, "rows": rows, "published": LVIT_PUBLISHED, "machine": machine(SHARED)}


def render_monuseg(results: dict[str, Any]) -> str:
    lines = []
    for recipe, runs in results["rows"].items():
        lines.append(
            f"| {MONUSEG_MODELS[recipe]} | {pct([r['dice'] for r in runs])} | {pct([r['iou'] for r in runs])} "
            f"| {len(runs)} | {seconds(runs)} |"
        )
    lines += [f"| {name} | {dice:.2f} | {iou:.2f} | – | – |" for name, (dice, iou) in results["published"].items()]
    n = next(iter(results["rows"].values()))[0]["n_images"]
    return "\n".join(
        [
            f"MoNuSeg with LViT's text: LViT's Train/Val/Test folders, trained on Train ({results['epochs']} "
            f"epochs), evaluated on the {n} Test images at 224 px; Dice and IoU per image, averaged over images "
            f"(LViT's metric), mean ± std over seeds; *published* rows: LViT's paper, its full schedule. "
            f"{SELECTION} Machine: {results['machine']}.",
            "",
            "| model | Dice % | IoU % | seeds | train time / seed |",
            "|---|---|---|---|---|",
            *lines,
        ]
    )


# ---------------------------------------------------------------------------------------------
# Real data with pretrained encoders: choose on val, read test once (results files + blocks)
# ---------------------------------------------------------------------------------------------

SEG_KEYS = ("dice", "iou", "dice_std", "pooled_dice", "hd95", "hd95_worst", "nsd", "n_images")


def numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a table reads from a run's metrics.json (no per-case rows)."""
    return {
        **{k: metrics.get(k) for k in SEG_KEYS},
        # runs evaluated before the rename count the same images under their old key
        "hd95_worst": metrics.get("hd95_worst", metrics.get("hd95_undefined")),
        "split": metrics["split"],
        "train_seconds": metrics["train"]["seconds"],
        "train_steps": metrics["train"]["steps"],
    }


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (std over seeds or folds, ddof 1); a single value alone."""
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def select_on_val(
    recipe: str, run: str, manifest: Path, variants: dict[str, list[str]], common: list[str]
) -> tuple[dict[str, dict[str, Any]], str]:
    """Train every variant on the train split, score it on val; the best val Dice is chosen."""
    scores = {
        name: numbers(
            train(recipe, f"{run}_{slug(name)}", [f"data.manifest={manifest}", "eval.split=val", *common, *extra], folder="segment")
        )
        for name, extra in variants.items()
    }
    return scores, max(scores, key=lambda name: scores[name]["dice"])


def selection_table(title: str, scores: dict[str, dict[str, Any]], chosen: str) -> list[str]:
    rows = [
        f"| {name}{' (chosen)' if name == chosen else ''} | {100 * s['dice']:.1f} | {100 * s['iou']:.1f} | {s['n_images']} |"
        for name, s in scores.items()
    ]
    return [f"| {title} | val Dice % | val IoU % | val images |", "|---|---|---|---|", *rows]


KVASIR_VARIANTS = {  # the pretrained encoder's learning rate, relative to the decoder's 1e-3
    "encoder lr x0.1": ["optim.lr_multipliers={vision: 0.1}"],
    "encoder lr x1": ["optim.lr_multipliers={}"],
}
KVASIR_MODELS = {  # key -> (recipe, label)
    "pretrained": ("kvasir", "U-Net, EfficientNet-Lite0 encoder (ImageNet, offline)"),
    "scratch": ("kvasir_unet", "U-Net from scratch (MONAI, channels 32-512)"),
}


def bench_kvasir(epochs: int, select_epochs: int, size: int, seeds: list[int], scratch_seeds: list[int]) -> None:
    """Choose the encoder's learning rate on 90 val images (trained on 810 for ``select_epochs``),
    then train both models on all 900 (one run per seed listed; an empty list records the model
    as not run) and read the 100 test images once."""
    select = imported("kvasir_810_90_100", "kvasir", "kvasir-seg", fractions={"train": 0.81, "val": 0.09, "test": 0.1})
    final = imported("kvasir_900_100", "kvasir", "kvasir-seg", fractions={"train": 0.9, "test": 0.1})
    common = [f"train.epochs={epochs}", f"model.overrides.image_size={size}", *REAL_DATA_RUN]
    pilot = [f"train.epochs={select_epochs}", *common[1:]]
    scores, chosen = select_on_val("kvasir", "seg_kvasir_select", select, KVASIR_VARIANTS, pilot)
    models = {}
    for key, (recipe, label) in KVASIR_MODELS.items():
        extra = KVASIR_VARIANTS[chosen] if key == "pretrained" else []
        runs = [
            numbers(
                train(
                    recipe,
                    f"seg_kvasir_{key}_s{seed}",
                    [f"data.manifest={final}", "eval.split=test", f"train.seed={seed}", *common, *extra],
                    folder="segment",
                )
            )
            for seed in (seeds if key == "pretrained" else scratch_seeds)
        ]
        models[key] = {"label": label, "recipe": recipe, "overrides": extra, "runs": runs}
    seed_lists = {"pretrained": seeds, "scratch": scratch_seeds}
    save_results(
        "bench_segment_kvasir",
        {
            "machine": machine(SHARED),
            "protocol": {
                "size": size,
                "epochs": epochs,
                "select_epochs": select_epochs,
                "train": 900,
                "selection_train": 810,
                "val": 90,
                "test": 100,
            },
            "selection": scores,
            "chosen": chosen,
            "seeds": seed_lists,
            "models": models,
            "published": KVASIR_PUBLISHED,
        },
    )


def kvasir_block() -> str:
    r = load_results("bench_segment_kvasir")
    p = r["protocol"]
    rows = []
    for model in r["models"].values():
        runs = model["runs"]
        if not runs:
            rows.append(f"| {model['label']} | not run | – | 0 | – |")
            continue
        minutes = statistics.mean(x["train_seconds"] for x in runs) / 60
        rows.append(
            f"| {model['label']} | {mean_std([x['dice'] for x in runs], 1, 3)} | {mean_std([x['iou'] for x in runs], 1, 3)} "
            f"| {len(runs)} | {minutes:.0f} min |"
        )
    rows += [f"| {name} | {dice:.3f} | – | – | – |" for name, dice in r["published"].items()]
    seeds = ", ".join(f"{key}: {', '.join(map(str, ids)) or 'none'}" for key, ids in r["seeds"].items())
    longest = max(x["train_seconds"] for m in r["models"].values() for x in m["runs"]) / 60
    return "\n".join(
        [
            f"Kvasir-SEG with the PraNet split sizes: 900 train / {p['test']} test (the importer's seeded split; "
            f"PraNet's own file list is not shipped). Selection: the encoder's learning rate, on {p['val']} val "
            f"images carved from the 900 (models trained on the other {p['selection_train']} for {p['select_epochs']} "
            f"epochs, seed 0); "
            f"then every model trains on all 900 and the test images are read once. {p['size']} px (PraNet: 352), "
            f"{p['epochs']} epochs, batch 16, AdamW lr 1e-3 with cosine decay, Dice + BCE, flips / rotation / "
            f"scale / shift; per-image Dice and IoU averaged over the test images (fractions), mean ± std over "
            f"the seeds run ({seeds}; fewer than 3 seeds, or a model not run, is what the shared CPU allowed: "
            f"one {p['epochs']}-epoch run takes about {longest:.0f} min there). Recipes configs/segment/kvasir.yaml and kvasir_unet.yaml. Machine: {r['machine']}.",
            "",
            "| model | Dice | IoU | seeds | train time / seed |",
            "|---|---|---|---|---|",
            *rows,
            "",
            *selection_table("encoder learning rate (selection)", r["selection"], r["chosen"]),
        ]
    )


BUSI_MODELS = {  # key -> (recipe, label); the first two share the pretrained encoder
    "pretrained": ("busi", "U-Net, EfficientNet-Lite0 encoder (ImageNet, offline)"),
    "clip": ("clipseg_busi", "CLIP-feature decoder, same encoder"),
    "scratch": ("busi_unet", "U-Net from scratch (MONAI, channels 32-512)"),
}
BUSI_FOLDS = (1, 2, 3)


def bench_busi(epochs: int, select_epochs: int, size: int, folds: list[int], keys: list[str]) -> None:
    """Train the models ``keys`` on each fold's train list and read its held-out list once (the
    importer's ``val`` split of that fold).

    With ``select_epochs > 0`` each pretrained model's encoder learning rate is first chosen on a
    val split carved from fold 1's train list (10%, stratified by class); with 0 the recipes'
    setting is used as shipped (the encoder at the decoder's rate, chosen on Kvasir's and LGG's
    val splits).
    """
    all_folds = {k: imported("busi", "busi", "busi", fold=k) for k in BUSI_FOLDS}
    common = [f"train.epochs={epochs}", f"model.overrides.image_size={size}", *REAL_DATA_RUN]
    selection: dict[str, dict[str, dict[str, Any]]] = {}
    chosen: dict[str, str] = {}
    if select_epochs > 0:
        select = carve_val(all_folds[1], "busi_fold1_select", 0.1, rename={"val": "test", "test": "normal"})
        pilot = [f"train.epochs={select_epochs}", *common[1:]]
        for key in ("pretrained", "clip"):
            if key in keys:
                recipe = BUSI_MODELS[key][0]
                selection[key], chosen[key] = select_on_val(recipe, f"seg_busi_select_{key}", select, KVASIR_VARIANTS, pilot)
    models = {}
    for key in keys:
        recipe, label = BUSI_MODELS[key]
        extra = KVASIR_VARIANTS[chosen[key]] if key in chosen else []
        runs = [
            numbers(
                train(
                    recipe,
                    f"seg_busi_{key}_fold{k}",
                    [f"data.manifest={all_folds[k]}", "eval.split=val", *common, *extra],
                    folder="segment",
                )
            )
            for k in folds
        ]
        models[key] = {"label": label, "recipe": recipe, "overrides": extra, "runs": runs}
    save_results(
        "bench_segment_busi",
        {
            "machine": machine(SHARED),
            "protocol": {"size": size, "epochs": epochs, "select_epochs": select_epochs, "folds": folds},
            "selection": selection,
            "chosen": chosen,
            "models": models,
        },
    )


def busi_block() -> str:
    r = load_results("bench_segment_busi")
    p = r["protocol"]
    models = r["models"]
    rows = []
    for key, (_, label) in BUSI_MODELS.items():
        if key not in models:
            rows.append(f"| {label} | not run | – | – | – | – |")
            continue
        runs = models[key]["runs"]
        minutes = statistics.mean(x["train_seconds"] for x in runs) / 60
        rows.append(
            f"| {label} | {mean_std([x['dice'] for x in runs])} | {mean_std([x['iou'] for x in runs])} "
            f"| {mean_std([x['hd95'] for x in runs], 1)} | {sum(x['hd95_worst'] for x in runs)} "
            f"| {minutes:.0f} min |"
        )
    n = "/".join(str(x["n_images"]) for x in next(iter(models.values()))["runs"])
    folds = p["folds"]
    which = "the 3 NextGen-UIA folds" if len(folds) == 3 else f"NextGen-UIA fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))} of 3"
    spread = "mean ± std over the folds" if len(folds) > 1 else "one fold, one seed"
    if p["select_epochs"] > 0:
        titles = {"pretrained": "U-Net: encoder learning rate", "clip": "CLIP-feature decoder: encoder learning rate"}
        choice = (
            f"Selection: each pretrained model's encoder learning rate, on a val split of 10% of fold 1's train "
            f"list (stratified by class; trained on the other 90% for {p['select_epochs']} epochs)."
        )
        selection = [
            line
            for key, title in titles.items()
            if key in r["selection"]
            for line in ("", *selection_table(title, r["selection"][key], r["chosen"][key]))
        ]
    else:
        choice = (
            "No selection on BUSI: the pretrained encoders train at the decoder's learning rate, the setting "
            "chosen on the val splits of Kvasir-SEG and LGG (their blocks below)."
        )
        selection = []
    gap = []
    if {"pretrained", "clip"} <= models.keys():
        delta = [100 * (c["dice"] - u["dice"]) for c, u in zip(models["clip"]["runs"], models["pretrained"]["runs"], strict=True)]
        gap = [
            "",
            f"CLIP-feature decoder minus U-Net on the same encoder: {statistics.mean(delta):+.1f} Dice points "
            f"(target: within 5 points).",
        ]
    return "\n".join(
        [
            f"BUSI, {which} (benign + malignant): train on fold k's train list, evaluate on its held-out list "
            f"({n} images) once; {p['epochs']} epochs ({'recipes: 30; ' if p['epochs'] != 30 else ''}the CPU "
            f"time box). {choice} Grayscale at {p['size']} px (the EfficientNet stem's RGB kernels summed), "
            f"batch 16, AdamW lr 1e-3 with cosine decay, Dice + BCE; per-image Dice / IoU % and HD95 (pixels at "
            f"{p['size']} px) averaged over the images, {spread}; HD95 is undefined on an image whose prediction "
            f"is empty: such images are counted in their own column (0 = HD95 over every image). Recipes "
            f"configs/segment/busi.yaml, clipseg_busi.yaml, busi_unet.yaml. Machine: {r['machine']}.",
            "",
            "| model | Dice % | IoU % | HD95 px | images without HD95 (empty prediction) | train time / fold |",
            "|---|---|---|---|---|---|",
            *rows,
            *gap,
            *selection,
        ]
    )


PHANTOM_VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "phantom_text": ("phantom_text", "text-guided U-Net (prompt, MiniLM)", []),
    "c2fvl_attributes": ("c2fvl_attributes", "attribute-guided U-Net (C2FVL attributes)", []),
    "image_only": (
        "phantom_text",
        "image-only U-Net (same targets)",
        ["model.name=unet", "model.overrides={in_channels: 2, image_size: 128}"],
    ),
}


def bench_phantom(epochs: int, seeds: int) -> dict[str, Any]:
    from medalign.data.phantom import PhantomConfig, generate_phantom

    prompts = generate_phantom(RUNS / "data" / "phantom480", PhantomConfig(n=480, seed=0)).with_name(
        "prompts.csv"
    )
    common = [f"data.manifest={prompts}", "data.phantom=null", f"train.epochs={epochs}"]
    rows = {}
    for tag, (recipe, _, extra) in PHANTOM_VARIANTS.items():
        rows[tag] = [
            run_summary(
                train(recipe, f"seg_phantom_{tag}_s{seed}", [*common, *extra, f"train.seed={seed}"], folder="segment")
            )
            for seed in range(seeds)
        ]
    return {"epochs": epochs, "rows": rows, "machine": machine(SHARED)}


def render_phantom(results: dict[str, Any]) -> str:
    lines = [
        f"| {PHANTOM_VARIANTS[tag][1]} | {pct([r['dice'] for r in runs])} | {pct([r['iou'] for r in runs])} "
        f"| {len(runs)} | {seconds(runs)} |"
        for tag, runs in results["rows"].items()
    ]
    return "\n".join(
        [
            "Phantom (480 cases, seed 0) lesion prompts: each row names one lesion of a case and only that lesion "
            "is the target, so a model that cannot read the prompt cannot know which lesion to segment. "
            f"128 px, both modalities as channels, {results['epochs']} epochs; per-image Dice / IoU on the test "
            f"prompts. {SELECTION} Machine: {results['machine']}.",
            "",
            "| model | Dice % | IoU % | seeds | train time / seed |",
            "|---|---|---|---|---|",
            *lines,
        ]
    )


SLIDING_REFERENCE = {"bf16": "MONAI sliding_window_inference, Gaussian, bf16", "fp32": "MONAI sliding_window_inference, Gaussian, fp32"}
SLIDING_OURS = {"bf16": "medalign predict_probabilities, bf16", "fp32": "medalign predict_probabilities, fp32"}
SLIDING_DEFAULTS = "MONAI sliding_window_inference, defaults (constant blending, fp32, no_grad)"


def bench_sliding(repeats: int) -> dict[str, Any]:
    from monai.inferers import sliding_window_inference

    from medalign.inference.sliding_window import predict_probabilities
    from medalign.models import create_model

    torch.manual_seed(0)
    model = create_model("unet", in_channels=3, image_size=224).eval()
    image = torch.rand(1, 3, 1024, 1024)

    def monai(bf16: bool, mode: str = "gaussian") -> Callable[[], np.ndarray]:
        def predictor(windows: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(pixel_values=windows)["logits"]
            return torch.sigmoid(logits.float())

        def run() -> np.ndarray:
            with torch.inference_mode():
                return sliding_window_inference(image, (224, 224), 1, predictor, overlap=0.25, mode=mode)[0, 0].numpy()

        return run

    def monai_defaults() -> np.ndarray:
        with torch.no_grad():
            out = sliding_window_inference(
                image, (224, 224), 1, lambda w: torch.sigmoid(model(pixel_values=w)["logits"])
            )
        return out[0, 0].numpy()

    candidates: dict[str, Callable[[], np.ndarray]] = {
        SLIDING_REFERENCE["bf16"]: monai(True),
        SLIDING_OURS["bf16"]: lambda: predict_probabilities(model, image, bf16=True),
        SLIDING_REFERENCE["fp32"]: monai(False),
        SLIDING_OURS["fp32"]: lambda: predict_probabilities(model, image),
        SLIDING_DEFAULTS: monai_defaults,
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    outputs: dict[str, np.ndarray] = {}
    for name, fn in candidates.items():  # warm-up
        outputs[name] = fn()
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name in candidates:
        precision = "bf16" if "bf16" in name else "fp32"
        reference = outputs[SLIDING_REFERENCE[precision]]
        mask, ref_mask = outputs[name] > 0.5, reference > 0.5
        rows[name] = {
            "seconds": times[name],
            "reference": SLIDING_REFERENCE[precision],
            "mask_dice_vs_reference": float(2 * (mask & ref_mask).sum() / max(mask.sum() + ref_mask.sum(), 1)),
            "max_prob_difference": float(np.abs(outputs[name] - reference).max()),
        }
    return {"repeats": repeats, "threads": torch.get_num_threads(), "rows": rows, "machine": machine()}


def render_sliding(results: dict[str, Any]) -> str:
    rows = results["rows"]
    median = {name: statistics.median(r["seconds"]) for name, r in rows.items()}
    lines = []
    for name, r in rows.items():
        ratio = median[r["reference"]] / median[name]
        lines.append(
            f"| {name} | {median[name]:.2f} s | {ratio:.2f}x | {r['reference'].split(', ', 2)[-1]} "
            f"| {r['mask_dice_vs_reference']:.4f} | {r['max_prob_difference']:.3f} |"
        )
    naive = median[SLIDING_DEFAULTS] / median[SLIDING_OURS["bf16"]]
    return "\n".join(
        [
            "One 1024x1024 RGB image, MONAI U-Net (channels 32-512, 2 residual units) with a 224 px window, "
            f"overlap 0.25, one window per pass; median of {results['repeats']} interleaved runs after a warm-up, "
            f"{results['threads']} torch threads. Each row's ratio is against MONAI's `sliding_window_inference` "
            "with the same Gaussian blending, under `torch.inference_mode`, at the row's precision (bf16 autocast "
            "or fp32); agreement = Dice between the thresholded (0.5) masks and that reference's. "
            f"Machine: {results['machine']}.",
            "",
            "| inference | time | ÷ MONAI, same precision | reference precision | mask agreement (Dice) | max prob. difference |",
            "|---|---|---|---|---|---|",
            *lines,
            "",
            f"Secondary (not a like-for-like comparison): medalign in bf16 against MONAI's defaults in fp32 "
            f"(constant blending) is {naive:.2f}x, which is bf16 autocast, not medalign. `predict_probabilities` "
            "is MONAI's `sliding_window_inference` with Gaussian blending, one window per pass on a CPU (8 on a "
            "GPU) and bf16 as an option, so at the same precision the two should run at the same speed.",
        ]
    )


STEP_REFERENCE = "MONAI U-Net + DiceCELoss, torch AdamW, bf16 autocast"
STEP_REFERENCE_FP32 = "MONAI U-Net + DiceCELoss, torch AdamW, fp32 (naive loop)"
STEP_REFERENCE_COMPILED = "MONAI loop, bf16 autocast + torch.compile"
STEP_OURS = "medalign, as the Engine trains it (bf16)"
# setup -> (the reference it is compared with at the same precision and compilation, how it runs)
STEP_SETUPS: dict[str, tuple[str, dict[str, Any]]] = {
    STEP_REFERENCE: (STEP_REFERENCE, {"reference": True, "bf16": True}),
    STEP_OURS: (STEP_REFERENCE, {}),
    "medalign bf16 + channels-last": (STEP_REFERENCE, {"channels_last": True}),
    STEP_REFERENCE_COMPILED: (STEP_REFERENCE_COMPILED, {"reference": True, "bf16": True, "compile": True}),
    "medalign bf16 + torch.compile": (STEP_REFERENCE_COMPILED, {"compile": True}),
    STEP_REFERENCE_FP32: (STEP_REFERENCE_FP32, {"reference": True, "bf16": False}),
    "medalign fp32 (precision 32-true)": (STEP_REFERENCE_FP32, {"bf16": False}),
}


class SegmentStep:
    """One optimisation step of a segmentation model, the engine's way or the plain loop's.

    ``medalign``: ``SegmentTask.training_step`` (Dice + BCE) under CPU bf16 autocast (what
    Fabric's ``bf16-mixed`` does), ``build_optimizer`` (fused AdamW), gradient clipping,
    scheduler; optionally channels-last weights and activations, or ``torch.compile``.
    Reference: the same MONAI modules, ``monai.losses.DiceCELoss(sigmoid=True)``,
    ``torch.optim.AdamW`` at its defaults: the loop a MONAI tutorial writes, under the same bf16
    autocast (``bf16=True``), optionally compiled, or in fp32.
    """

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], **how: Any) -> None:
        from medalign.config import OptimConfig, SegLossConfig
        from medalign.tasks.segment import SegmentTask
        from medalign.training.engine import build_optimizer, build_scheduler

        self.how, self.batch = how, batch
        if how.get("reference"):
            from monai.losses import DiceCELoss

            self.model = torch.compile(model) if how.get("compile") else model
            self.loss = DiceCELoss(sigmoid=True)
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
            return
        if how.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
            self.batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
        self.model = model
        self.optim = OptimConfig(lr=1e-3, weight_decay=1e-4, schedule="constant")
        self.optimizer = build_optimizer(model, self.optim)
        self.scheduler = build_scheduler(self.optimizer, self.optim, total_steps=10**6)
        self.task = SegmentTask(model, SegLossConfig(), ["image"], "mask")
        if how.get("compile"):
            self.task.model = torch.compile(model)

    def step(self) -> float:
        if self.how.get("reference"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.how["bf16"]):
                logits = self.model(self.batch["image"])
            loss = self.loss(logits.float(), self.batch["mask"])
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            return float(loss.detach())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.how.get("bf16", True)):
            loss = self.task.training_step(self.batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(loss.detach())


def bench_step(rounds: int, steps: int, batch_size: int = 16, size: int = 256) -> dict[str, Any]:
    """Training step of the Kvasir recipe's U-Net, medalign's setups next to the MONAI loop."""
    import copy

    from medalign.models import create_model

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centers = torch.randint(size // 4, 3 * size // 4, (batch_size, 2), generator=g)
    radii = torch.randint(size // 10, size // 4, (batch_size,), generator=g)
    masks = torch.stack(
        [((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).float() for (cy, cx), r in zip(centers.tolist(), radii.tolist(), strict=True)]
    )[:, None]
    batch = {"image": (0.6 * torch.rand(batch_size, 3, size, size, generator=g) + 0.4 * masks), "mask": masks}
    ours = create_model("unet", in_channels=3, image_size=size).train()
    setups = {}
    for name, (_, how) in STEP_SETUPS.items():
        if how.get("reference"):
            plain = torch.nn.Sequential(copy.deepcopy(ours.net), copy.deepcopy(ours.to_logits)).train()
            setups[name] = SegmentStep(plain, batch, **how)
        else:
            setups[name] = SegmentStep(copy.deepcopy(ours), batch, **how)
    first, warm = {}, {}
    for name, setup in setups.items():
        start = time.perf_counter()
        first[name] = setup.step()
        setup.step()
        warm[name] = time.perf_counter() - start
        print(f"warm-up {name}: {warm[name]:.1f} s, loss {first[name]:.4f}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in setups}
    last: dict[str, float] = {}
    for index in range(rounds):
        for name in list(setups) if index % 2 == 0 else list(reversed(setups)):
            start = time.perf_counter()
            for _ in range(steps):
                last[name] = setups[name].step()
            rates[name].append(steps * batch_size / (time.perf_counter() - start))
            print(f"round {index + 1}: {name}: {rates[name][-1]:.2f} images/s", flush=True)
    return {
        "batch_size": batch_size,
        "size": size,
        "rounds": rounds,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in ours.parameters()),
        "setups": {
            name: {
                "reference": STEP_SETUPS[name][0],
                "images_per_s": rates[name],
                "warm_up_seconds": warm[name],
                "loss_first": first[name],
                "loss_last": last[name],
            }
            for name in setups
        },
        "machine": machine(),
    }


def render_step(results: dict[str, Any]) -> str:
    setups, batch_size = results["setups"], results["batch_size"]
    median = {name: statistics.median(r["images_per_s"]) for name, r in setups.items()}
    lines = []
    for name, r in setups.items():
        rates = r["images_per_s"]
        lines.append(
            f"| {name} | {median[name]:.2f} | {min(rates):.2f}–{max(rates):.2f} | {1000 * batch_size / median[name]:.0f} "
            f"| {median[name] / median[r['reference']]:.2f} | {r['warm_up_seconds']:.0f} s "
            f"| {r['loss_first']:.3f} → {r['loss_last']:.3f} |"
        )
    ours = median[STEP_OURS] / median[STEP_REFERENCE]
    naive = median[STEP_OURS] / median[STEP_REFERENCE_FP32]
    return "\n".join(
        [
            f"Batch {batch_size} RGB images at {results['size']} px with disk masks (the Kvasir recipe's input), "
            f"MONAI U-Net 32-512 channels, 2 residual units, {results['parameters'] / 1e6:.1f}M parameters, identical "
            f"initial weights in every setup; 2 warm-up steps, then {results['rounds']} alternating rounds of "
            f"{results['steps']} steps (median), {results['threads']} torch threads. Each row's ratio is against the "
            "MONAI loop (`DiceCELoss(sigmoid=True)`, `torch.optim.AdamW`) at the same precision and compilation: "
            "bf16 autocast rows against the MONAI loop under bf16 autocast, compiled rows against the compiled "
            f"MONAI loop, fp32 rows against the MONAI loop in fp32. Machine: {results['machine']}.",
            "",
            "| setup | images/s | range | ms/step | ÷ MONAI, same precision | first 2 steps | loss |",
            "|---|---|---|---|---|---|---|",
            *lines,
            "",
            f"Headline: medalign's default step (bf16) is {ours:.2f}x the MONAI loop under the same bf16 autocast. "
            f"Secondary (not like for like): against the naive fp32 MONAI loop it is {naive:.2f}x, which is what bf16 "
            "autocast buys, not medalign.",
        ]
    )


TITLES = {
    "step": "Segmentation training step",
    "sliding": "Sliding-window inference speed",
    "phantom": "Prompt-selected segmentation on the phantom",
    "monuseg": "MoNuSeg with text (LViT protocol)",
    "busi": "BUSI segmentation, 3 folds",
    "kvasir": "Kvasir-SEG (900/100)",
}


RENDER: dict[str, Callable[[dict[str, Any]], str]] = {
    "step": render_step,
    "sliding": render_sliding,
    "phantom": render_phantom,
    "monuseg": render_monuseg,
}


def blocks() -> dict[str, str]:
    """Every block of BENCHMARKS.md this script writes, rendered from its results file alone."""
    rendered = benchlib.rendered({f"bench_segment_{name}": render for name, render in RENDER.items()})
    for name, block in (("kvasir", kvasir_block), ("busi", busi_block)):
        if results_path(f"bench_segment_{name}").is_file():
            rendered[f"bench_segment_{name}"] = block()
    return rendered


def int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``""`` -> ``[]`` (a model not run)."""
    return [int(part) for part in text.split(",") if part.strip()]


REAL = {"busi", "kvasir"}  # results files + blocks(); the others write their section directly


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=list(TITLES))
    parser.add_argument("--epochs", type=int, default=None, help="override the schedule's epochs")
    parser.add_argument("--select-epochs", type=int, default=None, help="kvasir, busi: epochs of the val runs")
    parser.add_argument("--size", type=int, default=None, help="kvasir, busi: image size")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--seed-list", type=int_list, default=None, help="kvasir: the pretrained U-Net's seeds, e.g. 0,1,2")
    parser.add_argument("--scratch-seeds", type=int_list, default=None, help="kvasir: the from-scratch U-Net's seeds ('' for none)")
    parser.add_argument("--folds", type=int_list, default=None, help="busi: folds, e.g. 1,2,3")
    parser.add_argument("--models", default=None, help=f"busi: models, comma-separated from {','.join(BUSI_MODELS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="step: alternating timed rounds")
    parser.add_argument("--steps", type=int, default=3, help="step: timed steps per round and setup")
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    epochs = args.epochs
    if args.bench in REAL:
        select_epochs = args.select_epochs
        if args.bench == "kvasir":
            seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds or 3))
            scratch = args.scratch_seeds if args.scratch_seeds is not None else [0]
            bench_kvasir(epochs or 20, 8 if select_epochs is None else select_epochs, args.size or 256, seeds, scratch)
        else:
            keys = [k for k in args.models.split(",") if k] if args.models is not None else list(BUSI_MODELS)
            unknown = sorted(set(keys) - set(BUSI_MODELS))
            if unknown or not keys:
                parser.error(f"--models {args.models!r}: name one or more of {list(BUSI_MODELS)}")
            folds = args.folds or list(BUSI_FOLDS)
            bench_busi(epochs or 30, 10 if select_epochs is None else select_epochs, args.size or 256, folds, keys)
        body = {"kvasir": kvasir_block, "busi": busi_block}[args.bench]()
        print(body)
        if args.write:
            write_blocks({f"bench_segment_{args.bench}": body})
        return
    benches: dict[str, Callable[[], dict[str, Any]]] = {
        "step": lambda: bench_step(args.rounds, args.steps),
        "sliding": lambda: bench_sliding(args.repeats),
        "phantom": lambda: bench_phantom(epochs or 10, args.seeds or 1),
        "monuseg": lambda: bench_monuseg(epochs or 40, args.seeds or 2),
    }
    results = benches[args.bench]()
    if args.write:
        heading = f"## {TITLES[args.bench]} (`benchmarks/bench_segment.py {args.bench}`)"
        print(benchlib.publish(f"bench_segment_{args.bench}", results, RENDER[args.bench], heading))
    else:
        print(RENDER[args.bench](json.loads(json.dumps(results, default=float))))


if __name__ == "__main__":
    main()
