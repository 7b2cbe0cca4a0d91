"""Text-guided segmentation: does the prompt decide what is segmented? (issue 19)

    python benchmarks/bench_text_segment.py design   [--write]  # phantom, val: what each part of the design adds
    python benchmarks/bench_text_segment.py phantom  [--write]  # text vs attributes (side+zone) vs image-only
    python benchmarks/bench_text_segment.py monuseg  [--write]  # LViT protocol, text vs image-only
    python benchmarks/bench_text_segment.py qata     [--write]  # LViT protocol on the Train subset

Every run is a recipe of ``configs/segment/`` with overrides, trained into
``$MEDALIGN_BENCH_RUNS/<run>`` (a finished run with the same overrides is reused, an interrupted
one resumes). ``--write`` saves ``benchmarks/results/bench_text_segment_<part>.json`` (numbers,
protocol, machine, date) and rewrites the part's block of BENCHMARKS.md from it; ``blocks()``
renders every block from the committed results files alone.

Each prompt-guided model is evaluated three times (``medalign eval segment`` does the same):
with the true prompt, with another image's (shuffled) and with the empty prompt. Choices (the
design, schedules) are made on the val split (``design``, ``--split val``); the tables of
``phantom``, ``monuseg`` and ``qata`` read the test split once.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchlib import (
    RUNS,
    finished,
    imported,
    load_results,
    machine,
    results_path,
    save_results,
    train,
    write_blocks,
)

SHARED = (
    " shared with other benchmark processes (train times are indicative; 1 torch thread per process), "
    "bf16 autocast"
)
NAME = "bench_text_segment"

# -- schedules (fixed to fit the CPU; the design was chosen on val: see the protocol lines) ---------

PHANTOM_STEPS = 400  # 16 prompts a step; every variant trains exactly this many steps
PHANTOM_SEEDS = 3
MONUSEG_EPOCHS = 50
MONUSEG_SEEDS = 3
QATA_EPOCHS = 2
QATA_SEEDS = 1

LVIT_MONUSEG = {"LViT-T (published)": (80.36, 67.31), "U-Net (published in LViT)": (76.45, 62.86)}
LVIT_QATA = {
    "LViT-T (published, full Train)": (83.66, 75.11),
    "C2FVL (published, full Train)": (83.40, 74.62),
    "U-Net (published in LViT, full Train)": (79.02, 69.46),
}
TARGETS = {"monuseg": 80.4, "qata": 83.7, "phantom": 85.0}

IMAGE_ONLY = ["model.overrides.text=null"]


def phantom_prompts() -> str:
    from medalign.data.phantom import PhantomConfig, generate_phantom

    folder = RUNS / "data" / "phantom480"
    prompts = folder / "prompts.csv"
    if not (prompts.is_file() and (folder / "manifest.csv").is_file()):  # never rewrite what a run reads
        generate_phantom(folder, PhantomConfig(n=480, seed=0))
    return str(prompts)


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a results file keeps of one run's metrics.json."""
    out = {
        "dice": metrics["dice"],
        "iou": metrics["iou"],
        "n_images": metrics["n_images"],
        "steps": metrics["train"]["steps"],
        "train_seconds": metrics["train"]["seconds"],
    }
    for variant, values in metrics.get("prompt_ablation", {}).items():
        if variant != "true":
            out[f"{variant}_dice"], out[f"{variant}_iou"] = values["dice"], values["iou"]
    return out


Variant = tuple[str, str, str, list[str]]  # key, label, recipe, overrides


ONLY: set[str] = set()  # --variants: train these variant keys only (parallel processes), no table
FINISHED_ONLY = [False]  # --finished-only: a table of the runs that finished, training nothing


