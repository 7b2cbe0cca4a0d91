"""``medalign quickstart``: the whole path on the built-in phantom, as a list of steps.

Each step prints what it did and what it measured; later capabilities add their own steps
(training and evaluating every task) to ``STEPS`` so the quickstart stays the single
end-to-end smoke run a newcomer and CI both execute.
"""

from __future__ import annotations

import json
import math
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
    max_steps: int | None = None
    keep_checkpoints: bool = False  # finished runs keep bundle + metrics; optimiser checkpoints only on request
    artifacts: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint_override(self) -> str:
        """The recipe override every training step passes (``--keep-checkpoints``)."""
        return f"train.keep_checkpoints={str(self.keep_checkpoints).lower()}"


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


def recipe_path(name: str) -> Path:
    """A shipped recipe (``configs/<name>.yaml`` of the source checkout)."""
    path = Path(__file__).resolve().parents[3] / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"recipe {name!r} not found at {path}; run from a medalign source checkout")
    return path


def fitting_batch(ctx: QuickstartContext, cap: int) -> int:
    """The largest power of two <= ``cap`` that fills two batches of the train split.

    A small phantom (the tests' quickstart) must still give full batches (``drop_last``).
    """
    from medalign.data.manifest import read_manifest

    n_train = sum(1 for s in read_manifest(ctx.artifacts["manifest"]).table["split"] if s == "train")
    return min(cap, 2 ** int(math.log2(max(n_train // 2, 2))))


def step_align(ctx: QuickstartContext) -> bool:
    """Image-report alignment on the phantom; zero-shot diagnosis and retrieval on its test split."""
    from medalign.config import load_config
    from medalign.pipeline.run import run_training

    overrides = [
        f"out={ctx.out / 'align'}",
        f"data.manifest={ctx.artifacts['manifest']}",
        "data.phantom=null",
        f"train.seed={ctx.seed}",
        ctx.checkpoint_override,
    ]
    config = load_config(recipe_path("align/phantom"), overrides)
    config.data.batch_size = fitting_batch(ctx, config.data.batch_size)
    if ctx.max_steps:
        config.train.max_steps = ctx.max_steps
    run = run_training(config, echo=ctx.echo)
    metrics = json.loads((run / "metrics.json").read_text())
    zeroshot, retrieval = metrics["zeroshot"], metrics["retrieval"]["image_to_text"]
    chance = 1 / len(zeroshot["class_names"])
    ctx.echo(
        f"zero-shot diagnosis on test: accuracy {zeroshot['accuracy']:.3f} (chance {chance:.3f}), "
        f"balanced accuracy {zeroshot['balanced_accuracy']:.3f}, AUC {zeroshot['auc']:.3f}"
    )
    ctx.echo(
        f"image->report retrieval on test ({retrieval['n_queries']} cases): "
        f"R@1 {retrieval['R@1']:.3f}, R@10 {retrieval['R@10']:.3f}"
    )
    ctx.artifacts["align_bundle"] = run / "bundle"
    return True


SEGMENT_STEPS = 400  # batches of 16 prompts (~11 epochs): the schedule of benchmarks/bench_text_segment.py


def _train_segmentation(ctx: QuickstartContext, name: str, extra: list[str]) -> dict[str, Any]:
    from medalign.config import load_config
    from medalign.pipeline.run import run_training

    overrides = [
        f"out={ctx.out / name}",
        f"data.manifest={ctx.artifacts['prompts']}",
        "data.phantom=null",
        f"train.seed={ctx.seed}",
        "train.epochs=1000",
        f"train.max_steps={SEGMENT_STEPS}",
        ctx.checkpoint_override,
        *extra,
    ]
    config = load_config(recipe_path("segment/phantom_text"), overrides)
    if ctx.max_steps:
        config.train.max_steps = ctx.max_steps
    run = run_training(config, echo=ctx.echo)
    return json.loads((run / "metrics.json").read_text())


def step_segment(ctx: QuickstartContext) -> bool:
    """Prompt-selected lesion segmentation: the text-guided model vs the same network without text.

    Each prompt names one lesion of a case and only that lesion is the target, so the
    image-only model (same data, same targets) cannot know which lesion is meant: it can at best
    segment every lesion. The text-guided model is also scored with another case's prompt and
    with none, which shows that its Dice comes from reading the prompt.
    """
    text = _train_segmentation(ctx, "segment_text", [])
    image_only = _train_segmentation(ctx, "segment_image_only", ["model.overrides.text=null"])
    ablation = text["prompt_ablation"]
    ctx.echo(
        f"prompt-selected lesion segmentation on test ({text['n_images']} prompts): "
        f"Dice with text {text['dice']:.3f} (IoU {text['iou']:.3f}) vs "
        f"image-only {image_only['dice']:.3f} (IoU {image_only['iou']:.3f})"
    )
    ctx.echo(
        f"the text model given another case's prompt: Dice {ablation['shuffled']['dice']:.3f}; "
        f"given no prompt: {ablation['empty']['dice']:.3f}"
    )
    ctx.artifacts["segment_bundle"] = ctx.out / "segment_text" / "bundle"
    return True


FUSE_EPOCHS = 6  # about two minutes on two cores; the recipe's 20 epochs go further


def step_fuse(ctx: QuickstartContext) -> bool:
    """Every lesion of a case from two modalities (align-disentangle-fuse): one model, three inputs.

    Solid lesions are invisible in b and inflammatory ones in a, so each modality alone misses
    about a third of the lesions; the model is trained with modality dropout and evaluated with
    a alone, b alone and both.
    """
    from medalign.config import load_config
    from medalign.pipeline.run import run_training

    overrides = [
        f"out={ctx.out / 'fuse'}",
        f"data.manifest={ctx.artifacts['manifest']}",
        "data.phantom=null",
        f"train.seed={ctx.seed}",
        f"train.epochs={FUSE_EPOCHS}",
        ctx.checkpoint_override,
    ]
    config = load_config(recipe_path("fuse/phantom"), overrides)
    if ctx.max_steps:
        config.train.max_steps = ctx.max_steps
    run = run_training(config, echo=ctx.echo)
    subsets = json.loads((run / "metrics.json").read_text())["subsets"]
    single = ", ".join(f"{name} alone {subsets[name]['dice']:.3f}" for name in ("a", "b"))
    ctx.echo(
        f"lesion segmentation from two modalities on test ({subsets['a+b']['n_images']} cases): "
        f"Dice {single}, fused a+b {subsets['a+b']['dice']:.3f}"
    )
    ctx.artifacts["fuse_bundle"] = run / "bundle"
    return True


CURRICULUM_EPOCHS = {1: 12, 2: 20, 3: 16}  # the recipe trains longer (BENCHMARKS.md, both scales)


def curriculum_overrides(ctx: QuickstartContext) -> list[str]:
    """The curriculum step's recipe overrides: the quickstart's phantom, its seed, shorter schedules."""
    return [
        f"out={ctx.out / 'curriculum'}",
        f"data.batch_size={fitting_batch(ctx, 32)}",
        f"stage2.data.batch_size={fitting_batch(ctx, 64)}",
        f"data.manifest={ctx.artifacts['manifest']}",
        "data.phantom=null",
        f"train.seed={ctx.seed}",
        ctx.checkpoint_override,
        *(f"stage{k}.train.epochs={v}" for k, v in CURRICULUM_EPOCHS.items()),
        *([f"train.max_steps={ctx.max_steps}"] if ctx.max_steps else []),
    ]


def step_curriculum(ctx: QuickstartContext) -> bool:
    """Stage I -> II -> III on the phantom, and Stage III from each shorter chain, side by side.

    The full chain, the chain without Stage II and Stage III alone share their prefixes (Stage
    I is trained once), so the differences in the last table are what each stage adds.
    """
    from medalign.pipeline.curriculum import ablation_markdown, load_curriculum, metric, run_ablation

    curriculum = load_curriculum(recipe_path("curriculum/phantom"), curriculum_overrides(ctx))
    result = run_ablation(curriculum, [[1, 2, 3], [1, 3], [3]], echo=lambda _: None)

    def stage_metrics(name: str) -> dict[str, Any]:
        return json.loads((curriculum.out / name / "metrics.json").read_text())

    first, second = stage_metrics("stages_1"), stage_metrics("stages_1-2")
    probe = metric(first, "probe.test.balanced_accuracy")
    ctx.echo(
        f"Stage I (hybrid MAE, {CURRICULUM_EPOCHS[1]} epochs): test masked-patch loss "
        f"{metric(first, 'reconstruction'):.3f}, a->b view retrieval R@1 {metric(first, 'retrieval.R@1'):.3f} "
        f"(chance {1 / first['n_pairs']:.3f})"
        + (f", diagnosis linear probe balanced accuracy {probe:.3f}" if probe is not None else "")
    )
    ctx.echo(
        f"Stage II (alignment of a + b with the reports, {CURRICULUM_EPOCHS[2]} epochs): zero-shot diagnosis "
        f"accuracy {metric(second, 'zeroshot.accuracy'):.3f}, image->report R@1 "
        f"{metric(second, 'retrieval.image_to_text.R@1'):.3f}"
    )
    ctx.echo(f"Stage III (fused a+b, diagnosis + Cox heads, {CURRICULUM_EPOCHS[3]} epochs) by chain:")
    ctx.echo(ablation_markdown(result["rows"], result["headline"]))
    ctx.artifacts["clinical_bundle"] = curriculum.out / "stages_1-2-3" / "bundle"
    return True


STEPS: list[tuple[str, Callable[[QuickstartContext], bool]]] = [
    ("phantom", step_phantom),
    ("validate", step_validate),
    ("summary", step_summary),
    ("align", step_align),
    ("segment", step_segment),
    ("fuse", step_fuse),
    ("curriculum", step_curriculum),
]


def run_quickstart(
    out: Path,
    *,
    n: int = 480,
    seed: int = 0,
    echo: Echo = print,
    max_steps: int | None = None,
    keep_checkpoints: bool = False,
) -> int:
    """Run every step in order; returns a process exit code (0 when every step passed).

    ``max_steps`` caps every training step (for smoke tests); the default trains fully. Each
    finished run keeps its bundle, metrics and report; ``keep_checkpoints`` also keeps its
    optimiser checkpoint (needed only to train it further with ``--resume``).
    """
    ctx = QuickstartContext(Path(out), n, seed, echo, max_steps, keep_checkpoints)
    ctx.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, step in STEPS:
        echo(f"== {name}")
        began = time.perf_counter()
        if not step(ctx):
            echo(f"quickstart step '{name}' failed")
            return 1
        echo(f"({name}: {time.perf_counter() - began:.0f} s)")
    minutes = (time.perf_counter() - start) / 60
    echo(f"quickstart finished in {minutes:.1f} min; outputs in {ctx.out} ({folder_megabytes(ctx.out):.0f} MB)")
    return 0


def folder_megabytes(folder: Path) -> float:
    """What a folder holds on disk, in MB (10^6 bytes): file sizes, as ``du --apparent-size`` counts."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6
