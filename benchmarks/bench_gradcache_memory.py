"""Peak memory of one contrastive step over 1024 pairs: embedding cache (GradCache) vs plain backprop.

Both modes run the real training path: ``medalign.engine.Engine.fit`` with ``AlignTask`` (CLIP
loss) on a small CLIP-tower ``DualEncoder`` and an in-memory dataset of 1024 random image-text
pairs, one optimiser step (``max_steps=1``) over a batch of all 1024.

* **cache**: ``TrainConfig(accumulate=16, grad_cache=True)``: 16 micro-batches of 64 are embedded
  without a graph, the loss is computed on the whole 1024 x 1024 similarity matrix, then each
  micro-batch is re-embedded with a graph and back-propagated with its cached embedding gradients.
* **plain**: ``TrainConfig(accumulate=1)``: one forward and one backward of all 1024 pairs.

Each measurement runs in a fresh process (the script re-invokes itself with ``--mode``), so one
mode's allocations cannot hide in the other's peak:

* **RSS**: ``resource.getrusage(...).ru_maxrss`` after the step, minus the resident set
  measured after model creation, data preparation and engine construction (the increment is
  what the step costs; the absolute peak is reported too).
* **torch allocator**: the largest "Total Allocated" the PyTorch profiler (``profile_memory``)
  reports during ``fit``, i.e. bytes of tensors alive at once that were allocated during the step.

The point of GradCache is that the step is the same: both modes' gradients (captured by an
optimiser pre-step hook in the profiled run) and updated weights (from the RSS run) are
compared. Both towers are CLIP towers, which have no dropout, so the two modes see identical
computations up to floating-point summation order. Both precisions run by default: fp32
(``32-true``), where the two steps must agree to rounding, and ``bf16-mixed``, the engine's default.

    python benchmarks/bench_gradcache_memory.py [--precision 32-true bf16-mixed] [--write]

``--write`` saves ``benchmarks/results/bench_gradcache_memory.json`` and rewrites its block of
BENCHMARKS.md from it (``blocks()``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import benchlib
from benchlib import machine

PROTOCOL = """\
Peak memory of one optimisation step with a contrastive batch of 1024 image-text pairs, through
`Engine.fit` and `AlignTask` (CLIP loss): with the embedding cache (GradCache, `accumulate=16`,
micro-batches of 64, every negative of the 1024 still in the loss) and with plain backpropagation
of all 1024 at once (`accumulate=1`). Each mode runs in a fresh process; the increment is the
peak resident set during the step minus the resident set after model, data and engine were set
up. The torch column is the largest amount of tensor memory the PyTorch profiler saw allocated at
once during the step. Both modes must yield the same gradients and weights."""

N_PAIRS, MICRO_BATCH = 1024, 64
IMAGE_SIZE, TEXT_LENGTH, EMBED_DIM = 64, 32, 128
VISION = {
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "patch_size": 16,
}
# MiniLM's tokenizer ids ([PAD] 0, [CLS] 101, [SEP] 102), medalign's default for random text towers
PAD, BOS, EOS, VOCAB = 0, 101, 102, 30522
TEXT = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": TEXT_LENGTH,
    "vocab_size": VOCAB,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
}
LR = 1e-4


# --------------------------------------------------------------------------- one mode (child process)
class PairData(torch.utils.data.Dataset):
    """1024 random image-text pairs held in memory; the engine's sampler passes (index, seed)."""

    def __init__(self, n: int = N_PAIRS) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        self.ids = torch.randint(1000, VOCAB, (n, TEXT_LENGTH), generator=g)
        self.mask = torch.ones_like(self.ids)
        for row, length in enumerate(torch.randint(8, TEXT_LENGTH + 1, (n,), generator=g).tolist()):
            self.ids[row, 0], self.ids[row, length - 1] = BOS, EOS
            self.ids[row, length:], self.mask[row, length:] = PAD, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Any) -> dict[str, torch.Tensor]:
        index = key[0] if isinstance(key, tuple) else key
        return {"image": self.images[index], "input_ids": self.ids[index], "attention_mask": self.mask[index]}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def current_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def torch_peak_from_trace(path: Path) -> int:
    """Largest "Total Allocated" among the profiler's memory events (bytes allocated since it started)."""
    events = json.loads(path.read_text(encoding="utf-8"))["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def run_mode(mode: str, measure: str, precision: str, out: Path) -> dict[str, Any]:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from medalign.config import LossConfig, OptimConfig, TrainConfig
    from medalign.engine import Engine
    from medalign.models import TowerConfig, create_model
    from medalign.tasks.align import AlignTask

    torch.manual_seed(0)
    model = create_model(
        "align_clip_b16",
        vision=TowerConfig("clip_vision", config=VISION),
        text=TowerConfig("clip_text", config=TEXT),
        embed_dim=EMBED_DIM,
        image_size=IMAGE_SIZE,
        max_text_length=TEXT_LENGTH,
    )
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()} if measure == "rss" else {}
    task = AlignTask(model, LossConfig(kind="clip"))
    data = PairData()
    train = TrainConfig(
        epochs=1,
        max_steps=1,
        accumulate=N_PAIRS // MICRO_BATCH if mode == "cache" else 1,
        grad_cache=mode == "cache",
        precision=precision,
        accelerator="cpu",
        progress=False,
        checkpoint_every=10**6,
        log_every=1,
        seed=0,
    )
    run_dir = Path(tempfile.mkdtemp(prefix=f"medalign-gradcache-{mode}-"))
    engine = Engine(train, OptimConfig(lr=LR, schedule="constant"), run_dir)

    grads: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    if measure == "torch":

        def capture(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[names[id(p)]] = p.grad.detach().clone()

        register_optimizer_step_pre_hook(capture)

    gc.collect()
    baseline, peak_before = current_rss(), peak_rss()
    start = time.perf_counter()
    if measure == "torch":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            state = engine.fit(task, data, collate, batch_size=N_PAIRS)
        seconds = time.perf_counter() - start
        trace = run_dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        result = {
            "torch_peak": torch_peak_from_trace(trace),
            "trained": sum(g.numel() for g in grads.values()),
        }
        torch.save(grads, out)
    else:
        state = engine.fit(task, data, collate, batch_size=N_PAIRS)
        seconds = time.perf_counter() - start
        result = {"baseline": baseline, "peak": peak_rss(), "peak_before": peak_before}
        after = model.state_dict()
        torch.save({k: after[k] - initial[k] for k in initial if after[k].is_floating_point()}, out)
    result |= {"seconds": seconds, "loss": state.history[-1]["loss"], "steps": state.step}
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- driver
def child(mode: str, measure: str, precision: str, out: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--mode", mode, "--measure", measure]
    command += ["--precision", precision, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode}/{measure} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def negligible(grads: dict[str, torch.Tensor]) -> set[str]:
    """Tensors whose gradient is zero in exact arithmetic and rounding noise in practice.

    Attention key biases are the case here (softmax ignores a shift shared by all keys): their
    gradients are ~1e-11, and any two summation orders differ by 100% of that. Threshold: a norm
    below 1e-6 of the norm of all gradients.
    """
    norms = {k: float(v.double().norm()) for k, v in grads.items()}
    total = sum(n**2 for n in norms.values()) ** 0.5
    return {k for k, n in norms.items() if n < 1e-6 * total}


def relative_difference(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: set[str]
) -> tuple[float, float]:
    """``||a - b|| / ||b||`` over all tensors, and the worst per-tensor ratio outside ``skip``."""
    keys = sorted(b)
    if sorted(a) != keys:
        raise AssertionError(f"different tensors: {sorted(set(a) ^ set(b))[:5]}")
    diffs = {k: float((a[k].double() - b[k].double()).norm()) for k in keys}
    norms = {k: float(b[k].double().norm()) for k in keys}
    overall = sum(d**2 for d in diffs.values()) ** 0.5 / sum(n**2 for n in norms.values()) ** 0.5
    return overall, max(diffs[k] / norms[k] for k in keys if k not in skip and norms[k] > 0)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def measure_precision(precision: str, tmp: Path) -> dict[str, Any]:
    """Four fresh processes (plain/cache x RSS/profiler): what each measured, and how far the two
    steps' gradients and updates differ."""
    runs: dict[str, dict[str, Any]] = {}
    for measure in ("rss", "torch"):
        for mode in ("plain", "cache"):
            runs[f"{mode}/{measure}"] = r = child(mode, measure, precision, tmp / f"{precision}-{mode}-{measure}.pt")
            print(f"{precision} {mode} ({measure}): " + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)

    def load(mode: str, measure: str) -> dict[str, torch.Tensor]:
        return torch.load(tmp / f"{precision}-{mode}-{measure}.pt", weights_only=True)

    skip = negligible(load("plain", "torch"))
    grad_rel, grad_worst = relative_difference(load("cache", "torch"), load("plain", "torch"), skip)
    update_rel, update_worst = relative_difference(load("cache", "rss"), load("plain", "rss"), skip)
    tolerance = 1e-3 if precision == "32-true" else 5e-2
    return {
        "runs": runs,
        "gradient_difference": grad_rel,
        "gradient_worst_tensor": grad_worst,
        "update_difference": update_rel,
        "update_worst_tensor": update_worst,
        "skipped": sorted({".".join(k.split(".")[-2:]) for k in skip}),
        "n_skipped": len(skip),
        "same_step": grad_rel < tolerance and update_rel < tolerance,
    }


def render(results: dict[str, Any]) -> str:
    labels = {
        "plain": f"plain backprop, 1 x {N_PAIRS}",
        "cache": f"embedding cache, {N_PAIRS // MICRO_BATCH} x {MICRO_BATCH}",
    }
    rows, summaries, trained = [], [], 0
    for precision, r in results["precisions"].items():
        runs = r["runs"]
        increment = {m: runs[f"{m}/rss"]["peak"] - runs[f"{m}/rss"]["baseline"] for m in labels}
        ratio = increment["cache"] / increment["plain"]
        torch_ratio = runs["cache/torch"]["torch_peak"] / runs["plain/torch"]["torch_peak"]
        trained = runs["plain/torch"]["trained"]
        rows += [
            f"| {precision} | {labels[m]} | {mib(runs[f'{m}/rss']['baseline'])} | {mib(runs[f'{m}/rss']['peak'])} "
            f"| {mib(increment[m])} | {mib(runs[f'{m}/torch']['torch_peak'])} | {runs[f'{m}/rss']['seconds']:.1f} "
            f"| {runs[f'{m}/rss']['loss']:.4f} |"
            for m in labels
        ]
        summaries.append(
            f"- {precision}: cache ÷ plain = **{ratio:.3f}** of the peak-RSS increment ({1 / ratio:.1f}x less) "
            f"and {torch_ratio:.3f} of the torch peak. Gradients differ by {r['gradient_difference']:.1e}, weight "
            f"updates by {r['update_difference']:.1e} (relative L2 over all parameters; worst single tensor "
            f"{r['gradient_worst_tensor']:.1e} and {r['update_worst_tensor']:.1e}, leaving out the {r['n_skipped']} "
            f"gradients that are zero up to rounding: {', '.join(r['skipped'])})."
        )
    return "\n".join(
        [
            f"{N_PAIRS} pairs, one optimiser step; CLIP towers (vision 192 wide x 4 layers at {IMAGE_SIZE} px, "
            f"text 128 wide x 4 layers, {TEXT_LENGTH} tokens), {trained / 1e6:.1f}M trained parameters. "
            f"Memory in MiB; step s is the wall time of `fit` (shared machine). Machine: {results['machine']}.",
            "",
            "| precision | mode | RSS after setup | peak RSS | step increment | torch peak | step s | loss |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *summaries,
        ]
    )


def blocks() -> dict[str, str]:
    return benchlib.rendered({"bench_gradcache_memory": render})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--precision", nargs="+", default=["32-true", "bf16-mixed"], choices=["32-true", "bf16-mixed"]
    )
    parser.add_argument("--mode", choices=["cache", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["rss", "torch"], default="rss", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.measure, args.precision[0], args.out)), flush=True)
        return

    tmp = Path(tempfile.mkdtemp(prefix="medalign-gradcache-"))
    results = {
        "precisions": {precision: measure_precision(precision, tmp) for precision in args.precision},
        "machine": machine(),
    }
    shutil.rmtree(tmp, ignore_errors=True)
    if not all(r["same_step"] for r in results["precisions"].values()):
        raise SystemExit("the cache and plain steps differ beyond tolerance")
    if args.write:
        heading = f"## Embedding cache memory (`benchmarks/bench_gradcache_memory.py`)\n\n{PROTOCOL}"
        print(benchlib.publish("bench_gradcache_memory", results, render, heading))
    else:
        print(render(json.loads(json.dumps(results))))

if __name__ == "__main__":
    main()