def run_variants(variants: list[Variant], common: list[str], seeds: int, tag: str) -> list[dict[str, Any]]:
    """Train every variant for ``seeds`` seeds, seed by seed (every variant's seed 0 first, so an
    interrupted benchmark leaves complete seeds); one row per variant with one summary per seed.
    With --finished-only a variant without a finished run is left out of the table."""
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in variants}
    for seed in range(seeds):
        for key, _, recipe, extra in variants:
            if ONLY and key not in ONLY:
                continue
            run, overrides = f"text_{tag}_{key}_s{seed}", [*common, *extra, f"train.seed={seed}"]
            metrics = (
                finished(run, overrides)
                if FINISHED_ONLY[0]
                else train(recipe, run, overrides, folder="segment")
            )
            if metrics is not None:
                runs[key].append(summary(metrics))
    if ONLY:
        raise SystemExit(f"trained {sorted(ONLY)}; run again without --variants for the table")
    rows = [
        {"key": key, "label": label, "recipe": recipe, "overrides": extra, "runs": runs[key]}
        for key, label, recipe, extra in variants
        if runs[key]
    ]
    if not rows:
        raise SystemExit(f"{tag}: no run has finished yet")
    return rows


def seeds_phrase(rows: list[dict[str, Any]]) -> str:
    """How many seeds the table's numbers are over (the count column says it per row)."""
    counts = {len(row["runs"]) for row in rows}
    if counts == {1}:
        return "one seed (0)"
    if len(counts) == 1:
        return f"mean ± std over {counts.pop()} seeds"
    return "mean ± std over the seeds of each row (seeds column; a single seed shows no ±)"


# -- parts --------------------------------------------------------------------------------------


def register_legacy() -> None:
    """The former text_unet under a name of its own, so a recipe can train it for comparison."""
    from medalign.models.registry import is_model, register_model
    from medalign.models.text_guided import LegacyTextUNet, LegacyTextUNetConfig

    if not is_model("legacy_text_unet"):

        def legacy_text_unet(**overrides: Any) -> LegacyTextUNet:
            return LegacyTextUNet(LegacyTextUNetConfig().replace(**overrides))

        register_model(legacy_text_unet)


PLAIN_ROWS = ["data.prompts.per_image=1", "data.prompts.negatives_from=[]"]
GROUPED = ["data.prompts.per_image=2", "data.prompts.negatives_from=[attr:side, attr:zone]"]
DESIGN: list[Variant] = [
    ("legacy_plain", "former text_unet, one row at a time, no flips", "phantom_text",
     ["model.name=legacy_text_unet", *PLAIN_ROWS, "data.flip_axes=[]"]),
    ("legacy_grouped", "former text_unet, grouped prompts + negatives", "phantom_text",
     ["model.name=legacy_text_unet", *GROUPED]),
    ("new_plain", "text_guided, one row at a time (the recipe)", "phantom_text", PLAIN_ROWS),
    ("grouped", "text_guided, grouped prompts + negatives", "phantom_text", GROUPED),
    ("no_positions", "grouped, without 2D positions", "phantom_text",
     [*GROUPED, "model.overrides.positional=false"]),
    ("decoder_only", "grouped, without encoder fusion", "phantom_text",
     [*GROUPED, "model.overrides.encoder_fusion=[]"]),
    ("text_top2", "grouped + top 2 text layers trained (lr x0.1)", "phantom_text",
     [*GROUPED, "model.overrides.text_trainable_layers=2", "optim.lr_multipliers={text: 0.1}"]),
    ("image_only", "image-only control (same network, no text; grouped batches)", "phantom_text",
     [*GROUPED, *IMAGE_ONLY]),
]  # fmt: skip


