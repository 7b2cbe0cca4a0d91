"""Fusion of imaging modalities: align-disentangle-fuse against early and late fusion, by subset.

    python benchmarks/bench_fuse.py phantom  [--write]   # a, b, a+b: lesions visible in one modality only
    python benchmarks/bench_fuse.py wli_nbi  [--write]   # MM-EndoCL demo (17 pairs), 5-fold smoke benchmark
    python benchmarks/bench_fuse.py lgg      [--write]   # LGG pre/FLAIR/post, all 7 subsets, per slice + per patient
    python benchmarks/bench_fuse.py lgg_pretrained [--write]   # LGG: ImageNet encoder vs from scratch, per patient

``--epochs N`` / ``--size PX`` change a schedule (the defaults are what BENCHMARKS.md reports).
Each run lives in ``$MEDALIGN_BENCH_RUNS/<name>`` (default /tmp/medalign-bench); a finished run
(``metrics.json`` written by the same overrides) is reused, an interrupted one resumes.

Every model is trained once with modality dropout (the recipe's rate) and evaluated by
``medalign.run.evaluate_fusion`` on every non-empty subset of modalities (the others hidden
through ``present``), so one model answers "how good with only these scans". The baselines
(``fuse_early``: modalities stacked as channels; ``fuse_late``: one U-Net per modality, logits
averaged over present modalities) get the same data, schedule, dropout and segmentation loss;
the ADF terms of ``fuse_loss`` are switched off for them (``fuse_late`` exposes multiscale
features, so the MMD term would otherwise apply to it as well).

``--write`` saves ``benchmarks/results/bench_fuse_<bench>.json`` and rewrites its block of BENCHMARKS.md
(``blocks()`` renders each block from its results file alone).

Protocols (written into BENCHMARKS.md with the numbers):

* phantom: configs/fuse/phantom.yaml (480 cases, 128 px, patient-level split), cysts show in both
  modalities, solid lesions only in a, inflammatory only in b; per-image Dice on test per subset.
* wli_nbi: the 17-pair MM-EndoCL demo, 5 folds by case (seeded), train on 4 folds, test on the
  fifth; ADF on WLI+NBI (evaluated on wli, nbi, wli+nbi) vs a U-Net trained on WLI only.
* lgg: LGG (Buda et al.) lesion slices, three sequences as modalities, the importer's split by
  patient; per-slice Dice (metrics.json) and per-patient Dice (slices of a test patient pooled:
  2 sum|P∩G| / (sum|P| + sum|G|), re-predicted from the saved bundle) for all 7 subsets.
* lgg_pretrained: the same data and metrics; early fusion into an ImageNet-pretrained
  EfficientNet-Lite0 (configs/fuse/lgg_pretrained.yaml) next to the same model with the conv
  encoder from scratch; the encoder learning rate chosen on the val patients, test read once;
  saves benchmarks/results/bench_fuse_lgg_pretrained.json and renders its block (``blocks()``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import benchlib
from benchlib import REAL_DATA_RUN, RUNS, imported, slug
from medalign.config import load_config
from medalign.data.manifest import Manifest, read_manifest, write_manifest

BUDA_PUBLISHED = 0.82  # U-Net, per patient, all slices of a patient (Buda et al. 2019)
NO_ADF_LOSS = [
    "fuse_loss.mmd_weight=0",
    "fuse_loss.similarity_weight=0",
    "fuse_loss.dissimilarity_weight=0",
    "fuse_loss.orthogonality_weight=0",
    "fuse_loss.contrastive_weight=0",
]
ARCHS = {
    "fuse_adf": "ADF (align-disentangle-fuse)",
    "fuse_early": "early fusion (channels stacked)",
    "fuse_late": "late fusion (mean of per-modality logits)",
}


def machine() -> str:
    threads = torch.get_num_threads()
    return benchlib.machine(
        f" shared with other benchmark queues, {threads} torch thread{'s' if threads > 1 else ''}, bf16 autocast"
    )


def train(recipe: str, run: str, overrides: list[str]) -> dict[str, Any]:
    """Train a fuse recipe through ``benchlib.train`` with one data worker (the other core is busy)."""
    return benchlib.train(recipe, run, ["data.num_workers=1", *overrides], folder="fuse")


def arch_overrides(arch: str) -> list[str]:
    return [] if arch == "fuse_adf" else [f"model.name={arch}", *NO_ADF_LOSS]


def pct(values: list[float]) -> str:
    """``mean ± std`` in percent (std over folds; a single value alone)."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def parameters(run: str) -> int:
    """Trainable parameters of a finished run's model."""
    from medalign.bundle import load_bundle

    model = load_bundle(RUNS / run / "bundle")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def subset_dice(metrics: dict[str, Any], key: str) -> float:
    value = metrics["subsets"][key].get("dice")
    if value is None or not np.isfinite(value):
        raise RuntimeError(f"subset {key!r} has no finite Dice: {metrics['subsets'][key]}")
    return float(value)


