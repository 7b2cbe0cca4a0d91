"""Report generation quality on this CPU: the decoder (greedy and beam) vs retrieval vs a constant.

    OMP_NUM_THREADS=1 python benchmarks/bench_report.py [--only medpix|phantom] [--epochs-medpix N]
        [--reuse-trained] [--write]

Selection on val, test read once: each trained model is decoded every way of ``DECODINGS`` on the
validation split (MedPix: the release's dev split), the decoding with the best val ROUGE-L is
chosen, and only that decoding (with the baselines) is scored on the test split. ``--write`` saves
``benchmarks/results/bench_report.json`` and rewrites the ``bench_report`` block of BENCHMARKS.md
(``blocks()`` renders it from the results file alone).

Protocols (printed with the tables and stored in benchmarks/results/bench_report.json):

* **MedPix 2.0 caption generation**: imported with ``medalign data import medpix`` (the release's
  case-disjoint train/dev/test split; dev = val, where the decoding is chosen); one caption per
  image; the 200 test images are the evaluation. Images grayscale at 64 px (the pack's JPEGs are 224 px); recipe
  ``configs/report/medpix.yaml`` shrunk to a CPU budget: ``report_small_minilm`` with
  ``decoder_dim=256`` (4 heads, 3 layers, random word embeddings: MiniLM's 384-wide table costs
  2x per step), captions cut at 64 tokens, AdamW lr 5e-4, batch 32, bf16 autocast, seed 0.
* **Phantom**: 240 cases (seed 0, 64 px), patient-level 70/15/15 split; both contrasts stacked
  as 2 channels; recipe ``configs/report/phantom.yaml`` with the same shrunk model; evaluation
  on the test split, plus the accuracy of the findings parsed from each report against the true
  lesions (``medalign.tasks.report.finding_accuracy``).

Every method is scored on the same references with corpus BLEU-1..4 and mean ROUGE-L
(``medalign.textmetrics``: lowercased, punctuation split, no smoothing). Baselines: *retrieval*
= caption of the nearest training image by cosine similarity of the trained model's CLS
embedding; *constant* = the most frequent training caption for every image. Beam: 3 beams,
length penalty 1 (Hugging Face's stopping rule); greedy: argmax until EOS; both at most 64 new
tokens.

Decodings (``DECODINGS``): one trained model per dataset is decoded several times, so rows differ
only in decoding: beam 3 and greedy without loop guards (the earlier protocol), the same with
``no_repeat_ngram_size=3`` (the recipes' default), beam 3 with the 3-gram ban plus
``repetition_penalty=1.2``, and beam 3 with a 4-gram ban (phantom reports legitimately repeat
3-grams such as "zone on the left"). ``repeat 3-gram`` = share of reports (generated, or the
references) in which some word 3-gram occurs twice. ``--reuse-trained`` decodes the bundle a
previous run left in ``MEDALIGN_BENCH_RUNS`` instead of training again (the JSON says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import benchlib
from medalign.bundle import load_bundle
from medalign.config import RunConfig, load_config
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.run import image_columns
from medalign.tasks.report import evaluate_report, run_report, with_text

REPO, DATA = benchlib.REPO, benchlib.DATA
RUNS = benchlib.RUNS / "report"
CRITERION, CRITERION_NAME = "rouge_l", "ROUGE-L"  # the val metric that chooses the decoding
MODEL = [
    "model.name=report_small_minilm",
    "model.overrides.image_size=64",
    "model.overrides.decoder_dim=256",
    "model.overrides.decoder_heads=4",
    "model.overrides.init_embeddings_from_text=false",
]
COMMON = [
    "data.num_workers=0",
    "data.text_max_length=64",
    "data.batch_size=32",
    "train.precision=bf16-mixed",
    "train.progress=false",
    "train.seed=0",
    "report.max_new_tokens=64",
    "report.beam_size=3",
    "report.length_penalty=1.0",
    "report.no_repeat_ngram_size=0",  # run_report's own evaluation is the unguarded beam row
    "report.repetition_penalty=1.0",
    "eval.split=val",  # run_report's own evaluation: the first decoding, on val
]
# row label -> ReportConfig fields; the first is what run_report evaluates after training
DECODINGS: dict[str, dict[str, Any]] = {
    "beam 3": {"decoding": "beam"},
    "greedy": {"decoding": "greedy"},
    "beam 3, no-repeat 3": {"decoding": "beam", "no_repeat_ngram_size": 3},
    "greedy, no-repeat 3": {"decoding": "greedy", "no_repeat_ngram_size": 3},
    "beam 3, no-repeat 3, rep. penalty 1.2": {
        "decoding": "beam",
        "no_repeat_ngram_size": 3,
        "repetition_penalty": 1.2,
    },
    "beam 3, no-repeat 4": {"decoding": "beam", "no_repeat_ngram_size": 4},
}


def machine() -> str:
    return benchlib.machine(f", {torch.get_num_threads()} torch thread(s)", ", bf16 autocast")


def train_and_score(config: RunConfig, reuse: bool) -> dict[str, Any]:
    """Train (or, with ``reuse``, load the last run's bundle), decode the model every way on val,
    choose by val ``CRITERION``, then score the chosen decoding once on test."""
    start = time.perf_counter()
    out = Path(config.out)
    trained = not (reuse and (out / "bundle").is_dir() and (out / "metrics.json").is_file())
    if trained:
        run_report(config, echo=print)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    model = load_bundle(out / "bundle").eval()
    manifest, _ = with_text(read_manifest(config.data.manifest))
    keys = image_columns(config, manifest)

    def decode(i: int, label: str, split: str) -> dict[str, Any]:
        variant = dataclasses.replace(
            config,
            out=str(out / "decodings" / f"{split}{i}"),
            report=dataclasses.replace(config.report, **DECODINGS[label]),
        )
        eval_start = time.perf_counter()
        scored = evaluate_report(model, manifest, variant, keys, split)
        scored["eval_seconds"] = round(time.perf_counter() - eval_start, 1)
        print(f"{split} {label}: {scored['generated']} in {scored['eval_seconds']} s", flush=True)
        return scored

    val: dict[str, Any] = {}
    for i, label in enumerate(DECODINGS):
        if i == 0 and trained and metrics.get("split") == "val":  # run_report just scored this one
            val[label] = {k: v for k, v in metrics.items() if k not in ("train", "n_without_text")}
        else:
            val[label] = decode(i, label, "val")
    chosen = max(val, key=lambda label: val[label]["generated"][CRITERION])
    return {
        "val": val,
        "chosen": chosen,
        "criterion": CRITERION,
        "test": decode(list(DECODINGS).index(chosen), chosen, "test"),
        "train": metrics["train"],
        "trained_in_this_run": trained,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def medpix(epochs: int, reuse: bool) -> dict[str, Any]:
    manifest = RUNS / "data" / "medpix.csv"
    if not manifest.is_file():
        command = [str(Path(sys.executable).with_name("medalign")), "data", "import", "medpix"]
        subprocess.run([*command, str(DATA / "medpix-2"), "--out", str(manifest)], check=True)
    config = load_config(
        REPO / "configs" / "report" / "medpix.yaml",
        [f"out={RUNS / 'medpix'}", f"data.manifest={manifest}", *MODEL, *COMMON, f"train.epochs={epochs}"],
    )
    return train_and_score(config, reuse)


def phantom(epochs: int, reuse: bool) -> dict[str, Any]:
    manifest = RUNS / "data" / "phantom" / "manifest.csv"
    if not manifest.is_file():
        generate_phantom(manifest.parent, PhantomConfig(n=240, seed=0, size=64))
    config = load_config(
        REPO / "configs" / "report" / "phantom.yaml",
        [
            f"out={RUNS / 'phantom'}",
            f"data.manifest={manifest}",
            "data.phantom=null",
            *MODEL,
            *COMMON,
            f"train.epochs={epochs}",
        ],
    )
    return train_and_score(config, reuse)


def _cells(m: dict[str, Any], keys: tuple[str, ...]) -> str:
    return " | ".join("n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in keys)


TEXT_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")


def _repeat(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def val_table(result: dict[str, Any]) -> list[str]:
    """Every decoding on val: where the choice was made (bold: the chosen one)."""
    lines = [
        "| decoding (val) | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | words | repeat 3-gram |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, m in result["val"].items():
        name = f"**{label}** (chosen)" if label == result["chosen"] else label
        lines.append(
            f"| {name} | {_cells(m['generated'], TEXT_METRICS)} | {m['mean_generated_words']:.1f} "
            f"| {_repeat(m.get('generated_repeating_3gram'))} |"
        )
    return lines


def test_table(result: dict[str, Any]) -> list[str]:
    """The chosen decoding and the two baselines on test, read once."""
    m = result["test"]
    lines = [
        "| method (test) | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | words | repeat 3-gram |",
        "|---|---|---|---|---|---|---|---|",
        f"| decoder, {result['chosen']} | {_cells(m['generated'], TEXT_METRICS)} | {m['mean_generated_words']:.1f} "
        f"| {_repeat(m.get('generated_repeating_3gram'))} |",
    ]
    if "retrieval" in m:
        lines.append(f"| retrieval (nearest train image) | {_cells(m['retrieval'], TEXT_METRICS)} | | |")
    lines.append(f"| constant (most frequent train report) | {_cells(m['constant'], TEXT_METRICS)} | | |")
    lines.append(
        f"| (references) | | | | | | {m['mean_reference_words']:.1f} | {_repeat(m.get('reference_repeating_3gram'))} |"
    )
    return lines


def findings_table(result: dict[str, Any]) -> list[str]:
    findings = result["test"]["findings"]
    rows = [(f"decoder, {result['chosen']}", findings["generated"])]
    if "retrieval" in findings:
        rows.append(("retrieval baseline", findings["retrieval"]))
    keys = ("exact", "count", "location_precision", "location_recall", "type", "size", "diagnosis")
    lines = ["| method (test) | " + " | ".join(keys) + " | no diagnosis |", "|---" * (len(keys) + 2) + "|"]
    for label, m in rows:
        lines.append(f"| {label} | {_cells(m, keys)} | {m['n_no_diagnosis']}/{m['n_cases']} |")
    return lines


def render(results: dict[str, Any]) -> str:
    lines = [
        "Protocol: `report_small_minilm` (CLIP-ViT 4 x 192, patch 16; decoder 3 layers, 256 wide, 4 heads, random "
        "word embeddings, MiniLM WordPiece tokenizer), AdamW lr 5e-4, batch 32, bf16 autocast, seed 0, "
        f"{results['threads']} thread(s); at most 64 new tokens; beam search with length penalty 1. One trained model "
        "per dataset. Selection: every decoding is scored on the validation split (MedPix: the release's dev "
        f"split) and the one with the best val {CRITERION_NAME} "
        "is scored once on test, with the baselines: **retrieval** (the report of the nearest training image by the "
        "trained image encoder's embedding) and **constant** (the most frequent training report). BLEU: corpus "
        "level (pycocoevalcap rules, no smoothing); ROUGE-L: sentence F (β = 1.2) averaged; \"repeat\" = share "
        "of reports containing a repeated word 3-gram.",
    ]
    for part, title in (("medpix", "MedPix 2.0"), ("phantom", "Phantom")):
        if part not in results:
            continue
        result = results[part]
        train, test = result["train"], result["test"]
        val_n = next(iter(result["val"].values()))["n_cases"]
        lines += [
            "",
            f"**{title}**: {result['epochs']} epochs ({train['steps']} steps, {train['seconds']:.0f} s), "
            f"val {val_n} / test {test['n_cases']} cases.",
            "",
            *val_table(result),
            "",
            *test_table(result),
        ]
        if "findings" in test:
            lines += ["", "Findings read back from the test reports by `parse_report` against the true lesions:", ""]
            lines += findings_table(result)
    lines += ["", f"Machine: {results['machine']}; {results['wall_seconds']:.0f} s wall."]
    return "\n".join(lines)


def blocks() -> dict[str, str]:
    return benchlib.rendered({"bench_report": render})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("medpix", "phantom"))
    parser.add_argument("--epochs-medpix", type=int, default=5)
    parser.add_argument("--epochs-phantom", type=int, default=30)
    parser.add_argument("--reuse-trained", action="store_true", help="decode the last run's bundles")
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    path = benchlib.results_path("bench_report")
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    for part in ("medpix", "phantom"):  # a part stored before val selection existed cannot be tabled
        if "val" not in results.get(part, {"val": None}):
            del results[part]
    results["machine"] = machine()
    results["threads"] = torch.get_num_threads()
    if args.only in (None, "medpix"):
        results["medpix"] = medpix(args.epochs_medpix, args.reuse_trained) | {"epochs": args.epochs_medpix}
    if args.only in (None, "phantom"):
        results["phantom"] = phantom(args.epochs_phantom, args.reuse_trained) | {"epochs": args.epochs_phantom}
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    if args.write:
        print(benchlib.publish("bench_report", results, render, "## Report generation (`benchmarks/bench_report.py`)"))
    else:
        print(render(json.loads(json.dumps(results, default=float))))


if __name__ == "__main__":
    main()