def bench_design() -> dict[str, Any]:
    register_legacy()
    common = [f"data.manifest={phantom_prompts()}", "data.phantom=null", "eval.split=val",
              "train.epochs=1000", f"train.max_steps={PHANTOM_STEPS}", "data.num_workers=0"]  # fmt: skip
    rows = run_variants(DESIGN, common, 1, "design")
    return {
        "protocol": (
            f"Phantom (480 cases, seed 0) lesion prompts, val split ({rows[0]['runs'][0]['n_images']} prompts), "
            f"128 px, both modalities as channels, {PHANTOM_STEPS} steps of 16 prompts for every row, seed 0; "
            "per-image Dice / IoU. Grouped prompts: each image twice per batch with two prompts and targets, "
            "a cell without lesion as negative (empty target); flips mirror the prompt. The recipe "
            "(configs/segment/phantom_text.yaml) was chosen from these rows."
        ),
        "rows": rows,
        "machine": machine(SHARED),
    }


def bench_phantom(seeds: int) -> dict[str, Any]:
    common = [f"data.manifest={phantom_prompts()}", "data.phantom=null", "train.epochs=1000",
              f"train.max_steps={PHANTOM_STEPS}", "data.num_workers=0"]  # fmt: skip
    variants: list[Variant] = [
        ("text", "text-guided (free-text prompt, MiniLM words)", "phantom_text", []),
        ("attributes", "attribute-guided (C2FVL; side + zone only)", "c2fvl_attributes", []),
        ("image_only", "image-only (same network, no text)", "phantom_text", IMAGE_ONLY),
    ]
    rows = run_variants(variants, common, seeds, "phantom")
    return {
        "protocol": (
            f"Phantom (480 cases, seed 0) lesion prompts: each row names one lesion of a case (side and zone) and "
            "only that lesion is the target, so a model that cannot read the prompt can at best segment every "
            f"lesion. 128 px, both modalities as channels, {PHANTOM_STEPS} steps of 16 prompts for every model "
            "(the design chosen on val: table above), the same targets; the attribute model gets exactly the prompt's content (side, "
            f"zone). Per-image Dice / IoU on the {rows[0]['runs'][0]['n_images']} test prompts, "
            f"{seeds_phrase(rows)}; shuffled = each row given another image's prompt, empty = no prompt."
        ),
        "rows": rows,
        "machine": machine(SHARED),
    }


SCRATCH = ["model.overrides.vision=null", "model.overrides.base_width=32", "optim.lr_multipliers={}"]


def bench_monuseg(seeds: int, epochs: int, split: str, scratch: bool) -> dict[str, Any]:
    manifest = imported("monuseg_text", "lvit", "monuseg-text")
    common = [
        f"data.manifest={manifest}",
        f"train.epochs={epochs}",
        f"eval.split={split}",
        "data.num_workers=0",
    ]
    variants: list[Variant] = [
        ("text", "text-guided, EfficientNet-Lite0 (LViT's text)", "lvit_monuseg", []),
        ("image_only", "image-only, same network", "lvit_monuseg", IMAGE_ONLY),
    ]
    if scratch:  # the encoder trained from scratch instead of the pretrained one
        variants += [
            ("scratch_text", "text-guided, conv encoder from scratch", "lvit_monuseg", SCRATCH),
            (
                "scratch_image_only",
                "image-only, conv encoder from scratch",
                "lvit_monuseg",
                [*SCRATCH, *IMAGE_ONLY],
            ),
        ]
    rows = run_variants(variants, common, seeds, f"monuseg_{split}_e{epochs}")
    return {
        "protocol": (
            f"MoNuSeg with LViT's text, LViT's Train/Val/Test folders (24/6/14 images) at 224 px, trained on Train "
            f"({epochs} epochs of batch 4, a schedule fixed in advance to fit the CPU: nothing was tuned on Val), evaluated on the {rows[0]['runs'][0]['n_images']} "
            f"{split.capitalize()} images; Dice / IoU per image averaged over images (LViT's metric), "
            f"{seeds_phrase(rows)}; shuffled = another image's text, empty = no text."
        ),
        "split": split,
        "rows": rows,
        "published": LVIT_MONUSEG,
        "machine": machine(SHARED),
    }


