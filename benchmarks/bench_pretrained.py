"""Pretrained image towers against the same models trained from scratch: MedPix 2.0 alignment
(LiT) and BUSI 3-class classification (fine-tuned, and linear probes), same protocol per row.

    python benchmarks/bench_pretrained.py medpix [--seeds 0 1 2] [--write]
    python benchmarks/bench_pretrained.py busi   [--seeds 0 1 2] [--write]   # after medpix
    python benchmarks/bench_pretrained.py folds                              # only write the BUSI fold manifests

Runs go through ``cpujob`` (one torch thread per process, bf16 autocast) and live in
``$MEDALIGN_BENCH_RUNS`` (default /tmp/medalign-bench); a finished run with the same overrides is
reused, an interrupted one resumes (``benchlib.train``). ``--write`` saves
``benchmarks/results/bench_pretrained.json``; ``blocks()`` renders the BENCHMARKS.md tables from it.

Protocols (also in the rendered tables):

* medpix: MedPix 2.0 with its case-disjoint train/dev/test split (dev = val, 197 images; test 200).
  Pretrained: configs/align/medpix.yaml (align_effnet_minilm: locked ImageNet EfficientNet-Lite0,
  MiniLM text tuned at a tenth of the learning rate). From scratch: configs/align/medpix_scratch.yaml
  (align_small_minilm: random ViT, locked MiniLM; the recipe of the earlier row). Recipe choices
  (epochs, learning rates, what is tuned) were made on val with the pilots in the script's
  ``PILOT`` note; every row is then trained once per seed and read once on test:
  image<->caption R@K (a caption shared by several images counts every one of them as a hit) and
  zero-shot modality / plane / body region with the shipped prompt ensembles.
* busi: BUSI's 3 release folds (folds/busi_{train,val}k.txt, benign + malignant): fold k's
  held-out file is its test set; the 133 normal images, which the release folds leave out, are
  split into 3 seeded class folds (seed 0), fold k's third joining its test set; everything
  else is split 85/15 (seeded by k, stratified by class) into train and val. 3-class balanced
  accuracy (and AUC, accuracy) on each test set; mean ± std over folds x seeds. Fine-tuned:
  configs/clinical/busi.yaml (clinical_effnet) vs configs/clinical/busi_scratch.yaml (the small
  ViT from scratch). Linear probes (logistic regression, C chosen on val balanced accuracy,
  ``medalign.evaluation.probe``): the ImageNet EfficientNet-Lite0's pooled features (no BUSI training), the
  MedPix-aligned LiT image embedding, and the MedPix-aligned from-scratch ViT's embedding (the
  earlier row's model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import benchlib
from benchlib import DATA, RUNS

RESULTS_NAME = "bench_pretrained"
FAST = ["train.progress=false", "data.num_workers=0", "train.precision=bf16-mixed"]
EXTRA: list[str] = []  # --extra: overrides for a smoke run of the whole script (never written)


# --------------------------------------------------------------------------------------- BUSI folds


def busi_fold_manifest(k: int) -> Path:
    """The manifest of BUSI fold ``k`` (1-3) for 3-class classification (see the module doc)."""
    from medalign.data.importers import load_dataset
    from medalign.data.manifest import Manifest, assign_splits, write_manifest

    path = RUNS / "data" / f"busi_3class_fold{k}.csv"
    if path.is_file():
        return path
    base = load_dataset("busi", DATA / "busi", fold=k)
    table = base.table.copy()
    normal = table["label"] == "normal"
    thirds = assign_splits(table[normal], {"f1": 1 / 3, "f2": 1 / 3, "f3": 1 / 3}, seed=0)
    held_out = (~normal & (table["split"] == "val")) | (normal & (thirds.reindex(table.index) == f"f{k}"))
    rest = table[~held_out]
    inner = assign_splits(rest, {"train": 0.85, "val": 0.15}, seed=k, stratify="label")
    split = table["split"].where(~held_out, "test").copy()
    split[rest.index] = inner
    fold = table.assign(split=split.tolist())
    base.meta.extra = {
        **base.meta.extra,
        "split_source": f"release fold {k} (held-out = test) + normal thirds (seed 0); train/val 85/15 seed {k}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(Manifest(fold, base.base_dir, base.meta), path, root=DATA / "busi")
    return path


# --------------------------------------------------------------------------------------- MedPix

MEDPIX_ZEROSHOT = {"modality": "medpix_modality", "plane": "medpix_plane", "region": "medpix_region"}
MEDPIX_ROWS = {"pretrained": "medpix", "scratch": "medpix_scratch"}  # row -> configs/align/<recipe>.yaml
RETRIEVAL_KEYS = ("R@1", "R@5", "R@10", "median_rank")
# How the LiT recipe was chosen, on the dev split only (val; cached frozen features of the
# 1,653 train images, projections trained in seconds, then MiniLM tuned live): epochs 8/10/15/20/40,
# learning rate 5e-4/1e-3/2e-3, embedding 128/256/512, linear vs MLP projections, text-similarity
# soft targets, MiniLM locked / last 2 layers / all layers at 0.1x and 0.3x the rate, and
# EfficientNet-Lite0 vs -Lite2 features.
MEDPIX_SELECTION = (
    "recipe chosen on the dev split (epochs, learning rates, projection, what is tuned, Lite0 vs Lite2) "
    "from pilots on cached frozen features; test read once per seed"
)


def medpix_manifest() -> Path:
    return benchlib.imported("medpix", "medpix", "medpix-2")


def evaluate_alignment_bundle(bundle: Path, manifest: Path, split: str) -> dict[str, Any]:
    """Retrieval and the three zero-shot tasks of one split, from a bundle."""
    from medalign.bundle import load_bundle
    from medalign.data.dataset import dataset_for_model
    from medalign.data.manifest import read_manifest
    from medalign.evaluation import alignment as ev

    model = load_bundle(bundle)
    table = read_manifest(manifest)
    out: dict[str, Any] = {}
    for name, templates in MEDPIX_ZEROSHOT.items():
        embeddings = ev.embed_split(model, dataset_for_model(table, model, split, f"label:{name}", ["image"]))
        scores = ev.zero_shot(model, embeddings, templates)
        out[f"zeroshot_{name}"] = {k: scores[k] for k in ("accuracy", "balanced_accuracy", "auc", "n")}
        if name == "modality":
            retrieval = ev.retrieval(embeddings)
            out["retrieval"] = {
                direction: {k: retrieval[direction][k] for k in (*RETRIEVAL_KEYS, "n_queries")}
                for direction in ("image_to_text", "text_to_image")
            }
    return out


def bench_medpix(seeds: list[int], which: list[str]) -> dict[str, Any]:
    manifest = medpix_manifest()
    rows: dict[str, Any] = {}
    for row in which:
        recipe = MEDPIX_ROWS[row]
        runs = {}
        for seed in seeds:
            run = f"pretrained_medpix_{row}_s{seed}"
            metrics = benchlib.train(
                recipe,
                run,
                [f"data.manifest={manifest}", f"train.seed={seed}", "data.cache=memory", *FAST, *EXTRA],
                folder="align",
                echo=print,
            )
            bundle = RUNS / run / "bundle"
            runs[str(seed)] = {
                "test": evaluate_alignment_bundle(bundle, manifest, "test"),
                "val": evaluate_alignment_bundle(bundle, manifest, "val"),
                "train_steps": metrics["train"]["steps"],
                "train_seconds": metrics["train"]["seconds"],
            }
        rows[row] = {"recipe": f"configs/align/{recipe}.yaml", "seeds": runs}
    return {
        "rows": rows,
        "protocol": {
            "split": "MedPix 2.0 release split: train 1653 / dev (val) 197 / test 200 images, case-disjoint",
            "selection": MEDPIX_SELECTION,
            "seeds": seeds,
            "chance_R@10": 10 / 200,
        },
        "machine": machine(),
    }


# --------------------------------------------------------------------------------------- BUSI

BUSI_ROWS = {"pretrained": "busi", "scratch": "busi_scratch"}  # row -> configs/clinical/<recipe>.yaml
BUSI_KEYS = ("balanced_accuracy", "auc", "accuracy")
BUSI_SELECTION = (
    "schedule (epochs, image size, learning rates, full vs partial tuning) chosen on fold 1's val split; "
    "probe C on each fold's val split; test read once per fold and seed"
)


def probe_scores(model: Any, manifest: Path, features: str) -> dict[str, Any]:
    """Linear probe (C on val balanced accuracy) of one fold, test metrics."""
    from medalign.data.dataset import dataset_for_model
    from medalign.data.manifest import read_manifest
    from medalign.evaluation import alignment as ev

    table = read_manifest(manifest)
    splits = [
        ev.embed_split(model, dataset_for_model(table, model, split, "label", ["image"]), features=features)
        for split in ("train", "val", "test")
    ]
    result = ev.probe(*splits)
    return {**{k: result["test"][k] for k in BUSI_KEYS}, "C": result["C"], "n_test": result["n_test"]}


def busi_probes(folds: dict[int, Path], medpix_seed: int) -> dict[str, Any]:
    """Probe rows: ImageNet tower features, and the MedPix-aligned models' image embeddings (a
    MedPix model not trained yet is reported and left for a later ``--rows probes`` run)."""
    from medalign.bundle import load_bundle
    from medalign.models import create_model

    models = {"imagenet_tower": (create_model("align_effnet_minilm", in_channels=1, image_size=224), "tower")}
    for name, row in (("medpix_lit", "pretrained"), ("medpix_scratch", "scratch")):
        bundle = RUNS / f"pretrained_medpix_{row}_s{medpix_seed}" / "bundle"
        if bundle.is_dir():
            models[name] = (load_bundle(bundle), "embedding")
        else:
            print(f"probe {name}: no MedPix bundle at {bundle} yet (run: bench_pretrained.py medpix --rows {row})")
    return {
        name: {str(k): probe_scores(model, path, features) for k, path in folds.items()}
        for name, (model, features) in models.items()
    }


def bench_busi(seeds: list[int], which: list[str], medpix_seed: int, fold_ids: list[int]) -> dict[str, Any]:
    folds = {k: busi_fold_manifest(k) for k in fold_ids}
    rows: dict[str, Any] = {}
    for row in (r for r in which if r in BUSI_ROWS):
        recipe = BUSI_ROWS[row]
        runs: dict[str, Any] = {}
        for k, manifest in folds.items():
            for seed in seeds:
                run = f"pretrained_busi_{row}_fold{k}_s{seed}"
                metrics = benchlib.train(
                    recipe,
                    run,
                    [f"data.manifest={manifest}", f"train.seed={seed}", "data.cache=memory", *FAST, *EXTRA],
                    folder="clinical",
                    echo=print,
                )
                diagnosis = metrics["diagnosis"]
                runs[f"fold{k}_s{seed}"] = {
                    **{key: diagnosis[key] for key in BUSI_KEYS},
                    "n_test": diagnosis["n"],
                    "train_steps": metrics["train"]["steps"],
                    "train_seconds": metrics["train"]["seconds"],
                }
        rows[row] = {"recipe": f"configs/clinical/{recipe}.yaml", "runs": runs}
    return {
        "rows": rows,
        "probes": busi_probes(folds, medpix_seed) if "probes" in which else {},
        "protocol": {
            "folds": "BUSI release folds 1-3 (held-out file = test) + normal images in 3 seeded thirds; "
            "train/val 85/15 inside the rest",
            "selection": BUSI_SELECTION,
            "seeds": seeds,
            "probe_medpix_seed": medpix_seed,
            "n_test": {str(k): int((read_split(busi_fold_manifest(k)) == "test").sum()) for k in (1, 2, 3)},
        },
        "machine": machine(),
    }


def read_split(path: Path) -> Any:
    from medalign.data.manifest import read_manifest

    return read_manifest(path).table["split"]


def machine() -> str:
    return benchlib.machine(" shared with other jobs, 1 torch thread per run (cpujob)", ", bf16 autocast")


# ------------------------------------------------------------------------------------ rendering


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


NOT_RUN = "not run"  # a row of the protocol that has no saved runs yet (see the report's caption)


def test_values(runs: dict[str, Any], path: tuple[str, ...]) -> list[float]:
    """``path`` read from each seed's test metrics."""
    values = []
    for run in runs.values():
        value = run["test"]
        for key in path:
            value = value[key]
        values.append(value)
    return values