# ---------------------------------------------------------------------------------------------


SELECTION = "Selection: none: a fixed schedule, the model after the last epoch, no choice made on val or test."


def bench_phantom(epochs: int) -> dict[str, Any]:
    common = [f"train.epochs={epochs}"]
    rows = {}
    for arch in ARCHS:
        m = train("phantom", f"fuse_phantom_{arch}", [*common, *arch_overrides(arch)])
        rows[arch] = {
            **{k: subset_dice(m, k) for k in ("a", "b", "a+b")},
            "n_test": m["subsets"]["a+b"]["n_images"],
            "parameters": parameters(f"fuse_phantom_{arch}"),
            "train_seconds": m["train"]["seconds"],
        }
    return {"epochs": epochs, "rows": rows, "machine": machine()}


def render_phantom(results: dict[str, Any]) -> str:
    epochs, rows = results["epochs"], results["rows"]
    n = next(iter(rows.values()))["n_test"]
    gains = [r["a+b"] - max(r["a"], r["b"]) for r in rows.values()]
    lines = [
        f"| {ARCHS[arch]} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['a+b']:.1f} "
        f"| {100 * (r['a+b'] - max(r['a'], r['b'])):+.1f} | {r['parameters'] / 1e6:.2f} M | {r['train_seconds']:.0f} s |"
        for arch, r in rows.items()
    ]
    return "\n".join(
        [
            "Phantom (configs/fuse/phantom.yaml: 480 cases, seed 0, patient-level split), "
            "segment every lesion of a case from two co-registered modalities; cysts show in both, solid "
            "lesions only in a, inflammatory ones only in b, so a single modality cannot find them all. "
            f"128 px, {epochs} epochs (batch 16, lr 2e-3), modality dropout 0.3, 1 seed; one model per row, "
            "evaluated with a only, b only and both (the others hidden through `present`); per-image "
            f"Dice % on the {n} test cases. Baselines without the ADF loss terms. {SELECTION} "
            f"Machine: {results['machine']}.",
            "",
            "| model | a alone | b alone | a+b | a+b minus best single | parameters | train time |",
            "|---|---|---|---|---|---|---|",
            *lines,
            "",
            f"a+b minus the better single modality: {100 * min(gains):+.1f} to {100 * max(gains):+.1f} Dice "
            f"points across the three fusers. One seed and {epochs} of the recipe's 20 epochs: this is not a "
            "ranking of the fusers.",
        ]
    )


def fold_manifests(source: Path, folds: int, seed: int = 0) -> list[Path]:
    """``folds`` copies of the manifest with one fold (by case, seeded) as test and the rest as train."""
    manifest = read_manifest(source)
    cases = sorted(manifest.table["case_id"])
    order = np.random.default_rng(seed).permutation(len(cases))
    parts = np.array_split(np.array(cases)[order], folds)
    paths = []
    for k, held_out in enumerate(parts):
        path = source.with_name(f"{source.stem}_fold{k}of{folds}.csv")
        if not path.is_file():
            table = manifest.table.copy()
            table["split"] = ["test" if c in set(held_out) else "train" for c in table["case_id"]]
            write_manifest(Manifest(table, manifest.base_dir, manifest.meta), path)
        paths.append(path)
    return paths