def bench_qata(seeds: int, epochs: int, split: str) -> dict[str, Any]:
    manifest = imported("qata_text", "lvit", "qata-cov19-text")
    common = [
        f"data.manifest={manifest}",
        f"train.epochs={epochs}",
        f"eval.split={split}",
        "data.num_workers=0",
    ]
    variants: list[Variant] = [
        ("text", "text-guided, EfficientNet-Lite0 (LViT's text)", "qata_text", []),
        ("image_only", "image-only, same network", "qata_text", IMAGE_ONLY),
    ]
    rows = run_variants(variants, common, seeds, f"qata_{split}_e{epochs}")
    return {
        "protocol": (
            f"QaTa-COV19 with LViT's text at 224 px: trained on the shared copy's 3,865-image Train subset (LViT: "
            f"5,716) for {epochs} epochs of batch 16 (LViT trains up to 2,000 epochs with early stopping), "
            f"evaluated on the {rows[0]['runs'][0]['n_images']} {split.capitalize()} images; per-image Dice / IoU "
            f"averaged over images (LViT's metric), {seeds_phrase(rows)}; shuffled = another image's text (one that "
            "differs), empty = no text."
        ),
        "split": split,
        "rows": rows,
        "published": LVIT_QATA,
        "machine": machine(SHARED),
    }


# -- rendering ------------------------------------------------------------------------------------


