"""Clinical heads (Stage III): diagnosis on LGG and the prognosis head's C-index on the phantom.

    OMP_NUM_THREADS=1 python benchmarks/bench_clinical.py [lgg|phantom|all] [--write]

``--write`` saves ``benchmarks/results/bench_clinical.json`` and rewrites the ``bench_clinical`` block
of BENCHMARKS.md from it (``blocks()``); without it the block is only printed.
Runs live in ``$MEDALIGN_BENCH_RUNS/clinical_*`` (default /tmp/medalign-bench); a finished run
(``metrics.json`` written with the same overrides) is reused. CPU-sized schedules, bf16 autocast,
one torch thread, seed 0.

Protocols:

* lgg: LGG brain MRI (Buda et al.) lesion slices, imported by ``medalign data import lgg`` (one row
  per slice, split by patient: the importer's seeded 0.7/0.1/0.2 over 110 patients), the three
  sequences (pre, FLAIR, post) as modalities through one shared small ViT (configs/clinical/
  lgg_{death,grade}.yaml at 64 px, ``--lgg-epochs`` epochs). Targets ``label:death`` (death01) and
  ``label:grade`` (G2 vs G3). AUC on the test split per slice and PER PATIENT (mean slice
  probability of each patient). Baseline in the same table: logistic regression (standardised,
  C=1) on per-sequence intensity statistics of each slice at the same resolution (mean, std,
  10/50/90th percentiles of each sequence), trained on the train slices, aggregated per patient
  the same way; and the majority class (AUC 0.5 by construction, its accuracy shown).
* phantom: ``--phantom-n`` (960) cases at 64 px (patient-level split 0.7/0.15/0.15), configs/clinical/phantom.yaml
  (tiny ViT shared by modalities a and b, attention fusion, diagnosis + survival heads,
  ``--phantom-epochs`` epochs), once with the Cox head and once with the discrete-time head (bins
  0/6/12/18/24/36/48/60 months). C-index on the test split; the ceiling is the C-index of the
  generative model's own log hazard 0.9 n_solid + 0.35 n_large + 0.2 k (from lesions.jsonl)
  on the same cases, and the floor 0.5.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import benchlib
from benchlib import DATA, RUNS, imported
from medalign.data.dataset import DatasetConfig, ManifestDataset
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.data.transforms import PreprocessConfig
from medalign.metrics import concordance_index

LGG_KEYS = ["image:pre", "image:flair", "image:post"]
FAST = ["train.progress=false", "data.num_workers=0", "data.cache=memory", "train.precision=bf16-mixed"]


def machine() -> str:
    return benchlib.machine(
        f" shared with other jobs, {torch.get_num_threads()} torch thread(s), bf16 autocast"
    )


def train(recipe: str, run: str, overrides: list[str]) -> dict[str, Any]:
    """A clinical recipe through ``benchlib.train``, quietly (metrics.json holds what the tables need)."""
    return benchlib.train(recipe, run, overrides, folder="clinical", echo=lambda *_: None)


# ------------------------------------------------------------------------------------------- LGG


def intensity_features(manifest_path: Path, size: int) -> tuple[np.ndarray, Any]:
    """Per-slice mean, std and 10/50/90th percentiles of each sequence at ``size`` px."""
    manifest = read_manifest(manifest_path)
    dataset = ManifestDataset(
        manifest,
        DatasetConfig(
            modalities=tuple(LGG_KEYS), label=None, channels=1, preprocess=PreprocessConfig(size=(size, size))
        ),
    )
    rows = []
    for i in range(len(dataset)):
        sample = dataset[i]
        stats = []
        for key in LGG_KEYS:
            x = sample[key].numpy().ravel()
            stats += [x.mean(), x.std(), *np.percentile(x, [10, 50, 90])]
        rows.append(stats)
    return np.asarray(rows), manifest.table


def patient_scores(
    scores: np.ndarray, labels: np.ndarray, patients: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean score and the label of each patient (slices of one patient share the label)."""
    grouped: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(patients):
        grouped[p].append(i)
    mean = np.array([scores[idx].mean() for idx in grouped.values()])
    label = np.array([labels[idx[0]] for idx in grouped.values()])
    return mean, label


