"""Run the benchmark suite and rewrite BENCHMARKS.md: every benchmark that fits this machine.

Each entry is one script invocation with ``--write``, so each saves its results file under
``benchmarks/results/`` and rewrites its own block from it (ours vs the reference, measured in the
same run, with the machine and date). ``speed`` benchmarks take
minutes and need no trained models; ``quality`` ones train models on the shared datasets and
take hours on a CPU (run them on purpose: ``--group quality`` or ``--group all``). Benchmarks
whose dataset is missing are skipped and listed as such. A summary (status, seconds) goes to
``benchmarks/results/run_all.json``.

    python benchmarks/run_all.py                 # the speed group
    python benchmarks/run_all.py --list
    python benchmarks/run_all.py --only index --only serve
    python benchmarks/run_all.py --group all --dry-run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass

import benchlib


@dataclass(frozen=True)
class Bench:
    name: str
    args: tuple[str, ...]
    group: str  # "speed" or "quality"
    data: tuple[str, ...] = ()  # shared datasets it reads
    writes: bool = True  # takes --write (rewrites its section); False: it saves results/*.json only

    @property
    def command(self) -> list[str]:
        script = [sys.executable, str(benchlib.REPO / "benchmarks" / self.args[0]), *self.args[1:]]
        return [*script, "--write"] if self.writes else script


SUITE: tuple[Bench, ...] = (
    Bench("data", ("bench_data.py",), "speed", ("kvasir-seg",)),
    Bench("align_step", ("bench_align_step.py",), "speed"),
    Bench("gradcache_memory", ("bench_gradcache_memory.py",), "speed"),
    Bench("segment_step", ("bench_segment.py", "step"), "speed"),
    Bench("sliding", ("bench_segment.py", "sliding"), "speed"),
    Bench("moe", ("bench_moe.py",), "speed"),
    Bench("pretrain_step", ("bench_pretrain.py",), "speed"),
    Bench("zeroshot", ("bench_zeroshot.py",), "speed"),
    Bench("instruct_speed", ("bench_instruct.py", "speed"), "speed"),
    Bench("fuzz", ("fuzz.py", "--seconds", "60"), "speed"),
    Bench("index", ("bench_index.py",), "speed"),
    Bench("serve", ("bench_serve.py",), "speed"),
    Bench("checkpoint", ("bench_checkpoint.py",), "speed"),
    Bench("scaling", ("bench_scaling.py",), "speed"),
    Bench("align_medpix", ("bench_align_quality.py", "medpix"), "quality", ("medpix-2",)),
    Bench("align_busi", ("bench_align_quality.py", "busi"), "quality", ("busi", "medpix-2")),
    Bench("align_phantom", ("bench_align_quality.py", "phantom"), "quality"),
    Bench("text_segment_design", ("bench_text_segment.py", "design"), "quality"),
    Bench("text_segment_phantom", ("bench_text_segment.py", "phantom"), "quality"),
    Bench("segment_busi", ("bench_segment.py", "busi"), "quality", ("busi",)),
    Bench("segment_kvasir", ("bench_segment.py", "kvasir"), "quality", ("kvasir-seg",)),
    Bench("text_segment_monuseg", ("bench_text_segment.py", "monuseg"), "quality", ("monuseg-text",)),
    Bench("text_segment_qata", ("bench_text_segment.py", "qata"), "quality", ("qata-cov19-text",)),
    Bench("fuse_phantom", ("bench_fuse.py", "phantom"), "quality"),
    Bench("fuse_lgg", ("bench_fuse.py", "lgg"), "quality", ("lgg_mri",)),
    Bench("fuse_wli_nbi", ("bench_fuse.py", "wli_nbi"), "quality", ("wli-nbi-demo",)),
    Bench("clinical", ("bench_clinical.py",), "quality", ("lgg_mri",)),
    Bench("report", ("bench_report.py",), "quality", ("medpix-2",)),
    Bench("instruct_phantom", ("bench_instruct.py", "phantom"), "quality"),
    Bench("instruct_medpix", ("bench_instruct.py", "medpix"), "quality", ("medpix-2",)),
    Bench("curriculum_ablation", ("bench_curriculum.py", "ablation"), "quality"),
    Bench("label_efficiency", ("bench_curriculum.py", "label_efficiency"), "quality", ("kvasir-seg", "busi")),
)


def selected(group: str, only: list[str]) -> list[Bench]:
    names = {b.name for b in SUITE}
    unknown = sorted(set(only) - names)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {sorted(names)}")
    if only:
        return [b for b in SUITE if b.name in only]
    return [b for b in SUITE if group == "all" or b.group == group]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=("speed", "quality", "all"), default="speed")
    parser.add_argument("--only", action="append", default=[], help="run just this benchmark (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the suite and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    parser.add_argument("--keep-going", action="store_true", help="run the rest after a failure")
    args = parser.parse_args()
    if args.list:
        for b in SUITE:
            print(f"{b.name:22s} {b.group:8s} {' '.join(b.args)}" + (f"  (data: {', '.join(b.data)})" if b.data else ""))
        return
    summary = []
    for bench in selected(args.group, args.only):
        missing = [d for d in bench.data if not (benchlib.DATA / d).is_dir()]
        if missing:
            print(f"::: {bench.name}: skipped, dataset(s) {missing} not in {benchlib.DATA}")
            summary.append({"name": bench.name, "status": "skipped", "missing": missing})
            continue
        print(f"::: {bench.name}: {' '.join(bench.command[1:])}", flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        code = subprocess.call(bench.command, cwd=benchlib.REPO)
        seconds = round(time.perf_counter() - start, 1)
        summary.append({"name": bench.name, "status": "ok" if code == 0 else f"exit {code}", "seconds": seconds})
        print(f"::: {bench.name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds} s", flush=True)
        if code and not args.keep_going:
            break
    if not args.dry_run:
        out = benchlib.REPO / "benchmarks" / "results" / "run_all.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"machine": benchlib.machine(), "benchmarks": summary}, indent=2) + "\n")
    failed = [s["name"] for s in summary if s["status"] not in ("ok", "skipped")]
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
