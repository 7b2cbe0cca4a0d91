"""Segmentation quality and inference speed, each next to its reference in one run.

    python benchmarks/bench_segment.py step     [--write]   # one training step: ours vs the plain MONAI loop
    python benchmarks/bench_segment.py sliding  [--write]   # ours vs MONAI sliding_window_inference defaults
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
* sliding: one 1024x1024 image, U-Net trained at 224 px; ours = medalign.inference
  (Gaussian blending, 1 window per pass on CPU, inference mode, optionally bf16) vs MONAI's
  ``sliding_window_inference`` at its defaults (overlap 0.25, constant blending, 1 window per
  pass) under ``torch.no_grad``, same model and image, median of 5 runs each, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    write_section,
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


def seconds(results: list[dict[str, Any]]) -> str:
    return f"{sum(r['train']['seconds'] for r in results) / len(results):.0f} s"


# ---------------------------------------------------------------------------------------------


def bench_monuseg(epochs: int, seeds: int) -> str:
    manifest = imported("monuseg_text", "lvit", "monuseg-text")
    rows = []
    for recipe, label in (
        ("lvit_monuseg", "medalign text_unet (MiniLM text)"),
        ("unet_monuseg", "medalign U-Net"),
    ):
        results = [
            train(
                recipe,
                f"seg_{recipe}_s{seed}",
                [f"data.manifest={manifest}", f"train.epochs={epochs}", f"train.seed={seed}"],
                folder="segment",
            )
            for seed in range(seeds)
        ]
        dice, iou = [r["dice"] for r in results], [r["iou"] for r in results]
        rows.append(f"| {label} | {pct(dice)} | {pct(iou)} | {len(results)} | {seconds(results)} |")
    for name, (dice, iou) in LVIT_PUBLISHED.items():
        rows.append(f"| {name} | {dice:.2f} | {iou:.2f} | – | – |")
    n = results[0]["n_images"]
    return "\n".join(
        [
            f"MoNuSeg with LViT's text: LViT's Train/Val/Test folders, trained on Train ({epochs} epochs), "
            f"evaluated on the {n} Test images at 224 px; Dice and IoU per image, averaged over images "
            f"(LViT's metric), mean ± std over seeds. Machine: {machine(SHARED)}.",
            "",
            "| model | Dice % | IoU % | seeds | train time / seed |",
            "|---|---|---|---|---|",
            *rows,
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
            "chosen on Kvasir-SEG's and LGG's val splits (blocks above and below)."
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
            f"{p['size']} px) averaged over every image, {spread}; an empty prediction (or a prediction on an "
            f"empty mask) scores HD95 = the image diagonal and is counted in its own column. Recipes "
            f"configs/segment/busi.yaml, clipseg_busi.yaml, busi_unet.yaml. Machine: {r['machine']}.",
            "",
            "| model | Dice % | IoU % | HD95 px | HD95 worst-value images | train time / fold |",
            "|---|---|---|---|---|---|",
            *rows,
            *gap,
            *selection,
        ]
    )


def blocks() -> dict[str, str]:
    """The real-data blocks of BENCHMARKS.md, rendered from their results files alone (the BUSI
    block as written by the earlier 128 px protocol until ``bench_segment.py busi`` saves one)."""
    rendered = {"bench_segment_kvasir": kvasir_block()}
    if results_path("bench_segment_busi").is_file():
        rendered["bench_segment_busi"] = busi_block()
    return rendered


def bench_phantom(epochs: int, seeds: int) -> str:
    from medalign.data.phantom import PhantomConfig, generate_phantom

    prompts = generate_phantom(RUNS / "data" / "phantom480", PhantomConfig(n=480, seed=0)).with_name(
        "prompts.csv"
    )
    common = [f"data.manifest={prompts}", "data.phantom=null", f"train.epochs={epochs}"]
    variants: list[tuple[str, str, list[str]]] = [
        ("phantom_text", "text-guided U-Net (prompt, MiniLM)", []),
        ("c2fvl_attributes", "attribute-guided U-Net (C2FVL attributes)", []),
        (
            "phantom_text",
            "image-only U-Net (same targets)",
            ["model.name=unet", "model.overrides={in_channels: 2, image_size: 128}"],
        ),
    ]
    rows = []
    for recipe, label, extra in variants:
        tag = recipe if not extra else "image_only"
        results = [
            train(
                recipe,
                f"seg_phantom_{tag}_s{seed}",
                [*common, *extra, f"train.seed={seed}"],
                folder="segment",
            )
            for seed in range(seeds)
        ]
        rows.append(
            f"| {label} | {pct([r['dice'] for r in results])} | {pct([r['iou'] for r in results])} "
            f"| {len(results)} | {seconds(results)} |"
        )
    return "\n".join(
        [
            f"Phantom (480 cases, seed 0) lesion prompts: each row names one lesion of a case and only that lesion "
            f"is the target, so a model that cannot read the prompt cannot know which lesion to segment. "
            f"128 px, both modalities as channels, {epochs} epochs; per-image Dice / IoU on the test prompts. "
            f"Machine: {machine(SHARED)}.",
            "",
            "| model | Dice % | IoU % | seeds | train time / seed |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )


def bench_sliding(repeats: int) -> str:
    from monai.inferers import sliding_window_inference

    from medalign.inference import predict_probabilities
    from medalign.models import create_model

    torch.manual_seed(0)
    model = create_model("unet", in_channels=3, image_size=224).eval()
    image = torch.rand(1, 3, 1024, 1024)

    def monai_default() -> np.ndarray:
        with torch.no_grad():
            out = sliding_window_inference(
                image, (224, 224), 1, lambda w: torch.sigmoid(model(pixel_values=w)["logits"])
            )
        return out[0, 0].numpy()

    candidates: dict[str, Callable[[], np.ndarray]] = {
        "MONAI sliding_window_inference, defaults": monai_default,
        "medalign predict_probabilities, fp32": lambda: predict_probabilities(model, image),
        "medalign predict_probabilities, bf16": lambda: predict_probabilities(model, image, bf16=True),
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
    reference = "MONAI sliding_window_inference, defaults"
    ref_time = statistics.median(times[reference])
    ref_mask = outputs[reference] > 0.5
    rows = []
    for name in candidates:
        t = statistics.median(times[name])
        mask = outputs[name] > 0.5
        agree = 2 * (mask & ref_mask).sum() / max(mask.sum() + ref_mask.sum(), 1)
        diff = float(np.abs(outputs[name] - outputs[reference]).max())
        rows.append(f"| {name} | {t:.2f} s | {ref_time / t:.2f}x | {agree:.4f} | {diff:.3f} |")
    return "\n".join(
        [
            f"One 1024x1024 RGB image, MONAI U-Net (channels 32-512, 2 residual units) with a 224 px window, "
            f"overlap 0.25; median of {repeats} interleaved runs after a warm-up. Agreement = Dice between the "
            f"thresholded (0.5) masks and MONAI's; the blending differs (Gaussian vs constant), so masks are not "
            f"expected to be identical. Machine: {machine(SHARED)}, {torch.get_num_threads()} threads.",
            "",
            "| inference | time | speed-up vs MONAI defaults | mask agreement (Dice) | max prob. difference |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )


STEP_REFERENCE = "MONAI U-Net + DiceCELoss, fp32, torch AdamW"
STEP_OURS = "medalign, as the Engine trains it (bf16)"


class SegmentStep:
    """One optimisation step of a segmentation model, the engine's way or the plain loop's.

    ``medalign``: ``SegmentTask.training_step`` (Dice + BCE) under CPU bf16 autocast (what
    Fabric's ``bf16-mixed`` does), ``build_optimizer`` (fused AdamW), gradient clipping,
    scheduler; optionally channels-last weights and activations, or ``torch.compile``.
    Reference: the same MONAI modules in fp32, ``monai.losses.DiceCELoss(sigmoid=True)``,
    ``torch.optim.AdamW`` at its defaults: the loop a MONAI tutorial writes.
    """

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], **how: Any) -> None:
        from medalign.config import OptimConfig, SegLossConfig
        from medalign.engine import build_optimizer, build_scheduler
        from medalign.tasks.segment import SegmentTask

        self.how, self.batch = how, batch
        if how.get("reference"):
            from monai.losses import DiceCELoss

            self.model = model
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
            loss = self.loss(self.model(self.batch["image"]), self.batch["mask"])
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


def bench_step(rounds: int, steps: int, batch_size: int = 16, size: int = 256) -> str:
    """Training step of the Kvasir recipe's U-Net, medalign's setups next to the plain MONAI loop."""
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
    plain = torch.nn.Sequential(copy.deepcopy(ours.net), copy.deepcopy(ours.to_logits)).train()
    setups = {
        STEP_REFERENCE: SegmentStep(plain, batch, reference=True),
        STEP_OURS: SegmentStep(copy.deepcopy(ours), batch),
        "medalign bf16 + channels-last": SegmentStep(copy.deepcopy(ours), batch, channels_last=True),
        "medalign bf16 + torch.compile": SegmentStep(copy.deepcopy(ours), batch, compile=True),
        "medalign fp32 (precision 32-true)": SegmentStep(copy.deepcopy(ours), batch, bf16=False),
    }
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
    medians = {name: statistics.median(r) for name, r in rates.items()}
    rows = [
        f"| {name} | {medians[name]:.2f} | {min(r):.2f}–{max(r):.2f} | {1000 * batch_size / medians[name]:.0f} "
        f"| {medians[name] / medians[STEP_REFERENCE]:.2f} | {warm[name]:.0f} s | {first[name]:.3f} → {last[name]:.3f} |"
        for name, r in rates.items()
    ]
    n_params = sum(p.numel() for p in ours.parameters())
    return "\n".join(
        [
            f"Batch {batch_size} RGB images at {size} px with disk masks (the Kvasir recipe's input), MONAI U-Net "
            f"32-512 channels, 2 residual units, {n_params / 1e6:.1f}M parameters, identical initial weights in "
            f"every setup; 2 warm-up steps, then {rounds} alternating rounds of {steps} steps (median). "
            f"Machine: {machine()}, {torch.get_num_threads()} threads.",
            "",
            "| setup | images/s | range | ms/step | ÷ reference | first 2 steps | loss |",
            "|---|---|---|---|---|---|---|",
            *rows,
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
    parser.add_argument("--write", action="store_true")
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
    benches: dict[str, Callable[[], str]] = {
        "step": lambda: bench_step(args.rounds, args.steps),
        "sliding": lambda: bench_sliding(args.repeats),
        "phantom": lambda: bench_phantom(epochs or 10, args.seeds or 1),
        "monuseg": lambda: bench_monuseg(epochs or 40, args.seeds or 2),
    }
    body = benches[args.bench]()
    print(body)
    if args.write:
        write_section(args.bench, body, script="bench_segment", title=TITLES[args.bench])


if __name__ == "__main__":
    main()