def auc_with_ci(scores: np.ndarray, labels: np.ndarray, n_boot: int = 2000) -> dict[str, Any]:
    """AUC and a 95% percentile bootstrap interval over the units given (here: patients, seed 0)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) == 2:
            draws.append(roc_auc_score(labels[idx], scores[idx]))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"auc": float(roc_auc_score(labels, scores)), "ci95": [float(low), float(high)], "n": len(labels)}


def baseline(features: np.ndarray, table: Any, label: str) -> dict[str, Any]:
    """Logistic regression on intensity statistics; majority class for accuracy context."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = sorted(v for v in table[label].unique() if v)
    y = np.array([classes.index(v) if v else -1 for v in table[label]])
    train = (table["split"] == "train").to_numpy() & (y >= 0)
    test = (table["split"] == "test").to_numpy() & (y >= 0)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    model.fit(features[train], y[train])
    scores = model.predict_proba(features[test])[:, 1]
    patient = auc_with_ci(*patient_scores(scores, y[test], table["patient_id"].to_numpy()[test]))
    majority = np.bincount(y[train]).argmax()
    return {
        "auc_slice": float(roc_auc_score(y[test], scores)),
        "auc_patient": patient["auc"],
        "auc_patient_ci95": patient["ci95"],
        "n_test_slices": int(test.sum()),
        "n_test_patients": patient["n"],
        "majority_class": classes[majority],
        "majority_accuracy_slice": float((y[test] == majority).mean()),
    }


def bench_lgg(epochs: int, size: int) -> dict[str, Any]:
    manifest = imported("lgg", "lgg", "lgg_mri")
    start = time.perf_counter()
    features, table = intensity_features(manifest, size)
    feature_seconds = time.perf_counter() - start
    results: dict[str, Any] = {}
    for target in ("death", "grade"):
        overrides = [
            f"data.manifest={manifest}",
            f"model.overrides.image_size={size}",
            f"train.epochs={epochs}",
            "train.seed=0",
            *FAST,
        ]
        metrics = train(f"lgg_{target}", f"clinical_lgg_{target}", overrides)
        patient = metrics["patient_level"]["diagnosis"]
        patient_of = dict(zip(table["case_id"], table["patient_id"], strict=True))
        rows = [r for r in metrics["per_case"] if r["label"] >= 0]
        positive = patient["class_names"][1]
        bootstrap = auc_with_ci(
            *patient_scores(
                np.array([r["probs"][positive] for r in rows]),
                np.array([r["label"] for r in rows]),
                np.array([patient_of[r["case_id"]] for r in rows]),
            )
        )
        results[target] = {
            "vit": {
                "auc_slice": metrics["diagnosis"]["auc"],
                "auc_patient": patient["auc"],
                "auc_patient_ci95": bootstrap["ci95"],
                "accuracy_patient": patient["accuracy"],
                "balanced_accuracy_patient": patient["balanced_accuracy"],
                "ece_slice": metrics["diagnosis"]["ece"],
                "n_test_slices": metrics["diagnosis"]["n"],
                "n_test_patients": patient["n"],
                "subsets_patient_auc": {k: v["patient"]["auc"] for k, v in metrics["subsets"].items()},
                "train_steps": metrics["train"]["steps"],
                "train_seconds": metrics["train"]["seconds"],
            },
            "baseline": baseline(features, table, f"label:{target}"),
        }
    results["protocol"] = {
        "epochs": epochs,
        "size": size,
        "model": "clinical_small_minilm without text (ViT 4x192, patch 16), shared over pre/FLAIR/post",
        "baseline_feature_seconds": round(feature_seconds, 1),
    }
    return results


# --------------------------------------------------------------------------------------- phantom


def phantom_manifest(n: int, size: int) -> Path:
    folder = RUNS / "data" / f"phantom_{n}_{size}"
    path = folder / "manifest.csv"
    if not path.is_file():
        generate_phantom(folder, PhantomConfig(n=n, size=size, seed=0))
    return path


def true_log_hazard(manifest_path: Path) -> dict[str, float]:
    """0.9 n_solid + 0.35 n_large + 0.2 k per case, from the generator's lesions.jsonl."""
    risk = dict.fromkeys(read_manifest(manifest_path).table["case_id"], 0.0)
    for line in (manifest_path.parent / "lesions.jsonl").read_text().splitlines():
        lesion = json.loads(line)
        risk[lesion["case_id"]] += (
            0.2 + 0.9 * (lesion["type"] == "solid") + 0.35 * (lesion["size"] == "large")
        )
    return risk