def bench_wli_nbi(epochs: int, size: int, folds: int) -> dict[str, Any]:
    source = imported("wli_nbi", "mmendocl", "wli-nbi-demo")
    common = [
        f"train.epochs={epochs}",
        f"model.overrides.image_size={size}",
        "train.checkpoint_every=1000",
    ]
    wli_only = [
        "model.name=fuse_early",
        "model.overrides.modalities=[wli]",
        "model.overrides.in_channels=3",
        "data.modalities=['image:wli']",
        *NO_ADF_LOSS,
    ]
    adf: dict[str, list[float]] = {"wli": [], "nbi": [], "wli+nbi": []}
    unet: list[float] = []
    seconds = {"adf": 0.0, "unet": 0.0}
    n_test = []
    for k, manifest in enumerate(fold_manifests(source, folds)):
        base = [f"data.manifest={manifest}", *common]
        m = train("mmendocl_wli_nbi", f"fuse_wli_nbi_adf_fold{k}", base)
        for key in adf:
            adf[key].append(subset_dice(m, key))
        seconds["adf"] += m["train"]["seconds"]
        n_test.append(m["subsets"]["wli+nbi"]["n_images"])
        u = train("mmendocl_wli_nbi", f"fuse_wli_nbi_wli_only_fold{k}", [*base, *wli_only])
        unet.append(subset_dice(u, "wli"))
        seconds["unet"] += u["train"]["seconds"]
    return {
        "epochs": epochs,
        "size": size,
        "folds": folds,
        "n_test": n_test,
        "adf": adf,
        "unet_wli": unet,
        "train_seconds": seconds,
        "machine": machine(),
    }


def render_wli_nbi(results: dict[str, Any]) -> str:
    adf, unet, seconds = results["adf"], results["unet_wli"], results["train_seconds"]
    rows = [
        f"| ADF trained on WLI+NBI | {pct(adf['wli'])} | {pct(adf['nbi'])} | {pct(adf['wli+nbi'])} "
        f"| {seconds['adf']:.0f} s |",
        f"| U-Net trained on WLI only (`fuse_early` with one modality) | {pct(unet)} | – | – "
        f"| {seconds['unet']:.0f} s |",
    ]
    better = "the WLI-only U-Net" if statistics.mean(unet) > statistics.mean(adf["wli"]) else "ADF"
    return "\n".join(
        [
            "**Smoke benchmark**: the MM-EndoCL demo release has 17 WLI/NBI pairs, far too few to compare "
            "with the paper or to separate methods; this only shows the pipeline runs end to end on real "
            f"paired endoscopy. {results['folds']} folds by case (seeded; test folds of "
            f"{'/'.join(map(str, results['n_test']))} pairs), train on the rest, no validation split; "
            f"configs/fuse/mmendocl_wli_nbi.yaml at {results['size']} px (recipe: 256), {results['epochs']} "
            "epochs (batch 4), modality dropout 0.2. The ADF model is evaluated with WLI only, NBI only and "
            "both (one model); the WLI-only U-Net is a separate model (same decoder, no ADF losses). Per-image "
            f"Dice %, mean ± std over the folds. {SELECTION} Machine: {results['machine']}.",
            "",
            "| model | WLI | NBI | WLI+NBI | train time (all folds) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"On WLI alone {better} scores higher here; with 13-14 training pairs per fold no conclusion "
            "about the method follows.",
        ]
    )


