"""What ``medalign quickstart`` costs and prints: wall time, output size and every number, per seed.

    python benchmarks/bench_quickstart.py [--seeds 0,1,2] [--n 480] [--steps N] [--out DIR]
    python benchmarks/bench_quickstart.py --render     # rewrite the README blocks from the results file

Each seed runs the command a newcomer runs (``medalign quickstart --seed S --out DIR/seedS``) in a
fresh process with its output piped (so, as in a log, no progress bars), and records:

* the wall time of the whole command and of each step (the ``(step: N s)`` lines it prints);
* what it leaves on disk (``du --apparent-size`` of the output folder, files by kind, and that no
  optimiser checkpoint is left: ``--keep-checkpoints`` is off);
* the 1-minute load average every 5 s while it ran, and the machine's core count (a timing is only
  comparable on a quiet machine: the load says whether it was);
* every line it printed (all of its numbers), so the README shows what the run printed, merged over
  seeds as mean ± std where a number differs between seeds.

Results: ``benchmarks/results/bench_quickstart.json``; README blocks ``quickstart_numbers`` (the
printed results) and ``quickstart_cost`` (time, size, load). ``--steps N`` caps every training
stage (a smoke run; its results file says so and must not be committed as the measurement).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import benchlib

NAME = "bench_quickstart"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
STEP_LINE = re.compile(r"^== (\S+)$")
STEP_TIME = re.compile(r"^\((\S+): (\d+) s\)$")
SETUP_STEPS = ("phantom", "validate", "summary")  # data steps: their numbers are counts, not results
NOT_RESULTS = ("trained ", "Using ", "Seed set", "INFO", "wrote ", "(", "quickstart finished")


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``every`` seconds until stopped."""

    def __init__(self, every: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self._done = every, [os.getloadavg()[0]], threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> list[float]:
        self._done.set()
        self.join()
        return self.samples


def disk_usage(folder: Path) -> dict[str, Any]:
    """Apparent size in MB, in all and by kind (bundle weights, checkpoints, logs, the phantom, other)."""
    kinds = {"model weights": 0, "checkpoints": 0, "tensorboard": 0, "phantom data": 0, "other": 0}
    files = 0
    for path in folder.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        files += 1
        size = path.stat().st_size
        parts = path.relative_to(folder).parts
        if path.suffix == ".ckpt":
            kinds["checkpoints"] += size
        elif path.name == "model.safetensors":
            kinds["model weights"] += size
        elif "tb" in parts:
            kinds["tensorboard"] += size
        elif parts[0] == "phantom":
            kinds["phantom data"] += size
        else:
            kinds["other"] += size
    total = sum(kinds.values())
    return {"megabytes": round(total / 1e6, 1), "files": files, "by_kind_mb": {k: round(v / 1e6, 1) for k, v in kinds.items()}}


def run_once(seed: int, n: int, steps: int | None, out: Path) -> dict[str, Any]:
    """One ``medalign quickstart`` in a fresh process: wall time, step times, load, size, output."""
    command = [sys.executable, "-m", "medalign.cli", "quickstart", "--out", str(out), "--seed", str(seed), "--n", str(n)]
    if steps:
        command += ["--steps", str(steps)]
    sampler = LoadSampler()
    sampler.start()
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    load = sampler.stop()
    if process.returncode:
        raise RuntimeError(f"quickstart seed {seed} failed ({process.returncode}):\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    lines = [line.rstrip() for line in process.stdout.splitlines() if line.strip()]
    step_seconds = {m.group(1): int(m.group(2)) for m in map(STEP_TIME.match, lines) if m}
    return {
        "seed": seed,
        "wall_seconds": round(wall, 1),
        "step_seconds": step_seconds,
        "disk": disk_usage(out),
        "load_average_1min": {"before": load[0], "mean": round(statistics.fmean(load), 2), "max": max(load)},
        "carriage_returns_in_output": process.stdout.count("\r") + process.stderr.count("\r"),
        "lines": lines,
    }


def measure(seeds: list[int], n: int, steps: int | None, out: Path) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        print(f"quickstart seed {seed} -> {out / f'seed{seed}'}", flush=True)
        runs.append(run_once(seed, n, steps, out / f"seed{seed}"))
        print(f"  {runs[-1]['wall_seconds'] / 60:.1f} min, {runs[-1]['disk']['megabytes']} MB", flush=True)
    return {
        "machine": benchlib.machine(cores=f", OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"),
        "protocol": (
            f"`medalign quickstart --n {n} --seed S`{f' --steps {steps}' if steps else ''} for seeds "
            f"{', '.join(map(str, seeds))}, one after another, each in a fresh process with stdout piped "
            "(as a CI log); wall time of the whole command; size = apparent size of its output folder; "
            "load = the 1-minute load average sampled every 5 s while it ran (a quiet machine reads < 0.5 "
            "before it starts)."
        ),
        "command": "python benchmarks/bench_quickstart.py " + " ".join(sys.argv[1:]),
        "n": n,
        "steps": steps,
        "runs": runs,
    }


# -- rendering ------------------------------------------------------------------------------------------


def result_lines(lines: list[str]) -> list[tuple[str, str]]:
    """(step, line) for every printed line of a training step that carries a number."""
    step, kept = "", []
    for line in lines:
        match = STEP_LINE.match(line)
        if match:
            step = match.group(1)
            continue
        if not step or step in SETUP_STEPS or line.startswith(NOT_RESULTS):
            continue
        if NUMBER.search(line) or line.startswith("|"):  # a result, or a row (header) of a printed table
            kept.append((step, line))
    return kept


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def merge_lines(per_seed: list[list[str]]) -> str:
    """Lines of the same shape from several seeds -> one line, differing numbers as mean ± std."""
    first = per_seed[0]
    template = NUMBER.sub("{}", first)
    if any(NUMBER.sub("{}", line) != template for line in per_seed[1:]) or len(per_seed) == 1:
        return first
    columns = list(zip(*(NUMBER.findall(line) for line in per_seed), strict=True))
    cells = []
    for texts in columns:
        values = [float(t) for t in texts]
        if len(set(values)) == 1:
            cells.append(texts[0])
            continue
        digits = max(_decimals(t) for t in texts)
        cells.append(f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}")
    pieces, last = [], 0
    for match, cell in zip(NUMBER.finditer(first), cells, strict=True):
        pieces += [first[last : match.start()], cell]
        last = match.end()
    return "".join(pieces) + first[last:]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _spread(values: list[float], fmt: Any) -> str:
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.fmean(values))} ± {fmt(statistics.stdev(values))}"