def medpix_cell(rows: dict[str, Any], row: str, path: tuple[str, ...]) -> str:
    return mean_std(test_values(rows[row]["seeds"], path)) if row in rows else NOT_RUN


def run_seconds(rows: dict[str, Any], row: str, runs_key: str) -> str:
    if row not in rows:
        return NOT_RUN
    return f"{statistics.median(r['train_seconds'] for r in rows[row][runs_key].values()):.0f} s"


def medpix_block(results: dict[str, Any]) -> str:
    rows, protocol = results["rows"], results["protocol"]
    seeds = {row: ", ".join(rows[row]["seeds"]) for row in rows}
    lines = [
        f"MedPix 2.0, {protocol['split']}; {protocol['selection']}. Pretrained: "
        f"configs/align/{MEDPIX_ROWS['pretrained']}.yaml (locked ImageNet EfficientNet-Lite0 + MiniLM "
        f"tuned at 0.1x, 224 px, 10 epochs); from scratch: configs/align/{MEDPIX_ROWS['scratch']}.yaml "
        f"(random small ViT + locked MiniLM, 128 px, 25 epochs). Seeds run: "
        + "; ".join(f"{row} {seeds[row]}" for row in MEDPIX_ROWS if row in rows)
        + " (a single value is one seed, mean ± std over seeds otherwise); retrieval chance R@10 "
        f"{protocol['chance_R@10']:.2f}, target R@10 ≥ 0.25. Training time per run (median): pretrained "
        f"{run_seconds(rows, 'pretrained', 'seeds')}, from scratch {run_seconds(rows, 'scratch', 'seeds')}. "
        f"Machine: {results['machine']}.",
        "",
        "| test metric | from scratch | pretrained (LiT) |",
        "|---|---|---|",
    ]
    for direction, name in (("image_to_text", "image→caption"), ("text_to_image", "caption→image")):
        for key in RETRIEVAL_KEYS:
            path = ("retrieval", direction, key)
            lines.append(f"| {name} {key} | {medpix_cell(rows, 'scratch', path)} | {medpix_cell(rows, 'pretrained', path)} |")
    for task in MEDPIX_ZEROSHOT:
        for key in ("accuracy", "balanced_accuracy", "auc"):
            path = (f"zeroshot_{task}", key)
            lines.append(
                f"| zero-shot {task} {key} | {medpix_cell(rows, 'scratch', path)} | "
                f"{medpix_cell(rows, 'pretrained', path)} |"
            )
    return "\n".join(lines)