@torch.no_grad()
def per_patient(out: Path) -> dict[str, dict[str, float]]:
    """Per-slice and per-patient Dice of every subset, re-predicted from the run's bundle (cached)."""
    from medalign.bundle import load_bundle
    from medalign.data.dataset import Collator
    from medalign.metrics import _overlap_counts, _paired_batches
    from medalign.run import fusion_columns, fusion_dataset, modality_subsets
    from medalign.tasks.fuse import predict

    cache = out / "bench_per_patient.json"
    if cache.is_file() and cache.stat().st_mtime >= (out / "metrics.json").stat().st_mtime:
        return json.loads(cache.read_text())
    config = load_config(out / "config.yaml")
    manifest = read_manifest(config.data.manifest)
    model = load_bundle(out / "bundle").eval()
    keys = fusion_columns(config, manifest, model)
    dataset = fusion_dataset(config, manifest, model, keys, config.eval.split, augment=False)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.data.eval_batch_size, collate_fn=Collator(model.tokenizer)
    )
    patient_of = dict(zip(manifest.table["case_id"], manifest.table["patient_id"], strict=True))
    names = list(model.config.modalities)
    subsets = {"+".join(names[i] for i in s): s for s in modality_subsets(names)}
    counts: dict[str, dict[str, np.ndarray]] = {k: {} for k in subsets}
    slices: dict[str, list[float]] = {k: [] for k in subsets}
    for batch in loader:
        target = batch[config.data.mask][:, 0].numpy()
        for key, subset in subsets.items():
            chosen = torch.zeros(len(names), dtype=torch.bool)
            chosen[list(subset)] = True
            present = batch["modalities_present"].bool() & chosen
            p, g = _paired_batches(predict(model, batch, keys, present).numpy(), target, 0.5)
            inter, psum, gsum = _overlap_counts(p, g)
            for case, i, ps, gs in zip(batch["case_id"], inter, psum, gsum, strict=True):
                total = counts[key].setdefault(patient_of[case], np.zeros(3, dtype=np.int64))
                total += (i, ps, gs)
                slices[key].append(1.0 if ps + gs == 0 else 2.0 * i / (ps + gs))
    result = {
        key: {
            "slice_dice": float(np.mean(slices[key])),
            "patient_dice": float(np.mean([2 * c[0] / max(c[1] + c[2], 1) for c in counts[key].values()])),
            "n_patients": len(counts[key]),
            "n_slices": len(slices[key]),
        }
        for key in subsets
    }
    cache.write_text(json.dumps(result, indent=2))
    return result


LGG_ORDER = ["pre+flair+post", "flair", "pre", "post", "pre+flair", "flair+post", "pre+post"]
LGG_HEADER = ["all three", "FLAIR", "pre", "post", "no post", "no pre", "no FLAIR"]


def bench_lgg(epochs: int, size: int) -> dict[str, Any]:
    manifest = imported("lgg", "lgg", "lgg_mri")
    table = read_manifest(manifest).table
    split_sizes = {
        s: [int((table["split"] == s).sum()), int(table.loc[table["split"] == s, "patient_id"].nunique())]
        for s in ("train", "val", "test")
    }
    common = [
        f"data.manifest={manifest}",
        f"train.epochs={epochs}",
        f"model.overrides.image_size={size}",
        "train.checkpoint_every=1000",
    ]
    rows, gap = {}, 0.0
    for arch in ARCHS:
        m = train("lgg_sequences", f"fuse_lgg_{arch}", [*common, *arch_overrides(arch)])
        pp = per_patient(RUNS / f"fuse_lgg_{arch}")
        for key in LGG_ORDER:  # the re-prediction must reproduce evaluate_fusion's per-slice Dice
            gap = max(gap, abs(pp[key]["slice_dice"] - subset_dice(m, key)))
            if gap > 1e-3:
                raise RuntimeError(f"{arch} {key}: re-predicted {pp[key]['slice_dice']} vs {subset_dice(m, key)}")
        rows[arch] = {
            "slice": {k: subset_dice(m, k) for k in LGG_ORDER},
            "patient": {k: pp[k]["patient_dice"] for k in LGG_ORDER},
            "parameters": parameters(f"fuse_lgg_{arch}"),
            "train_seconds": m["train"]["seconds"],
        }
    return {
        "epochs": epochs,
        "size": size,
        "split_sizes": split_sizes,
        "rows": rows,
        "max_reprediction_gap": gap,
        "published_buda_patient_dice": BUDA_PUBLISHED,
        "machine": machine(),
    }