def bench_phantom(epochs: int, size: int, n: int = 480) -> dict[str, Any]:
    manifest = phantom_manifest(n, size)
    table = read_manifest(manifest).table
    test = table[table["split"] == "test"]
    oracle = true_log_hazard(manifest)
    ceiling = concordance_index(
        test["time"].astype(float), test["event"].astype(float), [oracle[c] for c in test["case_id"]]
    )
    base = [f"data.manifest={manifest}", "data.phantom=null", f"model.overrides.image_size={size}"]
    heads = {
        "cox": [],
        "discrete": [
            "model.overrides.survival=discrete",
            "model.overrides.time_bins=[0, 6, 12, 18, 24, 36, 48, 60]",
        ],
    }
    results: dict[str, Any] = {
        "true_hazard_c_index": ceiling["c_index"],
        "n_test": len(test),
        "n_test_events": int(test["event"].astype(int).sum()),
    }
    for name, extra in heads.items():
        overrides = [*base, f"train.epochs={epochs}", "train.seed=0", *FAST, *extra]
        metrics = train("phantom", f"clinical_phantom_{name}", overrides)
        survival = metrics["survival"]
        results[name] = {
            "c_index": survival["c_index"],
            "td_auc": dict(zip(["q25", "q50", "q75"], survival["td_auc"]["auc"], strict=True)),
            "td_auc_times": survival["td_auc"]["times"],
            "cut_points_from": survival["cut_points_from"],
            "logrank_p": (survival["risk_groups"]["logrank"] or {}).get("p_value"),
            "subsets_c_index": {k: v["row"]["c_index"] for k, v in metrics["subsets"].items()},
            "diagnosis_auc": metrics["diagnosis"]["auc"],
            "diagnosis_accuracy": metrics["diagnosis"]["accuracy"],
            "ece": metrics["diagnosis"]["ece"],
            "train_steps": metrics["train"]["steps"],
            "train_seconds": metrics["train"]["seconds"],
        }
    results["protocol"] = {"n": n, "size": size, "epochs": epochs, "model": "clinical_tiny, attention fusion"}
    return results


SELECTION = (
    "Selection: none: fixed CPU schedules, the model after the last epoch, no choice made on val or "
    "test; td-AUC horizons (quartiles of the event times), the IPCW censoring distribution and the "
    "risk-group threshold (median predicted risk) come from the train split."
)


def ci(bounds: list[float]) -> str:
    return f"({bounds[0]:.2f}–{bounds[1]:.2f})"


def chance_note(target: str, auc: float, bounds: list[float], n: int) -> str:
    """What the patient-level interval allows one to say, derived from it."""
    if bounds[0] > 0.5:
        return f"{target}: {auc:.2f}, above chance (the interval {ci(bounds)} excludes 0.5)"
    if bounds[1] < 0.5:
        return f"{target}: {auc:.2f}, below chance (the interval {ci(bounds)} excludes 0.5)"
    return f"{target}: {auc:.2f}, not distinguishable from chance with {n} test patients (the interval {ci(bounds)} includes 0.5)"


