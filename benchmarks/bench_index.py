"""Similar-case search at a million: top-10 over 1,000,000 x 512 unit embeddings.

Ours: ``EmbeddingIndex.search`` (exact, chunked float32 products in torch, top-k per chunk
merged), float32 and float16 storage, the index memory-mapped from disk as ``medalign index``
loads it. References in the same run: NumPy's full ``queries @ keys.T`` + ``argpartition``
(the obvious exact implementation), and FAISS ``IndexFlatIP`` (exact) when installed. Queries
are batched (64 at a time, as a service would batch); time per query = batch time / 64. Every
method's top-10 is checked against the float64 answer for the first batch.

    python benchmarks/bench_index.py [--rows 1000000 --dim 512 --batches 4] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import benchlib

BATCH = 64
K = 10


def embeddings(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit rows with cluster structure (16 centres + noise), written chunk by chunk."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, dim, generator=generator)
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        block = centres[torch.randint(0, 16, (n,), generator=generator)] + torch.randn(n, dim, generator=generator)
        out[start : start + n] = torch.nn.functional.normalize(block, dim=1).numpy()
    return out


def numpy_reference(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ keys.T
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def float64_top_k(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The ground truth: float64 scores, 100k rows at a time."""
    q = queries.astype(np.float64)
    scores = np.concatenate([q @ keys[s : s + 100_000].T.astype(np.float64) for s in range(0, len(keys), 100_000)], 1)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def timed(fn, queries: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    fn(queries[0][:2])  # warm-up
    times, answers = [], []
    for q in queries:
        start = time.perf_counter()
        answers.append(fn(q))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / BATCH, answers


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    from medalign.retrieval import EmbeddingIndex

    keys = embeddings(args.rows, args.dim)
    rng = np.random.default_rng(1)
    queries = [
        keys[rng.integers(0, args.rows, BATCH)] + 0.05 * rng.normal(size=(BATCH, args.dim)).astype(np.float32)
        for _ in range(args.batches)
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            EmbeddingIndex.from_embeddings(keys, dtype=dtype).save(Path(tmp) / dtype)
            index = EmbeddingIndex.load(Path(tmp) / dtype)
            ms, answers = timed(lambda q, index=index: index.search(q, K).indices, queries)
            rows.append((f"medalign exact, {dtype} (mmap)", ms, answers[0]))
            del index
    unit_queries = [q / np.linalg.norm(q, axis=1, keepdims=True) for q in queries]
    ms, answers = timed(lambda q: numpy_reference(keys, q, K), unit_queries)
    rows.insert(0, ("NumPy matmul + argpartition (reference)", ms, answers[0]))
    try:
        import faiss

        flat = faiss.IndexFlatIP(args.dim)
        flat.add(keys)
        ms, answers = timed(lambda q: flat.search(q, K)[1], unit_queries)
        rows.append(("FAISS IndexFlatIP", ms, answers[0]))
    except ImportError:
        pass
    truth = float64_top_k(keys, unit_queries[0], K)
    results = {
        "rows": args.rows,
        "dim": args.dim,
        "batches": args.batches,
        "methods": [{"method": name, "ms_per_query": ms, "recall@10": recall(a, truth)} for name, ms, a in rows],
        "machine": benchlib.machine(),
    }
    if args.write:
        print(benchlib.publish("bench_index_million", results, render, "## Similar-case search (`benchmarks/bench_index.py million`)"))
    else:
        print(render(results))


def render(results: dict[str, Any]) -> str:
    methods = results["methods"]
    reference_ms = methods[0]["ms_per_query"]
    table = "\n".join(
        f"| {r['method']} | {r['ms_per_query']:.2f} ms | {reference_ms / r['ms_per_query']:.2f}x | {r['recall@10']:.3f} |"
        for r in methods
    )
    return (
        f"Top-{K} over {results['rows']:,} x {results['dim']} unit float32 embeddings (16 clusters + noise), queries in "
        f"batches of {BATCH} (perturbed index rows), median over {results['batches']} batches after a warm-up; "
        "time per query = batch time / 64. Recall@10 against float64 exact scores (float16 storage may swap "
        f"near-ties). Torch uses its default threads. Machine: {results['machine']}. Target: <= 50 ms per "
        "query.\n\n| method | time per query | speed-up vs NumPy | recall@10 |\n|---|---|---|---|\n" + table
    )


def blocks() -> dict[str, str]:
    return benchlib.rendered({"bench_index_million": render})


if __name__ == "__main__":
    main()