def blocks() -> dict[str, str]:
    results = benchlib.load_results(NAME)
    runs = results["runs"]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    over = f"seeds {seeds}: mean ± std where they differ" if len(runs) > 1 else f"one seed, {seeds}"
    lines = [result_lines(r["lines"]) for r in runs]
    rows, step = [], ""
    for index, (name, _) in enumerate(lines[0]):
        if name != step:
            rows.append(f"== {name}")
            step = name
        rows.append(merge_lines([seed_lines[index][1] for seed_lines in lines if index < len(seed_lines)]))
    numbers = (
        f"What `medalign quickstart` printed ({over}; {results['machine']}):\n\n```text\n" + "\n".join(rows) + "\n```"
    )
    wall = [r["wall_seconds"] for r in runs]
    size = [r["disk"]["megabytes"] for r in runs]
    kinds = runs[0]["disk"]["by_kind_mb"]
    step_names = list(runs[0]["step_seconds"])
    steps = ", ".join(
        f"{s} {_spread([r['step_seconds'][s] for r in runs], lambda v: f'{v:.0f} s')}" for s in step_names
    )
    load = [r["load_average_1min"] for r in runs]
    cost = "\n".join(
        [
            "| | measured |",
            "|---|---|",
            f"| wall time | {_spread(wall, _minutes)} ({over}) |",
            f"| per step | {steps} |",
            f"| written | {_spread(size, lambda v: f'{v:.0f} MB')} in {runs[0]['disk']['files']} files: "
            + ", ".join(f"{k} {v:.0f} MB" for k, v in kinds.items() if v >= 0.5)
            + " |",
            f"| machine | {results['machine']}; 1-min load average before {max(x['before'] for x in load):.2f}, "
            f"while running {statistics.fmean(x['mean'] for x in load):.2f} (max {max(x['max'] for x in load):.2f}) |",
            f"| protocol | {results['protocol']} `{results['command']}` |",
        ]
    )
    return {"quickstart_numbers": numbers, "quickstart_cost": cost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, run one after another")
    parser.add_argument("--n", type=int, default=480, help="phantom cases (the quickstart's default)")
    parser.add_argument("--steps", type=int, default=None, help="cap every training stage (smoke run only)")
    parser.add_argument("--out", type=Path, default=benchlib.RUNS / "quickstart", help="where the runs write")
    parser.add_argument("--render", action="store_true", help="only rewrite the README blocks from the results file")
    args = parser.parse_args()
    if not args.render:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        print(benchlib.save_results(NAME, measure(seeds, args.n, args.steps, args.out)))
    benchlib.write_blocks(blocks())


if __name__ == "__main__":
    main()
