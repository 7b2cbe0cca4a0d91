"""``medalign quickstart``: the whole path on the built-in phantom, as a list of steps.

Each step prints what it did and what it measured; later capabilities add their own steps
(training and evaluating every task) to ``STEPS`` so the quickstart stays the single
end-to-end smoke run a newcomer and CI both execute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Echo = Callable[[str], Any]


@dataclass
class QuickstartContext:
    out: Path
    n: int
    seed: int
    echo: Echo
    artifacts: dict[str, Any] = field(default_factory=dict)


def step_phantom(ctx: QuickstartContext) -> bool:
    from medalign.data.phantom import PhantomConfig, generate_phantom

    start = time.perf_counter()
    manifest_path = generate_phantom(ctx.out / "phantom", PhantomConfig(n=ctx.n, seed=ctx.seed))
    ctx.artifacts["manifest"] = manifest_path
    ctx.artifacts["prompts"] = manifest_path.with_name("prompts.csv")
    ctx.echo(f"generated phantom: {ctx.n} cases in {time.perf_counter() - start:.1f}s -> {manifest_path}")
    return True


def step_validate(ctx: QuickstartContext) -> bool:
    from medalign.data.manifest import read_manifest
    from medalign.data.validation import errors, validate_manifest

    ok = True
    for key in ("manifest", "prompts"):
        path = ctx.artifacts[key]
        problems = validate_manifest(read_manifest(path))
        for problem in errors(problems):
            ctx.echo(f"  {problem}")
        ctx.echo(
            f"validated {path.name}: {len(errors(problems))} errors, {len(problems) - len(errors(problems))} warnings"
        )
        ok &= not errors(problems)
    return ok


def step_summary(ctx: QuickstartContext) -> bool:
    from medalign.data.manifest import format_summary, read_manifest, summarize

    manifest = read_manifest(ctx.artifacts["manifest"])
    prompts = read_manifest(ctx.artifacts["prompts"])
    ctx.echo(format_summary(summarize(manifest)))
    first = manifest.table.iloc[
        next(i for i, c in enumerate(manifest.table["attr:count"]) if c not in ("0", ""))
    ]
    ctx.echo(f"example report ({first['case_id']}, {first['label']}): {first['text']}")
    example = prompts.table[prompts.table["patient_id"] == first["case_id"]].iloc[0]
    ctx.echo(f"example segmentation prompt ({example['case_id']}): {example['text']}")
    return True


STEPS: list[tuple[str, Callable[[QuickstartContext], bool]]] = [
    ("phantom", step_phantom),
    ("validate", step_validate),
    ("summary", step_summary),
]


def run_quickstart(out: Path, *, n: int = 240, seed: int = 0, echo: Echo = print) -> int:
    """Run every step in order; returns a process exit code (0 when every step passed)."""
    ctx = QuickstartContext(Path(out), n, seed, echo)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for name, step in STEPS:
        echo(f"== {name}")
        if not step(ctx):
            echo(f"quickstart step '{name}' failed")
            return 1
    echo(f"quickstart finished; outputs in {ctx.out}")
    return 0
