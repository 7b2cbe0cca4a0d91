"""Does Stage I pretraining pay off downstream, and what does each curriculum stage add?

    python benchmarks/bench_curriculum.py label_efficiency [--write]  # Kvasir Dice, BUSI classification
    python benchmarks/bench_curriculum.py ablation [--write]          # phantom curriculum, stages skipped

Each run lives in ``$MEDALIGN_BENCH_RUNS/<name>`` (default /tmp/medalign-bench); a finished run
(same overrides) is reused and an interrupted one resumes.

Protocols (written into BENCHMARKS.md with the numbers):

* label_efficiency: per dataset, one Stage I hybrid MAE (``configs/pretrain/<dataset>.yaml``,
  mae_small's CLIP-ViT, 128 px, two augmented views) on the TRAIN split's images (labels and
  masks unused). Downstream models start either from that encoder or from the same MAE
  architecture before training (its untrained bundle: identical tower, input size and
  normalisation, so the only difference is the pretraining) and see 10% or 100% of the train
  split's patients (``data.train_fraction``, nested, seeded), for the SAME number of optimiser
  steps. Kvasir-SEG: the importer's seeded 900/100 split; a CLIP-feature decoder
  (``clip_decoder``) on the tower; per-image Dice on the 100 test images. BUSI: the importer's
  class-stratified seeded split (0.7/0.1/0.2); a diagnosis head on the tower
  (``configs/clinical/busi_scratch.yaml``, benign / malignant / normal); test ACC, balanced ACC, macro AUC.
* ablation: ``configs/curriculum/phantom.yaml`` with CPU-sized epochs (below), ``run_ablation``
  over the full chain 1-2-3, chains without Stage I or II, and Stage III alone; the last
  stage's test metrics side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import benchlib
from benchlib import REPO, RUNS, imported, train, write_section
from medalign.bundle import save_bundle
from medalign.config import load_config
from medalign.curriculum import metric
from medalign.run import build_model

FRACTIONS = (0.1, 1.0)


def machine() -> str:
    return benchlib.machine(" shared with other processes", ", bf16 autocast")


def untrained_bundle(recipe: str, run: str, overrides: list[str]) -> Path:
    """The pretraining recipe's model before any step (seeded): the random-init baseline's start."""
    path = RUNS / run / "bundle"
    if not (path / "config.json").is_file():
        config = load_config(REPO / "configs" / f"{recipe}.yaml", [f"out={RUNS / run}", *overrides])
        torch.manual_seed(config.train.seed)
        save_bundle(build_model(config), path)
    return path


def downstream(
    dataset: str, recipe: str, starts: dict[str, Path], overrides: list[str], metric_keys: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for fraction in FRACTIONS:
        for start, bundle in starts.items():
            metrics = train(
                recipe,
                f"labeleff_{dataset}_{start}_{int(fraction * 100)}",
                [*overrides, f"model.init_from={bundle}", f"data.train_fraction={fraction}"],
            )
            rows.append(
                {
                    "labels": f"{int(fraction * 100)}%",
                    "start": start,
                    **{k: metric(metrics, k) for k in metric_keys},
                    "seconds": metrics["train"]["seconds"],
                }
            )
    return rows


def table(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    lines = [
        "| labels | encoder start | " + " | ".join(keys) + " | train s |",
        "|---|---|" + "---|" * (len(keys) + 1),
    ]
    for row in rows:
        cells = [f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append(
            f"| {row['labels']} | {row['start']} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |"
        )
    return lines


def bench_label_efficiency(pretrain_epochs: int, steps: int) -> str:
    sections = []
    # -- Kvasir-SEG: segmentation Dice ---------------------------------------------------------
    kvasir = imported("kvasir_900_100", "kvasir", "kvasir-seg", fractions={"train": 0.9, "test": 0.1})
    common = [f"data.manifest={kvasir}", "data.num_workers=1"]
    pre = train("pretrain/kvasir", "labeleff_kvasir_mae", [*common, f"train.epochs={pretrain_epochs}"])
    starts = {
        "Stage I MAE": RUNS / "labeleff_kvasir_mae" / "bundle",
        "random (same MAE, untrained)": untrained_bundle(
            "pretrain/kvasir", "labeleff_kvasir_mae_init", common
        ),
    }
    seg = [
        *common,
        "model.name=clip_decoder",
        "model.overrides={decoder_dim: 64}",
        f"train.max_steps={steps}",
        "train.epochs=1000",
        "data.batch_size=16",
        "eval.split=test",
        "optim.lr=1.0e-3",
    ]
    rows = downstream("kvasir", "segment/kvasir", starts, seg, ["dice", "iou"])
    sections += [
        f"Kvasir-SEG (seeded 900/100 split), 128 px RGB. Stage I: hybrid MAE (mae_small, 2 augmented views, "
        f"InfoNCE weight 0.1) for {pretrain_epochs} epochs on the 900 train images "
        f"({pre['train']['steps']} steps, {pre['train']['seconds']:.0f} s; test masked-patch loss "
        f"{pre.get('reconstruction', float('nan')):.4f}). Downstream: clip_decoder (decoder 64 wide, tower "
        f"fine-tuned), AdamW lr 1e-3, batch 16, {steps} steps for every row, per-image Dice / IoU on the 100 test images.",
        "",
        *table(rows, ["dice", "iou"]),
        "",
    ]
    # -- BUSI: diagnosis --------------------------------------------------------------------------
    busi = imported("busi_stratified", "busi", "busi")
    common = [f"data.manifest={busi}", "data.num_workers=1"]
    pre = train(
        "pretrain/busi", "labeleff_busi_mae", [*common, f"train.epochs={pretrain_epochs}", "eval.probe=false"]
    )
    starts = {
        "Stage I MAE": RUNS / "labeleff_busi_mae" / "bundle",
        "random (same MAE, untrained)": untrained_bundle("pretrain/busi", "labeleff_busi_mae_init", common),
    }
    cls = [*common, f"train.max_steps={steps}", "train.epochs=1000", "data.batch_size=16", "eval.split=test"]
    keys = ["diagnosis.accuracy", "diagnosis.balanced_accuracy", "diagnosis.auc"]
    rows = downstream("busi", "clinical/busi_scratch", starts, cls, keys)
    sections += [
        f"BUSI (class-stratified seeded split 0.7/0.1/0.2), 128 px grayscale, benign / malignant / normal. "
        f"Stage I: hybrid MAE for {pretrain_epochs} epochs on the train images ({pre['train']['steps']} steps, "
        f"{pre['train']['seconds']:.0f} s). Downstream: the diagnosis head of configs/clinical/busi_scratch.yaml on the "
        f"tower, batch 16, {steps} steps for every row; test ACC, balanced ACC, macro one-vs-rest AUC.",
        "",
        *table(rows, keys),
        "",
        f"Machine: {machine()}.",
    ]
    return "\n".join(sections)


def bench_ablation(overrides: list[str]) -> str:
    from medalign.curriculum import load_curriculum, run_ablation

    curriculum = load_curriculum(
        REPO / "configs" / "curriculum" / "phantom.yaml", [f"out={RUNS / 'curriculum_phantom'}", *overrides]
    )
    result = run_ablation(curriculum, echo=print)
    from medalign.curriculum import ablation_markdown

    return "\n".join(
        [
            "Phantom curriculum (configs/curriculum/phantom.yaml), overrides: "
            + (", ".join(f"`{o}`" for o in overrides) or "none")
            + f"; the last stage's test metrics for each chain. Machine: {machine()}.",
            "",
            ablation_markdown(result["rows"], result["headline"]),
        ]
    )


TITLES = {
    "label_efficiency": "Label efficiency: Stage I pretrained vs random-init encoder",
    "ablation": "Curriculum ablation on the phantom",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=list(TITLES))
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=400, help="downstream optimiser steps per run")
    parser.add_argument("--override", action="append", default=[], help="curriculum override (ablation)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.bench == "label_efficiency":
        body = bench_label_efficiency(args.pretrain_epochs, args.steps)
    else:
        body = bench_ablation(args.override)
    print(body)
    if args.write:
        write_section(args.bench, body, script="bench_curriculum", title=TITLES[args.bench])


if __name__ == "__main__":
    main()