def render_phantom(results: dict[str, Any]) -> list[str]:
    p = results["protocol"]
    cox = results["cox"]
    lines = [
        f"**Phantom** (`configs/clinical/phantom.yaml`): {p['n']} cases at {p['size']} px, patient-level split "
        f"0.7/0.15/0.15, test {results['n_test']} cases with {results['n_test_events']} events; `clinical_tiny` "
        "(one CLIP-ViT shared by *a* and *b*, attention fusion), diagnosis + survival heads trained jointly, "
        f"{p['epochs']} epochs ({cox['train_steps']:,} steps, batch 32), seed 0. The ceiling is the C-index of the "
        "generative model's true hazard h0·exp(0.9 n_solid + 0.35 n_large + 0.2 k) on the same test cases. "
        "td-AUC: cumulative/dynamic with IPCW (Uno) at the quartiles of the train split's event times; "
        "log-rank: high vs low risk, split at the median predicted risk of the train split.",
        "",
        "| head | C-index a+b | a only | b only | td-AUC q25 / q50 / q75 | log-rank p | diagnosis AUC | ECE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"cox": "Cox partial likelihood", "discrete": "discrete-time (logistic hazard, 7 intervals)"}
    for key, label in names.items():
        r = results[key]
        td = " / ".join("–" if v is None else f"{v:.2f}" for v in r["td_auc"].values())
        p_value = "–" if r["logrank_p"] is None else f"{r['logrank_p']:.2g}"
        sub = r["subsets_c_index"]
        lines.append(
            f"| {label} | {r['c_index']:.3f} | {sub['a']:.3f} | {sub['b']:.3f} | {td} | {p_value} | "
            f"{r['diagnosis_auc']:.3f} | {r['ece']:.3f} |"
        )
    lines.append(f"| true hazard (ceiling) | {results['true_hazard_c_index']:.3f} | | | | | | |")
    lines += [
        "",
        "By the phantom's design the hazard-driving solid lesions show only in *a*, so *b* alone carries "
        "little prognosis.",
    ]
    return lines


def render_lgg(results: dict[str, Any]) -> list[str]:
    p = results["protocol"]
    death = results["death"]["vit"]
    lines = [
        "**LGG** (TCGA lower-grade glioma, `configs/clinical/lgg_death.yaml` and `lgg_grade.yaml` at a CPU "
        f"schedule): the importer's split by patient, test {death['n_test_slices']} slices of "
        f"{death['n_test_patients']} patients; pre-contrast, FLAIR and post-contrast as three modalities through "
        f"one shared ViT ({p['model']}), {p['size']} px, {p['epochs']} epochs ({death['train_steps']} steps); "
        "patient-level AUC = AUC of the mean slice probability per patient, 95% bootstrap interval over "
        "patients (2,000 draws, seed 0). Baseline in the same run: logistic regression on each sequence's "
        "mean, std and 10/50/90th intensity percentiles, fitted on the train slices.",
        "",
        "| target | model | AUC per slice | AUC per patient (95% CI) |",
        "|---|---|---|---|",
    ]
    labels = {"death": "`death01`", "grade": "grade"}
    for target, label in labels.items():
        vit, base = results[target]["vit"], results[target]["baseline"]
        lines.append(
            f"| {label} | medalign ViT | {vit['auc_slice']:.3f} | **{vit['auc_patient']:.3f}** {ci(vit['auc_patient_ci95'])} |"
        )
        lines.append(
            f"| {label} | intensity logistic regression | {base['auc_slice']:.3f} | "
            f"{base['auc_patient']:.3f} {ci(base['auc_patient_ci95'])} |"
        )
    notes = [
        chance_note(labels[t], results[t]["vit"]["auc_patient"], results[t]["vit"]["auc_patient_ci95"],
                    results[t]["vit"]["n_test_patients"])
        for t in labels
    ]
    lines += ["", "Patient-level AUC of the ViT: " + "; ".join(notes) + "."]
    return lines


def render(results: dict[str, Any]) -> str:
    parts: list[str] = []
    if "phantom" in results:
        parts += [*render_phantom(results["phantom"]), ""]
    if "lgg" in results:
        parts += [*render_lgg(results["lgg"]), ""]
    parts += [f"{SELECTION} Machine: {results['machine']}; total {results['total_seconds_last_invocation']:.0f} s."]
    return "\n".join(parts)


def blocks() -> dict[str, str]:
    return benchlib.rendered({"bench_clinical": render})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", choices=["lgg", "phantom", "all"], nargs="?", default="all")
    parser.add_argument("--lgg-epochs", type=int, default=8)
    parser.add_argument("--lgg-size", type=int, default=64)
    parser.add_argument("--phantom-epochs", type=int, default=60)
    parser.add_argument("--phantom-n", type=int, default=960)
    parser.add_argument("--phantom-size", type=int, default=64)
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = benchlib.results_path("bench_clinical")
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    start = time.perf_counter()
    if args.which in ("phantom", "all"):
        results["phantom"] = bench_phantom(args.phantom_epochs, args.phantom_size, args.phantom_n)
    if args.which in ("lgg", "all"):
        if not (DATA / "lgg_mri").is_dir():
            raise SystemExit(f"LGG not found at {DATA / 'lgg_mri'} (set MEDALIGN_SHARED_DATA)")
        results["lgg"] = bench_lgg(args.lgg_epochs, args.lgg_size)
    results["machine"] = machine()
    results["total_seconds_last_invocation"] = round(time.perf_counter() - start, 1)
    if args.write:
        print(benchlib.publish("bench_clinical", results, render, "## Clinical heads (`benchmarks/bench_clinical.py`)"))
    else:
        print(render(results))


if __name__ == "__main__":
    main()
