"""Report generation quality on this CPU: the decoder (greedy and beam) vs retrieval vs a constant.

    OMP_NUM_THREADS=1 python benchmarks/bench_report.py [--only medpix|phantom] [--epochs-medpix N]
        [--reuse-trained]

Protocols (printed with the tables and stored in benchmarks/results/bench_report.json):

* **MedPix 2.0 caption generation**: imported with ``medalign data import medpix`` (the release's
  case-disjoint train/dev/test split; dev = val, unused); one caption per image; the 200 test
  images are the evaluation. Images grayscale at 64 px (the pack's JPEGs are 224 px); recipe
  ``configs/report/medpix.yaml`` shrunk to a CPU budget: ``report_small_minilm`` with
  ``decoder_dim=256`` (4 heads, 3 layers, random word embeddings: MiniLM's 384-wide table costs
  2x per step), captions cut at 64 tokens, AdamW lr 5e-4, batch 32, bf16 autocast, seed 0.
* **Phantom**: 240 cases (seed 0, 64 px), patient-level 70/15/15 split; both contrasts stacked
  as 2 channels; recipe ``configs/report/phantom.yaml`` with the same shrunk model; evaluation
  on the test split, plus the accuracy of the findings parsed from each report against the true
  lesions (``medalign.tasks.report.finding_accuracy``).

Every method is scored on the same test references with corpus BLEU-1..4 and mean ROUGE-L
(``medalign.evaluation.textmetrics``: lowercased, punctuation split, no smoothing). Baselines: *retrieval*
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
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from medalign.tasks.columns import image_columns

from medalign.bundle import load_bundle
from medalign.config import RunConfig, load_config
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.pipeline.run import run_training
from medalign.tasks.report import evaluate_report, with_text

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDALIGN_SHARED_DATA", REPO.parent / "shared" / "data"))
RUNS = Path(os.environ.get("MEDALIGN_BENCH_RUNS", "/tmp/medalign-bench/report"))
RESULTS = REPO / "benchmarks" / "results" / "bench_report.json"
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
    "report.no_repeat_ngram_size=0",  # run_training's own evaluation is the unguarded beam row
    "report.repetition_penalty=1.0",
]
# row label -> ReportConfig fields; the first is what run_training evaluates after training
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
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {dt.date.today()}"


def train_and_score(config: RunConfig, reuse: bool) -> dict[str, Any]:
    """Train (or, with ``reuse``, load the last run's bundle), then decode the model every way."""
    start = time.perf_counter()
    out = Path(config.out)
    trained = not (reuse and (out / "bundle").is_dir() and (out / "metrics.json").is_file())
    if trained:
        run_training(config, echo=print)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    model = load_bundle(out / "bundle").eval()
    manifest, _ = with_text(read_manifest(config.data.manifest))
    keys = image_columns(config, manifest)
    decodings: dict[str, Any] = {}
    for i, (label, settings) in enumerate(DECODINGS.items()):
        if i == 0 and trained:  # run_training just evaluated exactly this decoding
            decodings[label] = {k: v for k, v in metrics.items() if k not in ("train", "n_without_text")}
            continue
        variant = dataclasses.replace(
            config,
            out=str(out / "decodings" / str(i)),
            report=dataclasses.replace(config.report, **settings),
        )
        eval_start = time.perf_counter()
        decodings[label] = evaluate_report(model, manifest, variant, keys, config.eval.split)
        decodings[label]["eval_seconds"] = round(time.perf_counter() - eval_start, 1)
        print(f"{label}: {decodings[label]['generated']} in {decodings[label]['eval_seconds']} s")
    return {
        "decodings": decodings,
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


def text_table(name: str, result: dict[str, Any]) -> str:
    """BLEU/ROUGE-L per decoding, then the two baselines (the same for every decoding)."""
    decodings = result["decodings"]
    first = next(iter(decodings.values()))
    train = result["train"]
    origin = "trained in this run" if result["trained_in_this_run"] else "bundle of the previous run"
    metrics = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")
    lines = [
        f"**{name}** ({first['n_cases']} test cases; {train['steps']} steps, {train['seconds']:.0f} s "
        f"training, {origin}; {result['wall_seconds']:.0f} s wall for this part)",
        "",
        "| method | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | words | repeat 3-gram |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, m in decodings.items():
        repeat = m.get("generated_repeating_3gram")
        repeat_cell = "n/a" if repeat is None else f"{repeat:.2f}"
        lines.append(
            f"| decoder, {label} | {_cells(m['generated'], metrics)} | {m['mean_generated_words']:.1f} "
            f"| {repeat_cell} |"
        )
    reference_repeat = first.get("reference_repeating_3gram")
    tail = "n/a" if reference_repeat is None else f"{reference_repeat:.2f}"
    lines.append(f"| retrieval (nearest train image) | {_cells(first['retrieval'], metrics)} | | |")
    lines.append(f"| constant (most frequent train caption) | {_cells(first['constant'], metrics)} | | |")
    lines.append(f"| (references) | | | | | | {first['mean_reference_words']:.1f} | {tail} |")
    return "\n".join(lines)


def findings_table(result: dict[str, Any]) -> str:
    decodings = result["decodings"]
    rows = [(f"decoder, {label}", m["findings"]["generated"]) for label, m in decodings.items()]
    rows.append(("retrieval", next(iter(decodings.values()))["findings"]["retrieval"]))
    keys = ("exact", "count", "location_precision", "location_recall", "type", "size", "diagnosis")
    lines = [
        "| method | " + " | ".join(keys) + " | no diagnosis |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for label, m in rows:
        lines.append(f"| {label} | {_cells(m, keys)} | {m['n_no_diagnosis']}/{m['n_cases']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("medpix", "phantom"))
    parser.add_argument("--epochs-medpix", type=int, default=5)
    parser.add_argument("--epochs-phantom", type=int, default=30)
    parser.add_argument("--reuse-trained", action="store_true", help="decode the last run's bundles")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for part in ("medpix", "phantom"):  # a part stored before DECODINGS existed cannot be tabled
        if "decodings" not in results.get(part, {"decodings": None}):
            del results[part]
    results["machine"] = machine()
    results["threads"] = torch.get_num_threads()
    results["protocol"] = __doc__
    if args.only in (None, "medpix"):
        results["medpix"] = medpix(args.epochs_medpix, args.reuse_trained) | {"epochs": args.epochs_medpix}
    if args.only in (None, "phantom"):
        results["phantom"] = phantom(args.epochs_phantom, args.reuse_trained) | {
            "epochs": args.epochs_phantom
        }
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"\n{machine()}, {results['threads']} thread(s)\n")
    if "medpix" in results:
        print(
            text_table(f"MedPix 2.0 test captions, {results['medpix']['epochs']} epochs", results["medpix"])
        )
    if "phantom" in results:
        print()
        print(text_table(f"Phantom test reports, {results['phantom']['epochs']} epochs", results["phantom"]))
        print("\nPhantom findings named in the reports vs the true lesions (test split):\n")
        print(findings_table(results["phantom"]))


if __name__ == "__main__":
    main()
