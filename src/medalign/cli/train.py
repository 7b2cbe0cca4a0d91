"""``medalign train``, ``medalign ablate`` and ``medalign quickstart``: recipes to bundles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medalign.cli.app import app
from medalign.cli_grammar import fail


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML recipe (see configs/).")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from <out>/checkpoints/last.ckpt.")
    ] = False,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages",
            help="Curriculum files only: the stages to run as one chain, e.g. 1,2,3 or 2,3 (default: all).",
        ),
    ] = None,
) -> None:
    """Train from a recipe or a curriculum; any recipe key can be overridden after the options.

    The run folder (`out:` in the recipe) receives config.yaml, checkpoints/, logs/, tb/,
    bundle/ and metrics.json. Examples:

        medalign train --config configs/align/phantom.yaml
        medalign train --config configs/align/medpix.yaml --train.max_steps 200 --out runs/mp
        medalign train --config configs/align/medpix.yaml --resume
        torchrun --nproc_per_node 2 -m medalign.cli train --config configs/align/medpix.yaml --train.strategy ddp

    A curriculum (configs/curriculum/) chains Stage I -> II -> III, each stage starting from
    the previous stage's bundle; finished stages are reused and a killed stage resumes, so
    rerunning the same command continues where it stopped (``--resume`` is implied):

        medalign train --config configs/curriculum/phantom.yaml --stages 1,2,3
        medalign train --config configs/curriculum/phantom.yaml --stages 2,3 --stage3.train.epochs 5
    """
    from medalign.config import ConfigError, load_config, parse_cli_overrides
    from medalign.pipeline.curriculum import is_curriculum, load_curriculum, parse_stages, run_curriculum
    from medalign.pipeline.run import run_training

    try:
        overrides = parse_cli_overrides(list(ctx.args))
        if is_curriculum(config):
            curriculum = load_curriculum(config, overrides)
            run_curriculum(curriculum, parse_stages(stages, curriculum), echo=typer.echo)
            return
        if stages is not None:
            raise ConfigError(f"--stages needs a curriculum file; '{config}' is a single recipe")
        run_training(load_config(config, overrides), resume=resume, echo=typer.echo)
    except ValueError as err:  # ConfigError and the checks of a run (a bundle of the wrong kind, ...)
        raise fail(str(err)) from err


@app.command("ablate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ablate(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="Curriculum YAML (configs/curriculum/).")],
    variants: Annotated[
        str | None,
        typer.Option(
            "--variants",
            help="Chains to compare, ';'-separated, e.g. '1,2,3;2,3;1,3;3' (default: the full chain, "
            "each earlier stage skipped, and the last stage alone).",
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds",
            help="Run the whole ablation with N consecutive training seeds (from the recipe's train.seed), "
            "each in <out>/seed_<s>, and report every metric as mean ± std.",
        ),
    ] = 1,
) -> None:
    """Run a curriculum with stages skipped and tabulate the last stage's headline metrics.

    Chains share their common prefixes (Stage I is trained once); results go to
    <out>/ablation.md, <out>/ablation.json and <out>/ablation.html (a bar chart with error bars
    over the seeds). Recipe overrides work as in `train`. Examples:

        medalign ablate --config configs/curriculum/phantom.yaml --seeds 3
        medalign ablate --config configs/curriculum/phantom.yaml --variants '1,2,3;3' --stage3.train.epochs 5
    """
    from medalign.config import ConfigError, parse_cli_overrides
    from medalign.pipeline.curriculum import is_curriculum, load_curriculum, parse_stages, run_ablation

    try:
        if not is_curriculum(config):
            raise ConfigError(f"'{config}' is not a curriculum file (no top-level `curriculum:`)")
        curriculum = load_curriculum(config, parse_cli_overrides(list(ctx.args)))
        chains = [parse_stages(v, curriculum) for v in variants.split(";")] if variants else None
        run_ablation(curriculum, chains, seeds=seeds, echo=typer.echo)
    except ValueError as err:  # ConfigError and the checks of a run (a bundle of the wrong kind, ...)
        raise fail(str(err)) from err


@app.command("quickstart")
def quickstart(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working folder for the phantom and outputs.")] = Path(
        "quickstart_out"
    ),
    n: Annotated[int, typer.Option(help="Number of phantom cases.")] = 480,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    steps: Annotated[
        int | None, typer.Option(help="Cap each training stage at this many steps (smoke test).")
    ] = None,
    keep_checkpoints: Annotated[
        bool,
        typer.Option(
            "--keep-checkpoints", help="Keep each finished run's optimiser checkpoint (checkpoints/last.ckpt)."
        ),
    ] = False,
) -> None:
    """Run the whole path on the built-in phantom: generate, validate, align images and reports, evaluate.

    Example:

        medalign quickstart --out /tmp/qs
    """
    from medalign.pipeline.quickstart import run_quickstart

    code = run_quickstart(out, n=n, seed=seed, echo=typer.echo, max_steps=steps, keep_checkpoints=keep_checkpoints)
    if code:
        raise fail(f"the quickstart stopped at a failed step (above); outputs so far in {out}")
