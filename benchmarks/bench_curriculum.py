"""Does each curriculum stage pay? The HiCur-NPC chain on the phantom (quickstart and benchmark
scale) and on LGG, why the old chain did not pay, and Stage I's label efficiency.

    python benchmarks/bench_curriculum.py quickstart [--seeds 3] [--before-seeds 1]  # the quickstart's step (and the old one)
    python benchmarks/bench_curriculum.py ablation [--seeds 3]     # configs/curriculum/phantom.yaml as shipped
    python benchmarks/bench_curriculum.py lgg [--seeds 3]          # configs/curriculum/lgg.yaml: chain vs Stage III alone
    python benchmarks/bench_curriculum.py label_efficiency [--write]
    python benchmarks/render_docs.py                               # rewrite the blocks from the results files

Runs live in ``$MEDALIGN_BENCH_RUNS/curriculum_*`` (default /tmp/medalign-bench); a finished stage
with the same recipe is reused and an interrupted one resumes (``medalign.pipeline.curriculum``). Each of
the first three parts saves ``benchmarks/results/bench_curriculum_<part>.json`` (numbers,
protocol, machine, date, seeds); ``blocks()`` renders README.md / BENCHMARKS.md from those files.

Protocols (also written above each table):

* quickstart: what ``medalign quickstart --seed s`` runs in its curriculum step, for s = 0, 1, 2
  (each seed generates its own 480-case phantom and seeds training), with the step's overrides
  (``medalign.pipeline.quickstart.curriculum_overrides``): chains 1-2-3, 1-3 and 3, test split. The same
  seeds with the chain as it was before issue 20 (``BEFORE``: Stage II on one modality per row
  for 8 epochs of batch 32, one learning rate in Stage III), and the quickstart's standalone
  alignment step (``configs/align/phantom.yaml``) for Stage II's reference. The investigation
  (seed 0): what each transfer loads, how far Stage III moves the tower it was given, Stage I's
  features against the same tower untrained.
* ablation: ``medalign ablate --config configs/curriculum/phantom.yaml --seeds 3`` (the recipe's
  epochs, 480 cases, one phantom, seeds vary training), chains 1-2-3, 2-3, 1-3, 3.
* lgg: ``configs/curriculum/lgg.yaml`` on LGG (``medalign data import lgg ... -o record_text=true``,
  the importer's patient split 0.7/0.1/0.2): Stage I and II once per seed, Stage III for
  ``label:death`` and ``label:grade`` from the Stage II bundle and alone; patient-level AUC (mean
  slice probability per patient) with a 95% percentile bootstrap interval over test patients
  (2000 resamples), per seed and pooled over the seeds' predictions.
* label_efficiency: unchanged protocol (see its section).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import benchlib
from benchlib import REPO, RUNS, imported, train, write_section
from medalign.bundle import save_bundle
from medalign.config import load_config
from medalign.pipeline.curriculum import metric
from medalign.pipeline.run import build_model

FRACTIONS = (0.1, 1.0)
PHANTOM = REPO / "configs" / "curriculum" / "phantom.yaml"
LGG = REPO / "configs" / "curriculum" / "lgg.yaml"
QUICKSTART_CHAINS = [[1, 2, 3], [1, 3], [3]]
ABLATION_CHAINS = [[1, 2, 3], [2, 3], [1, 3], [3]]
# The quickstart's chain before issue 20 (overrides on top of today's step): Stage II paired
# each modality's image with the report (one row per modality, 1 channel) for 8 epochs of
# batch 32, Stage I 12 and Stage III 16 epochs, one learning rate for the whole Stage III model.
BEFORE = [
    "stage1.train.epochs=12",
    "stage2.train.epochs=8",
    "stage2.data.batch_size=32",
    "stage2.data.modality_rows=true",
    "stage2.data.channels=1",
    "stage2.model.overrides.in_channels=1",
    "stage2.model.overrides.image_modalities=1",
    "stage2.model.overrides.projection=linear",
    "stage3.train.epochs=16",
    "stage3.optim.layer_decay={}",
    "stage3.optim.lr_multipliers={}",
]
STAGE3_KEYS = {
    "auc": "diagnosis.auc",
    "balanced_accuracy": "diagnosis.balanced_accuracy",
    "accuracy": "diagnosis.accuracy",
    "ece": "diagnosis.ece",
    "c_index": "survival.c_index",
    "td_auc": "survival.td_auc.mean",
}


def machine() -> str:
    return benchlib.machine(
        f" shared with other processes, {torch.get_num_threads()} torch thread(s)", ", bf16 autocast"
    )


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))


def stage1_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """View retrieval against chance and the linear probe of the diagnosis on the frozen encoder."""
    return {
        "retrieval_r1": metric(metrics, "retrieval.R@1"),
        "retrieval_chance": 1 / metrics["n_pairs"],
        "probe_balanced_accuracy": metric(metrics, "probe.test.balanced_accuracy"),
        "probe_accuracy": metric(metrics, "probe.test.accuracy"),
        "reconstruction": metrics["reconstruction"],
        "steps": metrics["train"]["steps"],
        "seconds": metrics["train"]["seconds"],
    }


def stage2_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "zeroshot_accuracy": metric(metrics, "zeroshot.accuracy"),
        "zeroshot_auc": metric(metrics, "zeroshot.auc"),
        "zeroshot_n": metric(metrics, "zeroshot.n"),
        "image_to_text_r1": metric(metrics, "retrieval.image_to_text.R@1"),
        "steps": metrics["train"]["steps"],
        "seconds": metrics["train"]["seconds"],
    }


def stage3_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        **{name: metric(metrics, key) for name, key in STAGE3_KEYS.items()},
        "steps": metrics["train"]["steps"],
        "seconds": metrics["train"]["seconds"],
    }


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample std (n - 1) over seeds, the values kept; one value has no std (None)."""
    floats = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.fmean(floats) if floats else None,
        "std": statistics.stdev(floats) if len(floats) > 1 else None,
        "values": list(values),
    }


