"""Scaling curves: time and peak memory vs batch size, image size and dataset size, ours vs reference.

* batch size and image size: one alignment training step with the towers of
  ``bench_align_step.py`` (CLIP ViT 384 x 6, text 256 x 4), medalign's DualEncoder as the Engine
  trains it (bf16) vs ``transformers.CLIPModel`` under the same bf16 autocast with fused AdamW
  and eager attention (the reference; see ``REFERENCE_ATTENTION``);
* dataset size: top-10 search for a batch of 64 queries over N x 512 embeddings, medalign's
  memory-mapped exact index vs NumPy's full product + argpartition.

Every point runs in a fresh process, so its peak resident memory (``VmHWM``) is its own (the
index is built beforehand; search points only load it); time is the median of the timed repeats
after a warm-up. Plots go to ``benchmarks/scaling_*.png``.

    python benchmarks/bench_scaling.py [--quick] [--write]

``--write`` saves ``benchmarks/results/bench_scaling_curves.json`` and rewrites its block.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

HERE = Path(__file__).resolve().parent
# CLIPModel's attention in the reference: eager, the faster of its two implementations for a bf16
# training step on a CPU in the alignment-step benchmark (bench_align_step.py times both)
REFERENCE_ATTENTION = "eager"
ATTENTION_NOTES = {
    "sdpa": "its default SDPA attention",
    "eager": "eager attention (the faster of its two in the alignment-step benchmark)",
}
BATCHES = (8, 16, 32, 64)
SIZES = (64, 128, 192, 256)
ROWS = (10_000, 100_000, 300_000, 1_000_000)


def peak_mb() -> float:
    """This process's own peak resident memory: VmHWM, which (unlike ``ru_maxrss``) a child does
    not inherit from the parent that started it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def align_point(side: str, batch: int, size: int, repeats: int) -> dict:
    import torch

    import bench_align_step
    from bench_align_step import MedalignTrainer, ReferenceTrainer, build_ours, build_reference, make_batch

    bench_align_step.BATCH, bench_align_step.IMAGE_SIZE = batch, size
    torch.manual_seed(0)
    reference = build_reference(REFERENCE_ATTENTION)
    data = make_batch()
    trainer = ReferenceTrainer(reference, data) if side == "reference" else MedalignTrainer(build_ours(reference), data)
    if side != "reference":
        del reference
    trainer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times)}


def index_folder(rows: int) -> Path:
    """The N-row index on disk (built once, in the parent): children only load it, so their peak
    memory is the search's, not the data generation's."""
    from bench_index import embeddings
    from medalign.retrieval import EmbeddingIndex

    folder = benchlib.RUNS / "scaling" / f"index-{rows}"
    if not (folder / "index.json").is_file():
        EmbeddingIndex.from_embeddings(embeddings(rows, 512)).save(folder)
    return folder


def search_point(side: str, rows: int, repeats: int) -> dict:
    import numpy as np

    from bench_index import numpy_reference
    from medalign.retrieval import EmbeddingIndex

    index = EmbeddingIndex.load(index_folder(rows))  # memory-mapped
    queries = np.asarray(index.embeddings[:64]) + 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    if side == "ours":
        run = lambda: index.search(queries, 10)  # noqa: E731
    else:
        keys = np.array(index.embeddings)  # the plain way: the whole matrix in memory
        run = lambda: numpy_reference(keys, queries, 10)  # noqa: E731
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times) / 64}


def child(argv: list[str]) -> None:
    kind, side, *values = argv
    repeats = 2
    point = align_point(side, int(values[0]), int(values[1]), repeats) if kind == "align" else search_point(side, int(values[0]), 3)
    print(json.dumps({**point, "peak_mb": peak_mb()}))