def render_lgg(results: dict[str, Any]) -> str:
    epochs, size, gap = results["epochs"], results["size"], results["max_reprediction_gap"]
    lines = []
    for arch, r in results["rows"].items():
        lines.append(
            f"| {ARCHS[arch]} ({r['parameters'] / 1e6:.2f} M) | per slice | "
            + " | ".join(f"{100 * r['slice'][k]:.1f}" for k in LGG_ORDER)
            + " |"
        )
        lines.append("| | per patient | " + " | ".join(f"{100 * r['patient'][k]:.1f}" for k in LGG_ORDER) + " |")
    lines.append(
        f"| U-Net, Buda et al. 2019 (*published*) | per patient, all slices | "
        f"{100 * results['published_buda_patient_dice']:.0f} |" + " – |" * (len(LGG_ORDER) - 1)
    )
    sizes = results["split_sizes"]
    total = sum(r["train_seconds"] for r in results["rows"].values())
    return "\n".join(
        [
            "LGG brain MRI (Buda et al.; shared pack: 110 patients, 1,373 slices that contain lesion), the "
            "three sequences of each slice (pre-contrast, FLAIR, post-contrast) as three modalities, FLAIR "
            f"abnormality masks; the importer's split by patient (seed 0): {sizes['train'][0]} train slices / "
            f"{sizes['train'][1]} patients, {sizes['val'][1]} val patients (unused), {sizes['test'][0]} test "
            f"slices / {sizes['test'][1]} patients. configs/fuse/lgg_sequences.yaml at a CPU schedule: {size} px "
            f"(recipe: 256), {epochs} epochs (recipe: 50), batch 16, lr 1e-3, modality dropout 0.3, augmentation "
            f"as the recipe, 1 seed; three models, {total / 60:.1f} min of training in all. Each model is "
            'evaluated on all 7 subsets of sequences ("no post" = pre+FLAIR, etc.). Dice % per slice (mean '
            "over test slices, metrics.json) and per patient (a test patient's slices pooled: 2 Σ|P∩G| / "
            "(Σ|P| + Σ|G|), then the mean over patients; re-predicted from the saved bundle, which reproduces "
            f"the per-slice numbers of metrics.json {'exactly' if gap == 0 else f'to {gap:.1e}'}), at {size} px. "
            "The *published* 82% is per patient over *all* slices of a patient, most of them without lesion, "
            "at 256 px; this pack holds lesion slices only, so it is not the same protocol (no empty slices "
            f"to keep empty) and a {epochs}-epoch CPU schedule is far from converged. Baselines without the "
            f"ADF loss terms. {SELECTION} Machine: {results['machine']}.",
            "",
            "| model | Dice | " + " | ".join(LGG_HEADER) + " |",
            "|---|---|" + "---|" * len(LGG_HEADER),
            *lines,
        ]
    )


# ---------------------------------------------------------------------------------------------
# LGG with an ImageNet-pretrained encoder: choose on the val patients, read test once
# ---------------------------------------------------------------------------------------------

LGG_VARIANTS = {  # the pretrained encoder's learning rate, relative to the decoder's 1e-3
    "encoder lr x0.1": ["optim.lr_multipliers={encoder.tower: 0.1}"],
    "encoder lr x1": ["optim.lr_multipliers={}"],
}
LGG_MODELS = {  # key -> (label, overrides on configs/fuse/lgg_pretrained.yaml)
    "pretrained": ("early fusion, EfficientNet-Lite0 encoder (ImageNet, offline)", []),
    "scratch": (
        "early fusion, conv encoder from scratch (lgg_sequences.yaml's U-Net)",
        ["model.overrides.vision=null", "optim.lr_multipliers={}"],
    ),
}
LGG_ORDER = ["pre+flair+post", "flair", "pre", "post", "pre+flair", "flair+post", "pre+post"]
LGG_HEADER = ["all three", "FLAIR", "pre", "post", "no post", "no pre", "no FLAIR"]


def lgg_run(run: str, overrides: list[str]) -> dict[str, Any]:
    """Train one lgg_pretrained variant and score it per slice and per patient on its eval split."""
    metrics = train("lgg_pretrained", run, overrides)
    scores = per_patient(RUNS / run)
    for key in LGG_ORDER:  # the re-prediction must reproduce evaluate_fusion's per-slice Dice
        if abs(scores[key]["slice_dice"] - subset_dice(metrics, key)) > 1e-3:
            raise RuntimeError(f"{run} {key}: re-predicted {scores[key]['slice_dice']} vs {subset_dice(metrics, key)}")
    return {
        "split": metrics["split"],
        "subsets": scores,
        "parameters": parameters(run),
        "train_seconds": metrics["train"]["seconds"],
        "train_steps": metrics["train"]["steps"],
    }


