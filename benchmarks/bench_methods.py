"""The README's method table ("Seed methods -> recipes -> what we measured"), from results files.

This script runs no benchmark: every number in the table is read from a results file another
benchmark committed under ``benchmarks/results/``, so the README cannot drift from BENCHMARKS.md.
A row whose results file is missing says which command writes it instead of showing a number.
*Published* figures come from the constants of the benchmark that compares with them.

    python benchmarks/bench_methods.py   # rewrite the method_table block of README.md
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import benchlib
from bench_fuse import BUDA_PUBLISHED
from bench_segment import LVIT_PUBLISHED


def _stat(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _missing(command: str) -> str:
    return f"no current results (run `python benchmarks/{command} --write`)"


def _rows(r: dict[str, Any]) -> dict[str, list[float]]:
    """bench_text_segment results: variant key -> test Dice % of each seed."""
    return {row["key"]: [100 * x["dice"] for x in row["runs"]] for row in r["rows"]}


def _lvit(r: dict[str, Any]) -> str:
    dice = _rows(r)
    return (
        f"MoNuSeg, 224 px, short CPU schedule: Dice {_stat(dice['text'])} with LViT's text, "
        f"{_stat(dice['image_only'])} image-only ({len(dice['text'])} seed(s))"
    )


def _c2fvl(r: dict[str, Any]) -> str:
    dice = {key: _stat(values) for key, values in _rows(r).items()}
    return (
        f"phantom prompts: Dice {dice['attributes']} from side + zone attributes (free text {dice['text']}, "
        f"image only {dice['image_only']})"
    )


def _endocl(r: dict[str, Any]) -> str:
    adf = r["rows"]["fuse_adf"]
    whole = "pre+flair+post"
    return (
        f"LGG, 3 sequences, {r['size']} px, {r['epochs']} epochs: Dice {100 * adf['slice'][whole]:.1f} per slice / "
        f"{100 * adf['patient'][whole]:.1f} per patient; WLI-NBI demo (17 pairs): smoke only"
    )


def _nextgen(r: dict[str, Any]) -> str:
    bacc, auc = r["rows"]["zero-shot balanced_accuracy"], r["rows"]["zero-shot auc"]
    return (
        f"BUSI zero-shot balanced acc. {statistics.mean(bacc['before']):.2f} → {statistics.mean(bacc['after']):.2f}, "
        f"AUC {statistics.mean(auc['before']):.2f} → {statistics.mean(auc['after']):.2f} after adapters (3 folds)"
    )


def _stage1(r: dict[str, Any]) -> str:
    plain = next(row for row in r["rows"] if row["model"] == "plain")
    return f"plain MAE step {plain['vs_hf']:.2f}x HF ViTMAE's throughput; label-efficiency table in BENCHMARKS.md"


def _stage2(r: dict[str, Any]) -> str:
    before = r["before"]["retrieval"]["image_to_text"]["median_rank"]
    after = r["after"]["retrieval"]["image_to_text"]["median_rank"]
    n = r["after"]["retrieval"]["image_to_text"]["n_queries"]
    return f"MedPix image→text median rank {before:g} → {after:g} (of {n})"


def _stage3(r: dict[str, Any]) -> str:
    cox, death = r["phantom"]["cox"], r["lgg"]["death"]["vit"]
    low, high = death["auc_patient_ci95"]
    return (
        f"phantom Cox C-index {cox['c_index']:.3f} (ceiling {r['phantom']['true_hazard_c_index']:.3f}); LGG death "
        f"patient AUC {death['auc_patient']:.2f} (95% CI {low:.2f}–{high:.2f}, {death['n_test_patients']} patients)"
    )


# method, what it does, recipes, (results file, its command, our result), published
ROWS: list[tuple[str, str, str, tuple[str, str, Callable[[dict[str, Any]], str]], str]] = [
    ("LViT (text-guided U-Net)", "segmentation guided by a sentence per image", "`configs/segment/lvit_monuseg.yaml`, `configs/segment/qata_text.yaml`",
     ("bench_text_segment_monuseg", "bench_text_segment.py monuseg", _lvit),
     f"LViT-T {LVIT_PUBLISHED['LViT-T (published)'][0]:.2f} (full schedule)"),
    ("C2FVL (structured attributes)", "attributes instead of free text, coarse-to-fine side outputs",
     "`configs/segment/c2fvl_attributes.yaml`", ("bench_text_segment_phantom", "bench_text_segment.py phantom", _c2fvl), "–"),
    ("MM-EndoCL (align–disentangle–fuse)", "paired modalities, MMD + shared/specific + contrastive",
     "`configs/fuse/mmendocl_wli_nbi.yaml`, `configs/fuse/lgg_sequences.yaml`",
     ("bench_fuse_lgg", "bench_fuse.py lgg", _endocl),
     f"Buda U-Net {100 * BUDA_PUBLISHED:.0f} per patient (other protocol)"),
    ("NextGen-UIA (aligned encoder → zero-shot, adapters, CLIP decoder)",
     "MedPix alignment, BUSI Mona/LoRA adaptation, CLIP-feature segmentation",
     "`configs/align/medpix.yaml`, `configs/align/nextgen_uia_busi.yaml`, `configs/segment/clipseg_busi.yaml`",
     ("bench_align_busi", "bench_align_quality.py busi", _nextgen), "–"),
    ("HiCur-NPC Stage I (hybrid MAE)", "masked reconstruction + contrast of two views/modalities",
     "`configs/pretrain/*.yaml`", ("bench_pretrain", "bench_pretrain.py", _stage1), "–"),
    ("HiCur-NPC Stage II (alignment)", "image ↔ report", "`configs/align/phantom.yaml`, `configs/align/medpix.yaml`",
     ("bench_align_medpix", "bench_align_quality.py medpix", _stage2), "–"),
    ("HiCur-NPC Stage III (fusion + heads)", "MoE cross-attention fusion; diagnosis, prognosis, reports",
     "`configs/fuse/moe_text_seg.yaml`, `configs/clinical/*.yaml`, `configs/report/*.yaml`",
     ("bench_clinical", "bench_clinical.py", _stage3), "–"),
]  # fmt: skip
CURRICULUM_ROW = (
    "| HiCur-NPC curriculum | Stage I → II → III, ablations | `configs/curriculum/{phantom,medpix}.yaml` "
    "| ablation table in BENCHMARKS.md | – |"
)


def render_table() -> str:
    lines = [
        "| method | what it does | recipe(s) | our measured result | *published* |",
        "|---|---|---|---|---|",
    ]
    for method, does, recipes, (results, command, cell), published in ROWS:
        path = benchlib.results_path(results)
        measured = cell(benchlib.load_results(results)) if path.is_file() else _missing(command)
        lines.append(f"| {method} | {does} | {recipes} | {measured} | {published} |")
    lines.append(CURRICULUM_ROW)
    return "\n".join(lines)


def blocks() -> dict[str, str]:
    return {"method_table": render_table()}


if __name__ == "__main__":
    benchlib.write_blocks(blocks())
