"""Segmentation quality and inference speed, each next to its reference in one run.

    python benchmarks/bench_segment.py step     [--write]   # one training step: ours vs the plain MONAI loop
    python benchmarks/bench_segment.py sliding  [--write]   # ours vs MONAI sliding_window_inference defaults
    python benchmarks/bench_segment.py busi     [--write]   # 3 folds, U-Net vs CLIP-feature decoder
    python benchmarks/bench_segment.py kvasir   [--write]   # PraNet 900/100 split

Text-guided segmentation (phantom, MoNuSeg, QaTa-COV19) is benchmarks/bench_text_segment.py.

``--epochs N`` / ``--seeds K`` shrink a schedule (the defaults are what BENCHMARKS.md reports).
Each run lives in ``$MEDALIGN_BENCH_RUNS/<name>`` (default /tmp/medalign-bench); a finished run
(``metrics.json`` written by the same schedule) is reused, an interrupted one resumes.

Protocols (written into BENCHMARKS.md with the numbers):

* kvasir: 1000 pairs split 900 train / 100 test (seeded; PraNet's file list is not shipped with
  the data), the recipe's 256 px (PraNet trains at 352), per-image mean Dice/IoU on the 100, configs/segment/kvasir.yaml.
* busi: the 3 NextGen-UIA folds of benign+malignant images (folds/busi_{train,val}k.txt): train
  on train k, evaluate on the held-out val k; U-Net (configs/segment/busi.yaml) and the
  CLIP-feature decoder initialised from the MedPix-aligned vision tower
  (configs/segment/clipseg_busi.yaml), 128 px grayscale; Dice / IoU / HD95 mean ± std over folds.
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

from benchlib import REPO, RUNS, imported, machine, train, write_section
from medalign.config import load_config

SHARED = (
    " shared with other benchmark processes (train times are indicative, not comparable across rows; "
    "1-2 torch threads per process)"
)

KVASIR_PUBLISHED = {"U-Net (published, PraNet paper)": 0.818, "PraNet (published)": 0.898}


def recipe_size(recipe: str) -> int:
    """The training resolution a recipe sets (the protocol line quotes it)."""
    config = load_config(REPO / "configs" / "segment" / f"{recipe}.yaml")
    return int(config.model.overrides.get("image_size", 224))


def pct(values: list[float]) -> str:
    """``mean ± std`` in percent (std over runs; single runs show the value alone)."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def num(values: list[float | None]) -> str:
    kept = [v for v in values if v is not None]
    if not kept:
        return "–"
    if len(kept) == 1:
        return f"{kept[0]:.2f}"
    return f"{statistics.mean(kept):.2f} ± {statistics.stdev(kept):.2f}"


def seconds(results: list[dict[str, Any]]) -> str:
    return f"{sum(r['train']['seconds'] for r in results) / len(results):.0f} s"


# ---------------------------------------------------------------------------------------------


def bench_kvasir(epochs: int, seeds: int) -> str:
    manifest = imported("kvasir_900_100", "kvasir", "kvasir-seg", fractions={"train": 0.9, "test": 0.1})
    results = [
        train(
            "kvasir",
            f"seg_kvasir_s{seed}",
            [f"data.manifest={manifest}", f"train.epochs={epochs}", f"train.seed={seed}"],
            folder="segment",
        )
        for seed in range(seeds)
    ]
    rows = [
        f"| medalign U-Net | {num([r['dice'] for r in results])} | {num([r['iou'] for r in results])} "
        f"| {len(results)} | {seconds(results)} |"
    ]
    rows += [f"| {name} | {dice:.3f} | – | – | – |" for name, dice in KVASIR_PUBLISHED.items()]
    return "\n".join(
        [
            f"Kvasir-SEG, 900 train / {results[0]['n_images']} test (seeded split), {recipe_size('kvasir')} px, "
            f"{epochs} epochs; "
            f"per-image mean Dice / IoU (fractions). Machine: {machine(SHARED)}.",
            "",
            "| model | Dice | IoU | seeds | train time / seed |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )


def bench_busi(epochs: int, init_from: Path) -> str:
    rows = []
    # the U-Net at the aligned tower's 128 px (the recipe's 256 px would cost 4x the CPU time)
    models = [("busi", "U-Net", ["model.overrides={in_channels: 1, image_size: 128}"])]
    if (init_from / "config.json").is_file():
        models.append(
            ("clipseg_busi", "CLIP-feature decoder (MedPix-aligned ViT)", [f"model.init_from={init_from}"])
        )
    else:
        models.append(("clipseg_busi", "CLIP-feature decoder (random init)", ["model.init_from=null"]))
    for recipe, label, extra in models:
        results = []
        for fold in (1, 2, 3):
            manifest = imported("busi", "busi", "busi", fold=fold)
            results.append(
                train(
                    recipe,
                    f"seg_{recipe}_fold{fold}",
                    [f"data.manifest={manifest}", f"train.epochs={epochs}", *extra],
                    folder="segment",
                )
            )
        rows.append(
            f"| {label} | {pct([r['dice'] for r in results])} | {pct([r['iou'] for r in results])} "
            f"| {num([r['hd95'] for r in results])} | {sum(r['hd95_undefined'] for r in results)} | {seconds(results)} |"
        )
    return "\n".join(
        [
            f"BUSI, the 3 NextGen-UIA folds (benign + malignant; train on train k, evaluate on the held-out "
            f"val k), 128 px grayscale for both models, {epochs} epochs; per-image Dice / IoU and HD95 (pixels), mean ± std "
            f"over the folds; images whose HD95 is undefined (empty prediction) are counted, not dropped. "
            f"Machine: {machine(SHARED)}.",
            "",
            "| model | Dice % | IoU % | HD95 px | HD95 undefined | train time / fold |",
            "|---|---|---|---|---|---|",
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
    "busi": "BUSI segmentation, 3 folds",
    "kvasir": "Kvasir-SEG (900/100)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=list(TITLES))
    parser.add_argument("--epochs", type=int, default=None, help="override the schedule's epochs")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="step: alternating timed rounds")
    parser.add_argument("--steps", type=int, default=3, help="step: timed steps per round and setup")
    parser.add_argument("--init-from", type=Path, default=RUNS / "align_medpix" / "bundle")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    epochs = args.epochs
    benches: dict[str, Callable[[], str]] = {
        "step": lambda: bench_step(args.rounds, args.steps),
        "sliding": lambda: bench_sliding(args.repeats),
        "busi": lambda: bench_busi(epochs or 8, args.init_from),
        "kvasir": lambda: bench_kvasir(epochs or 3, args.seeds or 1),
    }
    body = benches[args.bench]()
    print(body)
    if args.write:
        write_section(args.bench, body, script="bench_segment", title=TITLES[args.bench])


if __name__ == "__main__":
    main()
