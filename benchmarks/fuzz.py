"""Time-boxed mutation fuzzer over the readers, manifest parsing and importers.

    python benchmarks/fuzz.py --seconds 600 [--out /tmp/medalign-bench/fuzz] [--targets read_image:png,...]
                              [--seed 0] [--memory-gb 4] [--write]

Each target (``medalign.data.fuzzing.TARGETS``: one per image format, per manifest format and
the sidecar, and five importers) gets a small valid case in ``<out>/work/<target>/``; every
iteration replaces one file of it by a mutation of a seed (bit flips, interesting integers in
header fields, truncation, splices with other formats, wrong-typed JSON nodes) and runs the
public entry point. The contract is ``medalign.data.fuzzing.run_case``'s: a result, or the
target's own error naming the file. Anything else is a crash, saved with its traceback under
``<out>/crashes/<target>/`` (first three inputs per distinct signature) so that
``python benchmarks/fuzz.py --replay <file> --targets <target>`` reproduces it.

Time is shared fairly: the target that has used the least time goes next, so slow targets
(xlsx, parquet) get as many seconds as fast ones, not as many inputs. Inputs that still parse
join the target's corpus (up to 64), which lets mutations stack past the first header check.
One core, one process; the address space is capped (``--memory-gb``) so that a size field
turned into terabytes raises ``MemoryError`` here (a crash) instead of swapping the machine.
``--write`` puts the table into the Fuzzing section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from benchlib import RUNS, machine
from medalign.data.fuzzing import TARGETS, Target, mutate, run_case

CORPUS_LIMIT = 64
REPRODUCERS_PER_SIGNATURE = 3


@dataclass
class Stats:
    """Per-target counters; ``crashes`` maps a signature to how many inputs hit it."""

    inputs: int = 0
    ok: int = 0
    expected: int = 0
    seconds: float = 0.0
    crashes: dict[str, int] = field(default_factory=dict)


def _save_crash(out: Path, target: Target, file: Path, data: bytes, signature: str, detail: str) -> Path:
    digest = hashlib.sha1(signature.encode()).hexdigest()[:10]
    folder = out / "crashes" / target.name.replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    count = len(list(folder.glob(f"{digest}-*{file.suffix}")))
    path = folder / f"{digest}-{count}{file.suffix}"
    path.write_bytes(data)
    path.with_name(path.name + ".txt").write_text(
        f"{target.name}\n{signature}\n\n{detail}\n", encoding="utf-8"
    )
    return path


def fuzz(names: list[str], seconds: float, out: Path, seed: int, timeout: float) -> dict[str, Stats]:
    rng = random.Random(seed)
    targets = [TARGETS[n] for n in names]
    files, corpora, n_seeds = {}, {}, {}
    pool = [s for t in targets for s in t.seeds()]  # splice partners across formats
    for target in targets:
        folder = out / "work" / target.name.replace(":", "_")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        files[target.name] = target.setup(folder)
        corpora[target.name] = list(target.seeds())
        n_seeds[target.name] = len(corpora[target.name])  # seeds stay; only grown entries are replaced
    stats = {t.name: Stats() for t in targets}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        target = min(targets, key=lambda t: stats[t.name].seconds)
        record, corpus = stats[target.name], corpora[target.name]
        data = mutate(rng.choice(corpus), rng, pool)
        start = time.perf_counter()
        outcome = run_case(target, files[target.name], data, timeout=timeout)
        record.seconds += time.perf_counter() - start
        record.inputs += 1
        if outcome.status == "ok":
            record.ok += 1
            if len(corpus) < CORPUS_LIMIT:
                corpus.append(data)
            else:
                corpus[rng.randrange(n_seeds[target.name], CORPUS_LIMIT)] = data
        elif outcome.status == "expected":
            record.expected += 1
        else:
            hits = record.crashes.get(outcome.signature, 0)
            record.crashes[outcome.signature] = hits + 1
            if hits < REPRODUCERS_PER_SIGNATURE:
                path = _save_crash(out, target, files[target.name], data, outcome.signature, outcome.detail)
                print(f"CRASH {target.name}: {outcome.signature} -> {path}", flush=True)
    return stats


def replay(file: Path, name: str, out: Path) -> None:
    """Run one saved input through its target and print what happens (with the full traceback)."""
    target = TARGETS[name]
    folder = out / "replay"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    outcome = run_case(target, target.setup(folder), file.read_bytes())
    print(outcome.status, outcome.signature, outcome.detail, sep="\n")


def render(results: dict[str, Any]) -> str:
    targets = results["targets"]
    total = sum(t["inputs"] for t in targets.values())
    lines = [
        f"{results['seconds']:.0f} s on one core, seed {results['seed']}, {total} inputs over {len(targets)} targets. "
        f"Machine: {results['machine']}.",
        "",
        "| target | inputs | result | expected error | crashes (distinct) |",
        "|---|---|---|---|---|",
    ]
    for name, t in targets.items():
        crashes = sum(t["crashes"].values())
        lines.append(f"| {name} | {t['inputs']} | {t['ok']} | {t['expected']} | {crashes} ({len(t['crashes'])}) |")
    return "\n".join(lines)


def blocks() -> dict[str, str]:
    return benchlib.rendered({"fuzz": render})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=RUNS / "fuzz")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="seconds per input before it counts as a hang"
    )
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--replay", type=Path, help="run one saved input (with --targets <its target>)")
    parser.add_argument("--write", action="store_true", help="save benchmarks/results/fuzz.json and rewrite its block")
    args = parser.parse_args()
    names = args.targets.split(",")
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        sys.exit(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    warnings.simplefilter("ignore")  # decoders warn on most mutated inputs; the outcome is what counts
    logging.disable(logging.CRITICAL)  # tifffile logs every bad tag
    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if args.replay:
        replay(args.replay, names[0], args.out)
        return
    stats = fuzz(names, args.seconds, args.out, args.seed, args.timeout)
    summary = {n: {**vars(s), "crashes": s.crashes} for n, s in stats.items()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    results = {"seconds": args.seconds, "seed": args.seed, "targets": summary, "machine": machine()}
    if args.write:
        print(benchlib.publish("fuzz", results, render, "## Fuzzing (`benchmarks/fuzz.py`)"))
    else:
        print(render(json.loads(json.dumps(results))))


if __name__ == "__main__":
    main()