def bench_lgg_pretrained(epochs: int, select_epochs: int, size: int, keys: list[str]) -> None:
    """Choose the encoder's learning rate on the val patients, then train the models ``keys`` on
    the train patients and read the test patients once (a model left out is recorded as not run)."""
    manifest = imported("lgg", "lgg", "lgg_mri")
    table = read_manifest(manifest).table
    splits = {
        s: [int((table["split"] == s).sum()), int(table.loc[table["split"] == s, "patient_id"].nunique())]
        for s in ("train", "val", "test")
    }
    common = [f"data.manifest={manifest}", f"train.epochs={epochs}", f"model.overrides.image_size={size}", *REAL_DATA_RUN]
    pilot = [*common[:1], f"train.epochs={select_epochs}", *common[2:], "eval.split=val"]
    selection = {name: lgg_run(f"fuse_lgg_select_{slug(name)}", [*pilot, *extra]) for name, extra in LGG_VARIANTS.items()}
    chosen = max(selection, key=lambda name: selection[name]["subsets"][LGG_ORDER[0]]["patient_dice"])
    models = {}
    for key in keys:
        label, extra = LGG_MODELS[key]
        extra = [*LGG_VARIANTS[chosen], *extra]  # the scratch row resets the multipliers again
        models[key] = {"label": label, "overrides": extra, **lgg_run(f"fuse_lgg_{key}", [*common, *extra])}
    benchlib.save_results(
        "bench_fuse_lgg_pretrained",
        {
            "machine": machine(),
            "protocol": {"size": size, "epochs": epochs, "select_epochs": select_epochs, "splits": splits},
            "selection": selection,
            "chosen": chosen,
            "models": models,
            "published": BUDA_PUBLISHED,
        },
    )


def lgg_pretrained_block() -> str:
    r = benchlib.load_results("bench_fuse_lgg_pretrained")
    p = r["protocol"]
    (n_train, p_train), (n_val, p_val), (n_test, p_test) = (p["splits"][s] for s in ("train", "val", "test"))
    rows = []
    for key, (label, _) in LGG_MODELS.items():
        if key not in r["models"]:
            rows.append(f"| {label} | not run |" + " – |" * (len(LGG_ORDER) + 1))
            continue
        model = r["models"][key]
        s = model["subsets"]
        rows.append(
            f"| {model['label']} ({model['parameters']}) | per patient | "
            + " | ".join(f"{100 * s[k]['patient_dice']:.1f}" for k in LGG_ORDER)
            + f" | {model['train_seconds'] / 60:.0f} min |"
        )
        rows.append("| | per slice | " + " | ".join(f"{100 * s[k]['slice_dice']:.1f}" for k in LGG_ORDER) + " | |")
    rows.append(
        f"| U-Net, Buda et al. 2019 (published) | per patient, all slices | {100 * r['published']:.0f} |"
        + " – |" * (len(LGG_ORDER) - 1)
        + " – |"
    )
    selection = [
        f"| {name}{' (chosen)' if name == r['chosen'] else ''} | "
        f"{100 * v['subsets'][LGG_ORDER[0]]['patient_dice']:.1f} | {100 * v['subsets'][LGG_ORDER[0]]['slice_dice']:.1f} |"
        for name, v in r["selection"].items()
    ]
    return "\n".join(
        [
            f"LGG brain MRI (Buda et al.; shared pack: 110 patients, lesion slices only), the three sequences of "
            f"each slice (pre-contrast, FLAIR, post-contrast: the release's R, G, B) as three modalities stacked "
            f"into one encoder (early fusion), FLAIR-abnormality masks; the importer's split by patient (seed 0): "
            f"{n_train} train slices / {p_train} patients, {n_val} val slices / {p_val} patients, {n_test} test "
            f"slices / {p_test} patients. Selection: the pretrained encoder's learning rate, by per-patient Dice "
            f"with all three sequences on the val patients ({p['select_epochs']} epochs); then both models train "
            f"{p['epochs']} epochs{'' if p['epochs'] == 12 else ' (recipe: 12; the CPU time box)'} on the train patients and the test patients are "
            f"read once. configs/fuse/"
            f"lgg_pretrained.yaml at {p['size']} px, batch 16, AdamW lr 1e-3 with cosine decay, Dice + BCE, "
            f"modality dropout 0.3 (one model for every subset), 1 seed. Dice % per patient (a patient's test "
            f"slices pooled: 2 Σ|P∩G| / (Σ|P| + Σ|G|), then the mean over patients) and per slice, for all 7 "
            f"subsets of sequences (\"no post\" = pre+FLAIR, ...). Protocol difference from the published 82%: "
            f"Buda et al. pool *all* slices of a patient, most of them without lesion (a model must also keep "
            f"those empty), at 256 px with 3-fold cross-validation over the 110 patients; this pack holds lesion "
            f"slices only and one seeded split. Machine: {r['machine']}.",
            "",
            "| model | Dice | " + " | ".join(LGG_HEADER) + " | train time |",
            "|---|---|" + "---|" * len(LGG_HEADER) + "---|",
            *rows,
            "",
            "| encoder learning rate (selection) | val Dice per patient % | val Dice per slice % |",
            "|---|---|---|",
            *selection,
        ]
    )