def pct(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def column(row: dict[str, Any], key: str) -> str:
    values = [r[key] for r in row["runs"] if key in r]
    return pct(values) if values else "–"


def minutes(row: dict[str, Any]) -> str:
    return f"{statistics.mean(r['train_seconds'] for r in row['runs']) / 60:.0f} min"


def table(data: dict[str, Any]) -> str:
    lines = [
        "| model | Dice % | IoU % | Dice, shuffled prompt | Dice, empty prompt | seeds | steps | train time / seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['label']} | {column(row, 'dice')} | {column(row, 'iou')} | {column(row, 'shuffled_dice')} "
            f"| {column(row, 'empty_dice')} | {len(row['runs'])} | {row['runs'][0]['steps']} | {minutes(row)} |"
        )
    for label, (dice, iou) in data.get("published", {}).items():
        lines.append(f"| {label} | {dice:.2f} | {iou:.2f} | – | – | – | – | – |")
    return "\n".join(lines)


def mean_pct(row: dict[str, Any], key: str = "dice") -> float:
    return 100 * statistics.mean(r[key] for r in row["runs"])


def design_notes(data: dict[str, Any]) -> str:
    """What the design table says, in sentences computed from it. The ablations (positions,
    encoder fusion, text layers, image-only) were run on grouped batches, the recipe before the
    one-row-at-a-time rows were measured, so they are compared with the grouped row."""
    row = {r["key"]: r for r in data["rows"]}
    recipe, grouped, image = mean_pct(row["new_plain"]), mean_pct(row["grouped"]), mean_pct(row["image_only"])
    return " ".join(
        [
            f"Positions decide: on grouped batches, without its 2D position encodings the text-guided model scores "
            f"{mean_pct(row['no_positions']):.1f} (the image-only control {image:.1f}), with them {grouped:.1f}.",
            f"The former text_unet (no positions) ignores its prompt whatever its batches: "
            f"{mean_pct(row['legacy_plain']):.1f} one row at a time, {mean_pct(row['legacy_grouped']):.1f} with grouped "
            f"prompts and negatives, and the same with another image's prompt "
            f"({mean_pct(row['legacy_plain'], 'shuffled_dice'):.1f}).",
            f"Grouping each image's prompts into a batch with negatives gives {grouped:.1f} against "
            f"{recipe:.1f} one row at a time (the recipe keeps the better on val); it does change what the empty "
            f"prompt means: {mean_pct(row['grouped'], 'empty_dice'):.1f} (a prompt that names no lesion asks for "
            f"nothing) against {mean_pct(row['new_plain'], 'empty_dice'):.1f}.",
            f"On grouped batches, fusing in the decoder only gives {mean_pct(row['decoder_only']):.1f} and training "
            f"the text tower's top two layers {mean_pct(row['text_top2']):.1f} (one seed: differences of a point "
            "are within seed noise).",
        ]
    )


NOTES: dict[str, Callable[[dict[str, Any]], str]] = {"design": design_notes}


def render(part: str) -> str:
    data = load_results(f"{NAME}_{part}")
    notes = NOTES[part](data) if part in NOTES else ""
    return f"{data['protocol']} Machine: {data['machine']}.\n\n{table(data)}" + (
        f"\n\n{notes}" if notes else ""
    )


PARTS = ("design", "phantom", "monuseg", "qata")
README_PARTS = {
    "phantom": "Phantom lesion prompts",
    "monuseg": "MoNuSeg (LViT protocol)",
    "qata": "QaTa-COV19",
}


def readme_block() -> str:
    """The README's summary: per benchmark, true / shuffled / empty prompt next to image-only."""
    lines = [
        "| test split | text-guided Dice % | with a shuffled prompt | with no prompt | image-only Dice % | published |",
        "|---|---|---|---|---|---|",
    ]
    for part, title in README_PARTS.items():
        if not results_path(f"{NAME}_{part}").is_file():
            continue
        data = load_results(f"{NAME}_{part}")
        rows = {row["key"]: row for row in data["rows"]}
        text, image = rows["text"], rows.get("image_only", {"runs": []})
        published = "; ".join(
            f"{label.split(' (')[0]} {dice:.2f}" for label, (dice, _) in data.get("published", {}).items()
        )
        lines.append(
            f"| {title} ({len(text['runs'])} seed{'s' if len(text['runs']) > 1 else ''}) | {column(text, 'dice')} "
            f"| {column(text, 'shuffled_dice')} | {column(text, 'empty_dice')} | {column(image, 'dice')} "
            f"| {published or '–'} |"
        )
    return "\n".join(lines)


def blocks() -> dict[str, str]:
    """One block per part whose results file is committed (marker ``bench_text_segment_<part>``;
    the others keep a pending marker), and the README's summary of them (``bench_text_segment_readme``)."""
    out = {f"{NAME}_{part}": render(part) for part in PARTS if results_path(f"{NAME}_{part}").is_file()}
    if any(results_path(f"{NAME}_{part}").is_file() for part in README_PARTS):
        out[f"{NAME}_readme"] = readme_block()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--split", default="test", help="monuseg/qata: val while choosing, test once")
    parser.add_argument(
        "--scratch", action="store_true", help="monuseg: also the encoder trained from scratch"
    )
    parser.add_argument(
        "--variants", default="", help="comma-separated variant keys to train only (e.g. text,image_only)"
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="table of the finished runs only (an interrupted benchmark)",
    )
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    ONLY.update(key for key in args.variants.split(",") if key)
    FINISHED_ONLY[0] = args.finished_only
    RUNS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    benches: dict[str, Callable[[], dict[str, Any]]] = {
        "design": bench_design,
        "phantom": lambda: bench_phantom(args.seeds or PHANTOM_SEEDS),
        "monuseg": lambda: bench_monuseg(
            args.seeds or MONUSEG_SEEDS, args.epochs or MONUSEG_EPOCHS, args.split, args.scratch
        ),
        "qata": lambda: bench_qata(args.seeds or QATA_SEEDS, args.epochs or QATA_EPOCHS, args.split),
    }
    data = benches[args.part]()
    data["seconds_last_invocation"] = round(time.perf_counter() - start)
    print(f"{data['protocol']}\n\n{table(data)}")
    if args.write:
        save_results(f"{NAME}_{args.part}", data)
        write_blocks({k: v for k, v in blocks().items() if k in (f"{NAME}_{args.part}", f"{NAME}_readme")})


if __name__ == "__main__":
    main()