BUSI_MODELS = {  # table row -> (results key, where the runs live, description)
    "scratch": ("rows", "fine-tuned from scratch (configs/clinical/busi_scratch.yaml, small ViT, 128 px)"),
    "pretrained": (
        "rows",
        "fine-tuned pretrained (configs/clinical/busi.yaml, EfficientNet-Lite0 last 6 blocks, 224 px)",
    ),
    "medpix_scratch": ("probes", "linear probe, MedPix-aligned from-scratch ViT embedding"),
    "medpix_lit": ("probes", "linear probe, MedPix-aligned LiT embedding"),
    "imagenet_tower": ("probes", "linear probe, ImageNet EfficientNet-Lite0 pooled features"),
}


def busi_runs(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The per-run metrics of one table row, or None when it was not run."""
    kind = BUSI_MODELS[name][0]
    found = results.get(kind, {}).get(name)
    if found is None:
        return None
    return found["runs"] if kind == "rows" else found


def busi_block(results: dict[str, Any]) -> str:
    protocol = results["protocol"]
    lines = [
        f"BUSI 3-class (benign / malignant / normal), {protocol['folds']} (test images per fold: "
        f"{', '.join(str(n) for n in protocol['n_test'].values())}); {protocol['selection']}. "
        f"Each row: mean ± std over the runs it names (fold k, seed s; a single value is one run); "
        f"probes are deterministic per fold (the MedPix models of seed {protocol['probe_medpix_seed']}). Target: "
        f"balanced accuracy ≥ 0.80 fine-tuned. Machine: {results['machine']}.",
        "",
        "| model | runs | balanced accuracy | AUC (macro OvR) | accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, (_, description) in BUSI_MODELS.items():
        runs = busi_runs(results, name)
        if runs is None:
            cells = [NOT_RUN] * (len(BUSI_KEYS) + 1)
        else:
            which = sorted(runs) if BUSI_MODELS[name][0] == "rows" else [f"fold{k}" for k in sorted(runs)]
            cells = [", ".join(which), *(mean_std([run[key] for run in runs.values()]) for key in BUSI_KEYS)]
        lines.append(f"| {description} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_block(medpix: dict[str, Any], busi: dict[str, Any]) -> str:
    """README: the headline of each pair, pointing at the full tables."""

    def balanced(name: str) -> str:
        runs = busi_runs(busi, name) if busi else None
        return NOT_RUN if runs is None else mean_std([run["balanced_accuracy"] for run in runs.values()])

    rows = medpix.get("rows", {})
    r10 = ("retrieval", "image_to_text", "R@10")
    return "\n".join(
        [
            "| test metric (BENCHMARKS.md, *Pretrained towers*) | from scratch | pretrained | target |",
            "|---|---|---|---|",
            f"| MedPix 2.0 image→caption R@10 | {medpix_cell(rows, 'scratch', r10)} | "
            f"{medpix_cell(rows, 'pretrained', r10)} | ≥ 0.25 |",
            f"| BUSI 3-class balanced accuracy, fine-tuned | {balanced('scratch')} | {balanced('pretrained')} | ≥ 0.80 |",
            f"| BUSI 3-class balanced accuracy, linear probe | {balanced('medpix_scratch')} | "
            f"{balanced('imagenet_tower')} | – |",
        ]
    )


def blocks() -> dict[str, str]:
    """BENCHMARKS.md tables and the README summary from benchmarks/results/bench_pretrained.json
    alone; rows without saved runs read "not run"."""
    if not benchlib.results_path(RESULTS_NAME).is_file():
        return {}
    results = benchlib.load_results(RESULTS_NAME)
    medpix, busi = results.get("medpix", {}), results.get("busi", {})
    out = {}
    if medpix.get("rows"):
        out["bench_pretrained_medpix"] = medpix_block(medpix)
    if busi.get("rows") or busi.get("probes"):
        out["bench_pretrained_busi"] = busi_block(busi)
    if out:
        out["bench_pretrained_summary"] = summary_block(medpix, busi)
    return out


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``old`` run by run: one invocation may train only some rows, folds or seeds."""
    merged = {**old, **{k: v for k, v in new.items() if k not in ("rows", "probes")}}
    rows = {**old.get("rows", {})}
    for name, row in new.get("rows", {}).items():
        runs_key = "seeds" if "seeds" in row else "runs"
        rows[name] = {**row, runs_key: {**rows.get(name, {}).get(runs_key, {}), **row[runs_key]}}
    probes = {**old.get("probes", {})}
    for name, folds in new.get("probes", {}).items():
        probes[name] = {**probes.get(name, {}), **folds}
    merged["rows"], merged["probes"] = rows, probes
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=["medpix", "busi", "folds"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["pretrained", "scratch", "probes"],
        help="which rows to train now (probes: busi only); the others keep their saved results",
    )
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3], help="busi folds to run now")
    parser.add_argument("--medpix-seed", type=int, default=0, help="the MedPix bundles the BUSI probes use")
    parser.add_argument("--write", action="store_true")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="recipe overrides for a smoke run (e.g. train.max_steps=2); no --write"
    )
    args = parser.parse_args()
    if args.extra and args.write:
        parser.error("--extra runs are smoke tests: they are never written")
    EXTRA[:] = args.extra
    torch.set_num_threads(1)
    if args.bench == "folds":
        for k in (1, 2, 3):
            print(busi_fold_manifest(k))
        return
    start = time.perf_counter()
    if args.bench == "medpix":
        result = bench_medpix(args.seeds, [r for r in args.rows if r in MEDPIX_ROWS])
    else:
        result = bench_busi(args.seeds, args.rows, args.medpix_seed, args.folds)
    result["seconds_last_invocation"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2, default=float)[:4000])
    if args.write:
        path = benchlib.results_path(RESULTS_NAME)
        results = benchlib.load_results(RESULTS_NAME) if path.is_file() else {}
        results[args.bench] = merge(results.get(args.bench, {}), result)
        benchlib.save_results(RESULTS_NAME, results)
        benchlib.write_blocks(blocks())


if __name__ == "__main__":
    main()