# ------------------------------------------------------------------------------ investigation


def tensor_audit(parent_bundle: Path, config: Any) -> dict[str, Any]:
    """Which tensors a stage starts with from its parent: rebuild its model as the run did (seeded,
    ``build_model``) and compare every tensor with the parent bundle's, by name and value."""
    from medalign.bundle import load_bundle

    torch.manual_seed(config.train.seed)
    child = build_model(config).state_dict()
    parent = load_bundle(parent_bundle).state_dict()

    def by_module(names: Sequence[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in names:
            counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + 1
        return counts

    equal = [n for n, v in child.items() if n in parent and parent[n].shape == v.shape and torch.equal(parent[n], v)]
    tower = [n for n in parent if n.startswith("vision.")]
    return {
        "parent_tensors": len(parent),
        "parent_tower_tensors": len(tower),
        "child_tensors": len(child),
        "loaded_equal": len(equal),
        "tower_tensors_loaded": sum(n in equal for n in tower),
        "loaded_parameters": int(sum(child[n].numel() for n in equal)),
        "child_new": by_module([n for n in child if n not in equal]),
        "parent_not_used": by_module([n for n in parent if n not in equal]),
    }


def tower_drift(start_bundle: Path, end_bundle: Path) -> dict[str, float]:
    """Relative change ||W_end - W_start|| / ||W_start|| of the vision tower, overall and per block."""
    from safetensors.torch import load_file

    start = {k: v.float() for k, v in load_file(Path(start_bundle) / "model.safetensors").items() if k.startswith("vision.")}
    end = load_file(Path(end_bundle) / "model.safetensors")
    parts: dict[str, list[float]] = {}
    for name, value in start.items():
        part = "embeddings" if "embeddings" in name else name.split("layers.")[1].split(".")[0] if "layers." in name else "norms"
        delta = float((end[name].float() - value).norm() ** 2)
        parts.setdefault(part, [0.0, 0.0])
        parts[part][0] += delta
        parts[part][1] += float(value.norm() ** 2)
    total = [sum(p[0] for p in parts.values()), sum(p[1] for p in parts.values())]
    return {
        "tower": (total[0] / total[1]) ** 0.5,
        **{f"layer {k}" if k.isdigit() else k: (d / n) ** 0.5 for k, (d, n) in sorted(parts.items())},
    }


def untrained_stage1(curriculum: Any, out: Path) -> dict[str, Any]:
    """Stage I's evaluation (retrieval, probe) of the same MAE before any step: the floor."""
    from medalign.pipeline.curriculum import stage_config
    from medalign.pipeline.run import prepare_run
    from medalign.tasks.pretrain import evaluate_pretrain, pretrain_columns

    path = out / "metrics.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = stage_config(curriculum, [1])
    config.out = str(out)
    _, manifest = prepare_run(config)
    model = build_model(config)
    model.cpu().float().eval()
    metrics = evaluate_pretrain(model, manifest, config, pretrain_columns(config, manifest))
    metrics["train"] = {"steps": 0, "seconds": 0.0}
    path.write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    return metrics


def feature_spread(bundle: Path | None, curriculum: Any) -> dict[str, float]:
    """How much the tower's pooled feature of a test image depends on the image: the mean over
    feature dimensions of the std across 64 test images of modality a, relative to the mean
    absolute feature. A pooled feature that barely changes with the image gives every head
    (and the contrastive term) nothing to work with."""
    from medalign.bundle import load_bundle
    from medalign.data.dataset import Collator, dataset_for_model
    from medalign.data.manifest import read_manifest
    from medalign.pipeline.curriculum import stage_config
    from medalign.tasks.columns import per_modality_data

    config = stage_config(curriculum, [1])
    torch.manual_seed(config.train.seed)
    model = (load_bundle(bundle) if bundle else build_model(config)).float().eval()
    manifest = read_manifest(config.data.manifest)
    dataset = dataset_for_model(manifest, model, "test", None, ["image:a"], data=per_modality_data(config, model))
    batch = Collator()([dataset[i] for i in range(min(64, len(dataset)))])
    with torch.no_grad():
        features = model.encode(batch["image:a"])
    return {
        "std_across_images": float(features.std(0).mean()),
        "mean_abs": float(features.abs().mean()),
        "relative": float(features.std(0).mean() / features.abs().mean()),
    }


def contrastive_trace(run_dir: Path) -> dict[str, float]:
    """Stage I's logged InfoNCE at the first and last logged step against ln(batch), its value
    when the two views' embeddings carry no information about which case they come from."""
    import csv
    import math

    rows = [r for r in csv.DictReader((Path(run_dir) / "logs" / "metrics.csv").open()) if r["key"] == "train/contrastive"]
    batch = stage_batch(run_dir)
    return {"first": float(rows[0]["value"]), "last": float(rows[-1]["value"]), "chance": math.log(batch)}


def stage_batch(run_dir: Path) -> int:
    import yaml

    return int(yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["data"]["batch_size"])


def investigate(curriculum: Any, label: str) -> dict[str, Any]:
    """Seed 0 of a chain: what each transfer loads, how Stage III moves the tower, Stage I's floor."""
    from medalign.pipeline.curriculum import stage_config

    run = curriculum.run_dir
    stage3 = stage_config(curriculum, [1, 2, 3])
    return {
        "chain": label,
        "transfer_1_to_2": tensor_audit(run([1]) / "bundle", stage_config(curriculum, [1, 2])),
        "transfer_2_to_3": tensor_audit(run([1, 2]) / "bundle", stage3),
        "stage3_optim": {
            "lr": stage3.optim.lr,
            "warmup_steps": stage3.optim.warmup_steps,
            "lr_multipliers": stage3.optim.lr_multipliers,
            "layer_decay": stage3.optim.layer_decay,
            "freeze_vision": bool(stage3.model.overrides.get("freeze_vision", False)),
        },
        "stage3_tower_drift": tower_drift(run([1, 2]) / "bundle", run([1, 2, 3]) / "bundle"),
        "untrained_stage1": stage1_summary(untrained_stage1(curriculum, curriculum.out / "untrained_stage1")),
        "stage1_contrastive": contrastive_trace(run([1])),
        "feature_spread": {
            "untrained": feature_spread(None, curriculum),
            "stage1": feature_spread(run([1]) / "bundle", curriculum),
        },
    }


# ---------------------------------------------------------------------------------- quickstart


def quickstart_curriculum(seed: int, before: bool) -> Any:
    """The curriculum as the quickstart's step builds it for one seed (its phantom, its overrides)."""
    from medalign.data.phantom import PhantomConfig, generate_phantom
    from medalign.pipeline.curriculum import load_curriculum
    from medalign.pipeline.quickstart import QuickstartContext, curriculum_overrides

    folder = RUNS / "curriculum_quickstart" / f"seed_{seed}"
    manifest = folder / "phantom" / "manifest.csv"
    if not manifest.is_file():
        generate_phantom(manifest.parent, PhantomConfig(n=480, seed=seed))
    ctx = QuickstartContext(folder, 480, seed, print, artifacts={"manifest": manifest})
    name = "before" if before else "after"
    overrides = [*curriculum_overrides(ctx), f"out={folder / name}", "train.progress=false", *(BEFORE if before else [])]
    return load_curriculum(PHANTOM, overrides)


def quickstart_seed(seed: int, before: bool) -> dict[str, Any]:
    """The quickstart's curriculum step for one seed, chains side by side (plus 2-3 after the fix)."""
    from medalign.pipeline.curriculum import run_curriculum

    curriculum = quickstart_curriculum(seed, before)
    name = "before" if before else "after"
    start = time.perf_counter()
    chains = {}
    for chain in QUICKSTART_CHAINS if before else [*QUICKSTART_CHAINS, [2, 3]]:
        last = run_curriculum(curriculum, chain, echo=lambda *_: None)[-1]
        chains["-".join(map(str, chain))] = stage3_summary(read_metrics(last))
    result = {
        "seed": seed,
        "stage1": stage1_summary(read_metrics(curriculum.run_dir([1]))),
        "stage2": stage2_summary(read_metrics(curriculum.run_dir([1, 2]))),
        "chains": chains,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    if seed == 0:
        result["investigation"] = investigate(curriculum, name)
    return result


def standalone_alignment(seed: int) -> dict[str, Any]:
    """The quickstart's alignment step (``configs/align/phantom.yaml`` as it runs there) for one seed."""
    from medalign.pipeline.quickstart import QuickstartContext, step_align

    folder = RUNS / "curriculum_quickstart" / f"seed_{seed}"
    run = folder / "align"
    if not (run / "metrics.json").is_file():
        ctx = QuickstartContext(folder, 480, seed, lambda *_: None, artifacts={"manifest": folder / "phantom" / "manifest.csv"})
        step_align(ctx)
    return stage2_summary(read_metrics(run))


def bench_quickstart(seeds: int, before_seeds: int) -> dict[str, Any]:
    from medalign.pipeline.quickstart import CURRICULUM_EPOCHS

    runs = {
        "after": [quickstart_seed(s, before=False) for s in range(seeds)],
        "before": [quickstart_seed(s, before=True) for s in range(before_seeds)],
    }
    return {
        "protocol": (
            "medalign quickstart's curriculum step (480-case phantom of the seed, 64 px, test split of "
            "71 cases), seeds 0..N-1 as `--seed` (data and training); 'after' = today's step plus the "
            "2-3 chain, 'before' = the step before issue 20; standalone = the quickstart's alignment step"
        ),
        "epochs": {str(k): v for k, v in CURRICULUM_EPOCHS.items()},
        "before_overrides": BEFORE,
        "seeds": list(range(seeds)),
        "runs": runs,
        "standalone_alignment": [standalone_alignment(s) for s in range(seeds)],
        "machine": machine(),
    }


# ------------------------------------------------------------------------------------ ablation


def bench_ablation(seeds: int) -> dict[str, Any]:
    from medalign.pipeline.curriculum import load_curriculum, run_ablation, with_seed

    curriculum = load_curriculum(PHANTOM, [f"out={RUNS / 'curriculum_phantom'}", "train.progress=false"])
    result = run_ablation(curriculum, ABLATION_CHAINS, seeds=seeds, echo=lambda *_: None)
    per_seed = []
    for seed in result["seeds"]:
        seeded = with_seed(curriculum, seed) if seeds > 1 else curriculum
        per_seed.append(
            {
                "seed": seed,
                "stage1": stage1_summary(read_metrics(seeded.run_dir([1]))),
                "stage2": stage2_summary(read_metrics(seeded.run_dir([1, 2]))),
                "stage2_alone": stage2_summary(read_metrics(seeded.run_dir([2]))),
                "chains": {
                    "-".join(map(str, c)): stage3_summary(read_metrics(seeded.run_dir(c))) for c in ABLATION_CHAINS
                },
            }
        )
    return {
        "protocol": (
            "configs/curriculum/phantom.yaml as shipped (480 cases, phantom seed 0, 64 px), "
            f"`medalign ablate --seeds {seeds}`: training seeds vary, test split of 71 cases"
        ),
        "seeds": result["seeds"],
        "runs": per_seed,
        "machine": machine(),
    }


# ----------------------------------------------------------------------------------------- LGG


def patient_auc(run_dir: Path, patient_of: dict[str, str], n_boot: int = 2000) -> dict[str, Any]:
    """Patient-level AUC (mean slice probability, as ``patient_level`` in metrics.json) with a 95%
    percentile bootstrap interval over the test patients (``n_boot`` resamples, seed 0)."""
    from sklearn.metrics import roc_auc_score

    metrics = read_metrics(run_dir)
    patient = metrics["patient_level"]["diagnosis"]
    positive = patient["class_names"][1]
    slices: dict[str, list[float]] = {}
    label_of: dict[str, int] = {}
    for row in metrics["per_case"]:
        if row["label"] >= 0:
            slices.setdefault(patient_of[row["case_id"]], []).append(row["probs"][positive])
            label_of[patient_of[row["case_id"]]] = row["label"]
    scores = np.array([np.mean(v) for v in slices.values()])
    labels = np.array([label_of[p] for p in slices])
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) == 2:
            draws.append(roc_auc_score(labels[idx], scores[idx]))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "ci95": [float(low), float(high)],
        "balanced_accuracy": patient["balanced_accuracy"],
        "n_patients": len(labels),
        "slice_auc": metrics["diagnosis"]["auc"],
        "steps": metrics["train"]["steps"],
        "seconds": metrics["train"]["seconds"],
    }


def bench_lgg(seeds: int) -> dict[str, Any]:
    from medalign.data.manifest import read_manifest
    from medalign.pipeline.curriculum import load_curriculum, run_curriculum, stage_config, with_seed
    from medalign.pipeline.run import run_training

    manifest = imported("lgg_records", "lgg", "lgg_mri", record_text=True)
    table = read_manifest(manifest).table
    patient_of = dict(zip(table["case_id"], table["patient_id"], strict=True))
    base = load_curriculum(LGG, [f"out={RUNS / 'curriculum_lgg'}", f"data.manifest={manifest}", "train.progress=false"])
    runs = []
    for seed in range(seeds):
        curriculum = with_seed(base, seed)
        first, second, _ = run_curriculum(curriculum, [1, 2, 3], echo=lambda *_: None)
        alone = run_curriculum(curriculum, [3], echo=lambda *_: None)[-1]
        targets = {"death": {
            "chain": patient_auc(curriculum.run_dir([1, 2, 3]), patient_of),
            "alone": patient_auc(alone, patient_of),
        }}
        for chain, folder in (([1, 2, 3], "grade_stages_1-2-3"), ([3], "grade_stages_3")):
            config = copy.deepcopy(stage_config(curriculum, chain))
            config.data.label = "label:grade"
            config.out = str(curriculum.out / folder)
            if not (Path(config.out) / "metrics.json").is_file():
                run_training(config, echo=lambda *_: None)
        targets["grade"] = {
            "chain": patient_auc(curriculum.out / "grade_stages_1-2-3", patient_of),
            "alone": patient_auc(curriculum.out / "grade_stages_3", patient_of),
        }
        runs.append(
            {
                "seed": seed,
                "stage1": stage1_summary(read_metrics(first)),
                "stage2_image_to_text_r1": metric(read_metrics(second), "retrieval.image_to_text.R@1"),
                "stage2_n": metric(read_metrics(second), "retrieval.image_to_text.n_queries"),
                "targets": targets,
            }
        )
    return {
        "protocol": (
            "configs/curriculum/lgg.yaml on LGG (importer's patient split 0.7/0.1/0.2: 77/11/22 patients), "
            "Stage I/II once per seed, Stage III for death01 and grade from Stage II and alone, test patients"
        ),
        "seeds": list(range(seeds)),
        "runs": runs,
        "machine": machine(),
    }


# ------------------------------------------------------------------------------------- blocks


def _pm(stats: dict[str, Any], digits: int = 3) -> str:
    if stats["mean"] is None:
        return "—"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def chain_table(runs: list[dict[str, Any]], chains: Sequence[str]) -> list[str]:
    keys = [("AUC", "auc"), ("balanced acc.", "balanced_accuracy"), ("C-index", "c_index"), ("td-AUC", "td_auc")]
    lines = [
        "| stages run | " + " | ".join(k for k, _ in keys) + " | Stage III steps |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    for chain in chains:
        cells = [_pm(spread([r["chains"][chain][key] for r in runs])) for _, key in keys]
        lines.append(f"| {chain} | " + " | ".join(cells) + f" | {runs[0]['chains'][chain]['steps']} |")
    return lines


def quickstart_blocks(data: dict[str, Any]) -> dict[str, str]:
    after, before = data["runs"]["after"], data["runs"]["before"]
    n = len(data["seeds"])
    seeds = f"{n} seeds, mean ± sample std" if n > 1 else "one seed (0)"
    standalone = spread([r["zeroshot_accuracy"] for r in data["standalone_alignment"]])

    def stage_lines(runs: list[dict[str, Any]]) -> list[str]:
        s1, s2 = [r["stage1"] for r in runs], [r["stage2"] for r in runs]
        return [
            f"Stage I a→b view retrieval R@1 {_pm(spread([s['retrieval_r1'] for s in s1]))} "
            f"(chance {s1[0]['retrieval_chance']:.3f}), diagnosis linear probe balanced accuracy "
            f"{_pm(spread([s['probe_balanced_accuracy'] for s in s1]))}; Stage II zero-shot diagnosis accuracy "
            f"{_pm(spread([s['zeroshot_accuracy'] for s in s2]))} (standalone alignment step "
            f"{_pm(standalone)}); whole step {_pm(spread([r['wall_seconds'] for r in runs]), 0)} s.",
        ]

    body = [
        f"Protocol: {data['protocol']}; {seeds}. Epochs per stage: "
        + ", ".join(f"Stage {k}: {v}" for k, v in data["epochs"].items())
        + f". Machine: {data['machine']}.",
        "",
        "**After** (the quickstart as shipped, and the 2-3 chain it does not run):",
        "",
        *chain_table(after, ["1-2-3", "2-3", "1-3", "3"]),
        "",
        *stage_lines(after),
    ]
    if before:
        body += [
            "",
            f"**Before** (the chain before issue 20, seeds 0–{len(before) - 1}):",
            "",
            *chain_table(before, ["1-2-3", "1-3", "3"]),
            "",
            *stage_lines(before),
        ]
    readme = [
        f"Over {seeds} (`--seed`; BENCHMARKS.md has the protocol) the step's Stage III table reads:",
        "",
        *chain_table(after, ["1-2-3", "1-3", "3"]),
    ]
    return {"bench_curriculum_quickstart": "\n".join(body), "readme_curriculum_quickstart": "\n".join(readme)}


def audit_lines(investigation: dict[str, Any]) -> list[str]:
    lines = []
    for key, title in (("transfer_1_to_2", "Stage I → II"), ("transfer_2_to_3", "Stage II → III")):
        a = investigation[key]
        new = ", ".join(f"{m} {c}" for m, c in sorted(a["child_new"].items()))
        unused = ", ".join(f"{m} {c}" for m, c in sorted(a["parent_not_used"].items()))
        lines.append(
            f"| {investigation['chain']} | {title} | {a['tower_tensors_loaded']} / {a['parent_tower_tensors']} | "
            f"{a['loaded_equal']} of {a['child_tensors']} ({a['loaded_parameters']:,} values) | {new} | {unused} |"
        )
    return lines


def diagnosis_block(data: dict[str, Any]) -> str:
    after = data["runs"]["after"][0]["investigation"]
    before = data["runs"]["before"][0]["investigation"] if data["runs"]["before"] else None
    investigated = [inv for inv in (before, after) if inv]
    lines = [
        "What each transfer starts with (seed 0; every tensor of the child model compared by name and value "
        "with the parent bundle, after `build_model` as the run calls it):",
        "",
        "| chain | transfer | parent tower tensors loaded | child tensors equal to the parent's | child's tensors not from the parent (by module) | parent's tensors not used |",
        "|---|---|---|---|---|---|",
        *(line for inv in investigated for line in audit_lines(inv)),
        "",
        "Stage III optimiser and how far it moves the tower it was given (‖W_end − W_start‖ / ‖W_start‖, seed 0):",
        "",
        "| chain | lr | warm-up steps | lr_multipliers | layer_decay | tower drift | embeddings | "
        + " | ".join(f"layer {i}" for i in range(4))
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * 4,
    ]
    for inv in investigated:
        o, d = inv["stage3_optim"], inv["stage3_tower_drift"]
        lines.append(
            f"| {inv['chain']} | {o['lr']:g} | {o['warmup_steps']} | {o['lr_multipliers'] or '—'} | "
            f"{o['layer_decay'] or '—'} | {d['tower']:.3f} | {d['embeddings']:.3f} | "
            + " | ".join(f"{d[f'layer {i}']:.3f}" for i in range(4))
            + " |"
        )
    untrained = after["untrained_stage1"]
    trained = {name: runs[0]["stage1"] for name, runs in data["runs"].items() if runs}
    contrastive, spread_ = after["stage1_contrastive"], after["feature_spread"]

    def both(key: str) -> str:
        return ", ".join(f"{s[key]:.3f} {name}" for name, s in [("untrained", untrained), *trained.items()])

    lines += [
        "",
        f"Stage I's encoder against the same MAE before any step (seed 0, test split): a→b view retrieval R@1 "
        f"{both('retrieval_r1')} (chance {untrained['retrieval_chance']:.3f}); diagnosis linear probe balanced "
        f"accuracy {both('probe_balanced_accuracy')}. Its logged InfoNCE went from {contrastive['first']:.3f} to "
        f"{contrastive['last']:.3f} (ln batch = {contrastive['chance']:.3f}: no information about which case a "
        f"view comes from); the pooled feature's spread across 64 test images, relative to its mean magnitude, is "
        f"{spread_['untrained']['relative']:.3f} untrained and {spread_['stage1']['relative']:.3f} after Stage I.",
    ]
    return "\n".join(lines)


def ablation_block(data: dict[str, Any]) -> str:
    runs = data["runs"]
    s1, s2, s2a = [r["stage1"] for r in runs], [r["stage2"] for r in runs], [r["stage2_alone"] for r in runs]
    return "\n".join(
        [
            f"Protocol: {data['protocol']}; {len(data['seeds'])} seeds (mean ± sample std). Machine: {data['machine']}.",
            "",
            *chain_table(runs, ["1-2-3", "2-3", "1-3", "3"]),
            "",
            f"Stage I a→b view retrieval R@1 {_pm(spread([s['retrieval_r1'] for s in s1]))} (chance "
            f"{s1[0]['retrieval_chance']:.3f}), probe balanced accuracy {_pm(spread([s['probe_balanced_accuracy'] for s in s1]))}; "
            f"Stage II zero-shot accuracy {_pm(spread([s['zeroshot_accuracy'] for s in s2]))} after Stage I, "
            f"{_pm(spread([s['zeroshot_accuracy'] for s in s2a]))} alone.",
        ]
    )


def lgg_block(data: dict[str, Any]) -> str:
    lines = [
        f"Protocol: {data['protocol']}; {len(data['seeds'])} seeds. Machine: {data['machine']}.",
        "",
        "| target | start | seed | patient AUC (95% bootstrap CI) | patient balanced acc. | slice AUC | test patients |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in ("death", "grade"):
        for start, title in (("chain", "1-2-3"), ("alone", "3 alone")):
            for run in data["runs"]:
                r = run["targets"][target][start]
                lines.append(
                    f"| {target} | {title} | {run['seed']} | {r['auc']:.3f} ({r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}) | "
                    f"{r['balanced_accuracy']:.3f} | {r['slice_auc']:.3f} | {r['n_patients']} |"
                )
            aucs = spread([run["targets"][target][start]["auc"] for run in data["runs"]])
            lines.append(f"| {target} | {title} | mean ± std | {_pm(aucs)} | | | |")
    s1 = [r["stage1"] for r in data["runs"]]
    lines += [
        "",
        f"Stage I pre→FLAIR view retrieval R@1 {_pm(spread([s['retrieval_r1'] for s in s1]))} "
        f"(chance {s1[0]['retrieval_chance']:.3f}); Stage II image→record R@1 "
        f"{_pm(spread([r['stage2_image_to_text_r1'] for r in data['runs']]))}.",
    ]
    return "\n".join(lines)


PARTS = ("quickstart", "ablation", "lgg")


def blocks() -> dict[str, str]:
    """Every block this script writes, from the committed results files alone.

    A part renders once its results file is committed (each is a long run on 2 cores:
    ``python benchmarks/bench_curriculum.py quickstart|ablation|lgg --seeds 3``); its markers
    go into the docs with it (quickstart: ``readme_curriculum_quickstart`` in README.md,
    ``bench_curriculum_quickstart`` and ``bench_curriculum_diagnosis`` in BENCHMARKS.md)."""
    out: dict[str, str] = {}
    if benchlib.results_path("bench_curriculum_quickstart").is_file():
        quickstart = benchlib.load_results("bench_curriculum_quickstart")
        out.update(quickstart_blocks(quickstart))
        out["bench_curriculum_diagnosis"] = diagnosis_block(quickstart)
    for part, render in (("ablation", ablation_block), ("lgg", lgg_block)):
        if benchlib.results_path(f"bench_curriculum_{part}").is_file():
            out[f"bench_curriculum_{part}"] = render(benchlib.load_results(f"bench_curriculum_{part}"))
    return out


# ---------------------------------------------------------------------------- label efficiency


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=[*PARTS, "label_efficiency"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--before-seeds", type=int, default=0, help="quickstart: seeds of the pre-issue-20 chain too")
    parser.add_argument("--pretrain-epochs", type=int, default=30, help="label_efficiency")
    parser.add_argument("--steps", type=int, default=400, help="label_efficiency: downstream optimiser steps per run")
    parser.add_argument("--write", action="store_true", help="label_efficiency: write its section")
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.bench == "label_efficiency":
        body = bench_label_efficiency(args.pretrain_epochs, args.steps)
        print(body)
        if args.write:
            write_section(
                "label_efficiency", body, script="bench_curriculum",
                title="Label efficiency: Stage I pretrained vs random-init encoder",
            )  # fmt: skip
        return
    start = time.perf_counter()
    if args.bench == "quickstart":
        data = bench_quickstart(args.seeds, args.before_seeds)
    else:
        data = {"ablation": bench_ablation, "lgg": bench_lgg}[args.bench](args.seeds)
    data["date"] = time.strftime("%Y-%m-%d")
    data["total_seconds"] = round(time.perf_counter() - start, 1)
    path = benchlib.save_results(f"bench_curriculum_{args.bench}", data)
    print(f"wrote {path}; python benchmarks/render_docs.py rewrites the blocks")


if __name__ == "__main__":
    main()
