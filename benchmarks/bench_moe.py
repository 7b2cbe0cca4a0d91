"""MoE layer: tokens/s and expert load balance against a dense feed-forward layer of equal active parameters.

Two questions about ``medalign.models.moe.MoEFeedForward`` (the feed-forward of the fusion
block's ``MoECrossAttention``):

* **speed**: forward + backward tokens/s of ``MoEFeedForward(256, 512, num_experts=8, k=2)``
  against ``DenseFeedForward(256, 1024)``, which has the same parameters per token (two
  experts of 512 hidden units each vs one layer of 1024; the MoE adds a 256 x 8 router and
  holds 4x the parameters in total). 32 sequences of 64 tokens, a loss of ``mean(y^2)`` (plus
  the balance loss for the MoE), no optimiser step. fp32 and CPU bf16 autocast. After warm-up,
  rounds of ``--steps`` steps alternate between the four setups (order reversed every other
  round); the median of the rounds is reported.
* **load balance**: the same layer trained for ``--train-steps`` Adam steps on a toy task
  whose tokens come from 16 clusters, each with its own target map (``y = tanh(W_c x)``), so
  sending a cluster to the right experts pays. Trained with and without the balance loss
  (weight 0.01, the Switch Transformer's), then measured on held-out tokens: the fraction of
  slots each expert is assigned (min / max / coefficient of variation; 1/8 = 0.125 is
  perfect), the fraction dropped at capacity factor 1.25, how consistently a cluster's tokens
  pick the same first expert, and the task's mean squared error, next to the dense layer's.

    python benchmarks/bench_moe.py [--rounds 5] [--steps 3] [--train-steps 300] [--threads 1,2] [--write]

``--write`` replaces the section between the bench_moe markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

import benchlib
from medalign.models.moe import DenseFeedForward, MoEFeedForward

PROTOCOL = """\
MoE layer: tokens/s and expert load balance against a dense feed-forward layer of equal active
parameters. `MoEFeedForward(256, 512, num_experts=8, k=2, capacity_factor=1.25)` vs
`DenseFeedForward(256, 1024)` (the same parameters per token). Speed: forward + backward of
32 x 64 tokens, fp32 and CPU bf16 autocast, rounds alternating between the setups, median.
Load balance: each layer trained with Adam on a toy regression whose tokens come from 16
clusters with their own target maps, with and without the balance loss (weight 0.01), measured
on held-out tokens."""

DIM, EXPERTS, K, EXPERT_HIDDEN, CAPACITY = 256, 8, 2, 512, 1.25
BATCH, LENGTH = 32, 64
CLUSTERS, BALANCE_WEIGHT = 16, 0.01


def build_moe(seed: int = 0) -> MoEFeedForward:
    torch.manual_seed(seed)
    return MoEFeedForward(DIM, EXPERT_HIDDEN, num_experts=EXPERTS, k=K, capacity_factor=CAPACITY)


def build_dense(seed: int = 0) -> DenseFeedForward:
    torch.manual_seed(seed)
    return DenseFeedForward(DIM, K * EXPERT_HIDDEN)


def active_parameters(layer: nn.Module) -> int:
    """Parameters one token passes through: the router and k experts for the MoE, all of a dense layer."""
    if isinstance(layer, MoEFeedForward):
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        return layer.router.weight.numel() + layer.k * per_expert
    return sum(p.numel() for p in layer.parameters())


# --------------------------------------------------------------------------- speed
def make_step(layer: nn.Module, x: Tensor, bf16: bool) -> Callable[[], None]:
    def step() -> None:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with context:
            y, aux = layer(x)
        loss = y.float().pow(2).mean() + BALANCE_WEIGHT * aux["balance_loss"]
        loss.backward()
        for p in layer.parameters():
            p.grad = None

    return step


def time_setups(rounds: int, steps: int, warmup: int, threads: int) -> dict[str, list[float]]:
    """tokens/s per round for the four setups, with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    x = torch.randn(BATCH, LENGTH, DIM, generator=torch.Generator().manual_seed(0))
    moe, dense = build_moe(), build_dense()
    setups = {
        "MoE, fp32": make_step(moe, x, bf16=False),
        "dense, fp32": make_step(dense, x, bf16=False),
        "MoE, bf16 autocast": make_step(moe, x, bf16=True),
        "dense, bf16 autocast": make_step(dense, x, bf16=True),
    }
    for step in setups.values():
        for _ in range(warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in setups}
    tokens = BATCH * LENGTH
    for r in range(rounds):
        for name in list(setups) if r % 2 == 0 else list(reversed(setups)):
            start = time.perf_counter()
            for _ in range(steps):
                setups[name]()
            rates[name].append(steps * tokens / (time.perf_counter() - start))
            print(f"{threads} threads, round {r + 1}: {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    return rates


# --------------------------------------------------------------------------- load balance
class ClusterTask:
    """Tokens ``x = c + 0.5 n`` around 16 random centres, targets ``tanh(W_c x)`` per cluster."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(CLUSTERS, DIM, generator=g)
        self.maps = torch.randn(CLUSTERS, DIM, DIM, generator=g) / DIM**0.5
        self.generator = g

    def batch(self, tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        cluster = torch.randint(CLUSTERS, (tokens,), generator=self.generator)
        x = self.centres[cluster] + 0.5 * torch.randn(tokens, DIM, generator=self.generator)
        y = torch.empty_like(x)
        for c in range(CLUSTERS):
            rows = cluster == c
            y[rows] = torch.tanh(x[rows] @ self.maps[c].T)
        return x[None], y[None], cluster


def train(layer: nn.Module, task: ClusterTask, steps: int, balance_weight: float) -> None:
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    for _ in range(steps):
        x, y, _ = task.batch(BATCH * LENGTH // 2)
        out, aux = layer(x)
        loss = (out - y).pow(2).mean() + balance_weight * aux["balance_loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def measure(layer: nn.Module, x: Tensor, y: Tensor, cluster: Tensor) -> dict[str, float]:
    out, aux = layer(x)
    result = {"mse": float((out - y).pow(2).mean())}
    if isinstance(layer, MoEFeedForward):
        load = aux["load"]
        first = layer.router(x[0]).argmax(dim=-1)
        counts = torch.zeros(CLUSTERS, EXPERTS).index_put_(
            (cluster, first), torch.ones(len(first)), accumulate=True
        )
        result |= {
            "load_min": float(load.min()),
            "load_max": float(load.max()),
            "load_cv": float(load.std(unbiased=False) / load.mean()),
            "dropped": float(aux["dropped"]),
            "consistency": float(counts.max(dim=1).values.sum() / counts.sum()),
            "balance_loss": float(aux["balance_loss"]),
        }
    return result


def load_balance(train_steps: int) -> dict[str, dict[str, float]]:
    held_out = ClusterTask(seed=1)
    held_out.generator.manual_seed(123)
    x, y, cluster = held_out.batch(4096)
    results = {}
    for name, build, weight in (
        ("MoE, balance loss 0.01", build_moe, BALANCE_WEIGHT),
        ("MoE, no balance loss", build_moe, 0.0),
        ("dense (reference)", build_dense, 0.0),
    ):
        layer = build(seed=0)
        before = measure(layer, x, y, cluster)
        start = time.perf_counter()
        train(layer, ClusterTask(seed=1), train_steps, weight)
        results[name] = {**measure(layer, x, y, cluster), "mse_before": before["mse"]}
        results[name]["seconds"] = time.perf_counter() - start
        print(f"{name}: {results[name]}", flush=True)
        results[name + " (init)"] = before
    return results


# --------------------------------------------------------------------------- report
def machine() -> str:
    return benchlib.machine(
        f" shared with other jobs (CPU capability {torch.backends.cpu.get_cpu_capability()})"
    )


def render(results: dict[str, Any]) -> str:
    speed_rows = []
    for threads, per_setup in results["rates"].items():
        medians = {name: statistics.median(r) for name, r in per_setup.items()}
        for name, r in per_setup.items():
            ref = medians[f"dense, {name.split(', ')[1]}"]
            speed_rows.append(
                f"| {name} | {threads} | {medians[name]:,.0f} | {min(r):,.0f}–{max(r):,.0f} | {medians[name] / ref:.2f} |"
            )
    balance, balance_rows = results["balance"], []
    for name in ("MoE, balance loss 0.01", "MoE, no balance loss", "dense (reference)"):
        m = balance[name]
        if "load_min" in m:
            init = balance[name + " (init)"]
            balance_rows.append(
                f"| {name} | {m['load_min']:.3f} / {m['load_max']:.3f} | {m['load_cv']:.2f} "
                f"(init {init['load_cv']:.2f}) | {m['dropped']:.3f} | {m['consistency']:.2f} "
                f"| {m['balance_loss']:.3f} | {m['mse_before']:.3f} → {m['mse']:.3f} |"
            )
        else:
            balance_rows.append(f"| {name} | – | – | – | – | – | {m['mse_before']:.3f} → {m['mse']:.3f} |")
    first_threads = int(next(iter(results["rates"])))
    return "\n".join(
        [
            f"{DIM}-d tokens, {EXPERTS} experts x {EXPERT_HIDDEN} hidden, top-{K}, capacity factor {CAPACITY}; "
            f"active parameters per token: MoE {results['active_moe']:,} (router included), dense "
            f"{results['active_dense']:,}; MoE total {results['total_moe']:,}. Speed: {BATCH} x {LENGTH} tokens, "
            f"forward + backward, {results['warmup']} warm-up steps, {results['rounds']} alternating rounds of "
            f"{results['steps']} steps (median); each row against the dense layer at the same precision and "
            f"threads. Machine: {results['machine']}. Whole run {results['seconds']:.0f} s.",
            "",
            "| layer, precision | torch threads | tokens/s | range | ÷ dense, same precision and threads |",
            "|---|---|---|---|---|",
            *speed_rows,
            "",
            "When the machine's cores are shared with other jobs, the rows with as many torch threads as cores "
            "measure the neighbours too: every parallel op waits at an OpenMP barrier for a thread that may be "
            "descheduled, a fixed cost per op that hits the MoE (router, dispatch and the small expert calls) far "
            "more often than the dense layer's few large matmuls; the 1-thread rows are the layer's own cost.",
            "",
            f"Load balance after {results['train_steps']} Adam steps (lr 1e-3, {BATCH * LENGTH // 2} tokens each, "
            f"{first_threads} torch thread{'s' if first_threads > 1 else ''}) "
            f"on the {CLUSTERS}-cluster task, measured on 4,096 held-out tokens. Load = fraction of routed "
            f"slots assigned to each expert (perfect: {1 / EXPERTS:.3f}); CV = std / mean over experts; "
            f"consistency = share of tokens whose first-choice expert is their cluster's most common one; "
            f"MSE before → after training.",
            "",
            "| layer | load min / max | load CV | dropped | consistency | balance loss | MSE |",
            "|---|---|---|---|---|---|---|",
            *balance_rows,
        ]
    )


def blocks() -> dict[str, str]:
    return benchlib.rendered({"bench_moe": render})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and setup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument(
        "--threads",
        default="1,2",
        help="comma-separated torch thread counts to time; training uses the first",
    )
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    started = time.perf_counter()
    thread_counts = [int(t) for t in args.threads.split(",")]
    rates = {str(t): time_setups(args.rounds, args.steps, args.warmup, t) for t in thread_counts}
    torch.set_num_threads(thread_counts[0])
    balance = load_balance(args.train_steps)
    moe, dense = build_moe(), build_dense()
    results = {
        "rates": rates,
        "balance": balance,
        "active_moe": active_parameters(moe),
        "active_dense": active_parameters(dense),
        "total_moe": sum(p.numel() for p in moe.parameters()),
        "warmup": args.warmup,
        "rounds": args.rounds,
        "steps": args.steps,
        "train_steps": args.train_steps,
        "seconds": time.perf_counter() - started,
        "machine": machine(),
    }
    if args.write:
        print(benchlib.publish("bench_moe", results, render, f"## MoE feed-forward layer (`benchmarks/bench_moe.py`)\n\n{PROTOCOL}"))
    else:
        print(render(json.loads(json.dumps(results, default=float))))


if __name__ == "__main__":
    main()