def measure(kind: str, side: str, *values: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--point", kind, side, *map(str, values)],
        capture_output=True, text=True, check=True, cwd=HERE,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(name: str, xlabel: str, xs: tuple[int, ...], series: dict[str, list[dict]], time_label: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, points in series.items():
        left.plot(xs, [p["seconds"] * (1000 if "ms" in time_label else 1) for p in points], marker="o", label=label)
        right.plot(xs, [p["peak_mb"] for p in points], marker="o", label=label)
    for ax, ylabel in ((left, time_label), (right, "peak resident memory (MB)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if max(xs) / min(xs) > 20:
            ax.set_xscale("log")
    left.legend(fontsize=8)
    figure.tight_layout()
    path = HERE / f"scaling_{name}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


SIDES = {"reference": "transformers CLIPModel bf16", "ours": "medalign DualEncoder bf16"}
SEARCH_SIDES = {"reference": "NumPy matmul + argpartition", "ours": "medalign exact index (mmap)"}
AXES = {  # curve -> (x label, time label, table unit)
    "batch": ("batch size (pairs, 128 px)", "seconds per step", "s"),
    "image": ("image size (px, batch 16)", "seconds per step", "s"),
    "dataset": ("indexed embeddings (512-d)", "ms per query (batch of 64)", "ms"),
}


def run(quick: bool) -> dict[str, Any]:
    batches, sizes, rows = (BATCHES[:2], SIZES[:2], ROWS[:2]) if quick else (BATCHES, SIZES, ROWS)
    for n in rows:
        index_folder(n)
    curves = {
        "batch": {SIDES[s]: [measure("align", s, b, 128) for b in batches] for s in SIDES},
        "image": {SIDES[s]: [measure("align", s, 16, z) for z in sizes] for s in SIDES},
        "dataset": {SEARCH_SIDES[s]: [measure("search", s, n) for n in rows] for s in SEARCH_SIDES},
    }
    xs = {"batch": list(batches), "image": list(sizes), "dataset": list(rows)}
    for name, (xlabel, time_label, _) in AXES.items():
        plot(name, xlabel, tuple(xs[name]), curves[name], time_label)
    return {"xs": xs, "curves": curves, "reference_attention": REFERENCE_ATTENTION, "machine": benchlib.machine()}


def render(results: dict[str, Any]) -> str:
    lines = []
    for name, (_, _, unit) in AXES.items():
        curve, xs = results["curves"][name], results["xs"][name]
        labels = list(curve)
        lines.append(f"| {name} | " + " | ".join(f"{lab}: time, peak MB" for lab in labels) + " | ratio |")
        lines.append("|---|" + "---|" * (len(labels) + 1))
        for i, x in enumerate(xs):
            cells = []
            for lab in labels:
                p = curve[lab][i]
                cells.append(f"{p['seconds'] * (1000 if unit == 'ms' else 1):.2f} {unit}, {p['peak_mb']:.0f}")
            ratio = curve[labels[0]][i]["seconds"] / curve[labels[1]][i]["seconds"]
            lines.append(f"| {x:,} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
        lines.append("")
    return (
        "Each point in a fresh process (peak RSS = `VmHWM`, model and data included); time = median of "
        "the timed repeats after a warm-up. Alignment step: towers of the alignment-step benchmark, batch "
        "sweep at 128 px, image sweep at batch 16, both sides under bf16 autocast (the reference: "
        f"`CLIPModel` with {ATTENTION_NOTES[results.get('reference_attention', 'sdpa')]} and fused AdamW). "
        "Search: top-10 for 64 queries over "
        f"N x 512 rows. Ratio = reference time / ours. Machine: {results['machine']}.\n\n"
        + "\n".join(lines)
        + "\n"
        + "\n".join(f"![scaling_{name}](benchmarks/scaling_{name}.png)" for name in AXES)
    )


def blocks() -> dict[str, str]:
    return benchlib.rendered({"bench_scaling_curves": render})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="the two smallest points of each curve")
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    if args.point:
        child(args.point)
        return
    results = run(args.quick)
    if args.write:
        print(benchlib.publish("bench_scaling_curves", results, render, "## Scaling curves (`benchmarks/bench_scaling.py curves`)"))
    else:
        print(render(results))


if __name__ == "__main__":
    main()
