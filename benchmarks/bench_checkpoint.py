"""What a crash-safe checkpoint costs: ``medalign.engine.write_checkpoint`` against a plain save.

``write_checkpoint`` streams ``torch.save`` through a Python file object (to keep the OS's
reason when a write fails), fsyncs the file, renames it and fsyncs the folder. The reference
is what the engine did before: ``torch.save`` to a temporary path (torch's own C++ writer),
then ``os.replace``, no fsync. Payloads of float32 tensors stand for model + optimiser states;
rounds alternate between the two writers (order reversed every other round), median reported.

    python benchmarks/bench_checkpoint.py [--sizes 64,256] [--rounds 5] [--folder DIR] [--write]

``--write`` replaces the section between the bench_checkpoint markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import benchlib
from medalign.engine import write_checkpoint


def plain_save(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def time_writers(mib: int, rounds: int, folder: Path) -> dict[str, list[float]]:
    payload = {"model": {f"w{i}": torch.randn(256, 1024) for i in range(mib)}}  # 1 MiB each
    writers: dict[str, Callable[[Path, dict], None]] = {
        "torch.save(path) + os.replace (before)": plain_save,
        "write_checkpoint (fsync file and folder)": write_checkpoint,
    }
    times: dict[str, list[float]] = {name: [] for name in writers}
    for round_ in range(rounds):
        order = list(writers) if round_ % 2 == 0 else list(reversed(writers))
        for name in order:
            start = time.perf_counter()
            writers[name](folder / f"{mib}.ckpt", payload)
            times[name].append(time.perf_counter() - start)
    return times


def render(results: dict[str, Any]) -> str:
    rows = []
    for mib, times in results["seconds"].items():
        medians = {name: statistics.median(t) for name, t in times.items()}
        reference = next(iter(medians.values()))
        for name, t in times.items():
            rows.append(
                f"| {mib} MiB | {name} | {medians[name]:.2f} | {min(t):.2f}–{max(t):.2f} "
                f"| {medians[name] / reference:.2f} |"
            )
    return "\n".join(
        [
            f"float32 payloads, {results['rounds']} alternating rounds (median), written to {results['folder']} "
            f"(local disk). Machine: {results['machine']}.",
            "",
            "| payload | writer | seconds | range | ÷ before |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )


def blocks() -> dict[str, str]:
    return benchlib.rendered({"bench_checkpoint": render})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256", help="comma-separated payload sizes in MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=benchlib.RUNS / "checkpoint")
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    results = {
        "seconds": {str(mib): time_writers(mib, args.rounds, args.folder) for mib in (int(s) for s in args.sizes.split(","))},
        "rounds": args.rounds,
        "folder": str(args.folder),
        "machine": benchlib.machine(" shared with other jobs"),
    }
    if args.write:
        heading = f"## Crash-safe checkpoint writes (`benchmarks/bench_checkpoint.py`)\n\n{__doc__.split(chr(10) * 2)[1]}"
        print(benchlib.publish("bench_checkpoint", results, render, heading))
    else:
        print(render(results))


if __name__ == "__main__":
    main()