TITLES = {
    "phantom": "Fusion on the phantom: a, b and a+b",
    "wli_nbi": "Fusion on paired WLI/NBI endoscopy (MM-EndoCL demo, smoke)",
    "lgg": "Fusion of LGG MRI sequences, with missing sequences",
    "lgg_pretrained": "LGG MRI with an ImageNet-pretrained encoder",
}
RENDER: dict[str, Callable[[dict[str, Any]], str]] = {
    "phantom": render_phantom,
    "wli_nbi": render_wli_nbi,
    "lgg": render_lgg,
}


def blocks() -> dict[str, str]:
    """The blocks of BENCHMARKS.md this script renders from results files alone."""
    rendered = benchlib.rendered({f"bench_fuse_{name}": render for name, render in RENDER.items()})
    if benchlib.results_path("bench_fuse_lgg_pretrained").is_file():
        rendered["bench_fuse_lgg_pretrained"] = lgg_pretrained_block()
    return rendered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=list(TITLES))
    parser.add_argument("--epochs", type=int, default=None, help="override the schedule's epochs")
    parser.add_argument("--size", type=int, default=None, help="override the schedule's image size")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--select-epochs", type=int, default=None, help="lgg_pretrained: epochs of the val runs")
    parser.add_argument("--models", default=None, help=f"lgg_pretrained: models, from {','.join(LGG_MODELS)} ('' for the selection only)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the other core is busy, see the protocol)"
    )
    parser.add_argument("--write", action="store_true", help="save benchmarks/results/bench_fuse_<bench>.json, rewrite its block")
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.bench == "lgg_pretrained":  # results file + blocks()
        keys = [k for k in args.models.split(",") if k] if args.models is not None else list(LGG_MODELS)
        unknown = sorted(set(keys) - set(LGG_MODELS))
        if unknown:
            parser.error(f"unknown --models {unknown}; choose from {list(LGG_MODELS)}")
        bench_lgg_pretrained(args.epochs or 12, args.select_epochs or 6, args.size or 256, keys)
        body = lgg_pretrained_block()
        print(body)
        if args.write:
            benchlib.write_blocks({"bench_fuse_lgg_pretrained": body})
        return
    benches: dict[str, Callable[[], dict[str, Any]]] = {
        "phantom": lambda: bench_phantom(args.epochs or 8),
        "wli_nbi": lambda: bench_wli_nbi(args.epochs or 25, args.size or 128, args.folds),
        "lgg": lambda: bench_lgg(args.epochs or 5, args.size or 128),
    }
    results = benches[args.bench]()
    render = RENDER[args.bench]
    if args.write:
        heading = f"## {TITLES[args.bench]} (`benchmarks/bench_fuse.py {args.bench}`)"
        print(benchlib.publish(f"bench_fuse_{args.bench}", results, render, heading))
    else:
        print(render(json.loads(json.dumps(results, default=float))))


if __name__ == "__main__":
    main()
