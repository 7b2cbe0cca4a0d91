"""The three-stage curriculum (HiCur-NPC): Stage I pretraining -> Stage II alignment -> Stage III heads.

A curriculum file chains ordinary recipes; each stage starts from the bundle of the stage run
before it (``model.init_from``), so the pretrained encoder flows through the chain. ::

    curriculum:
      out: runs/curriculum/phantom
      headline: [diagnosis.auc, survival.c_index]   # metrics.json keys the ablation tabulates
      shared: {data: {phantom: {n: 480, size: 64}}} # merged into every stage's recipe
      stages:
        1: {recipe: ../pretrain/phantom.yaml, train: {epochs: 10}}
        2: {recipe: ../align/phantom.yaml}
        3: {recipe: ../clinical/phantom.yaml}

A stage's recipe is ``defaults <- its recipe file <- shared <- its inline keys <- overrides``:
the shipped recipes are generic, the curriculum says what all its stages share (data, image
size, precision), a stage's own keys are the most specific. An override
``stage3.train.epochs=2`` reaches stage 3 only; ``train.epochs=2`` every stage.

Run folders are named after the chain that produced them: ``stages_1``, ``stages_1-2``,
``stages_1-2-3``; ``--stages 1,3`` trains ``stages_1-3`` from ``stages_1``. A stage that
finished with the same resolved recipe is reused rather than retrained, and a stage killed
midway resumes from its checkpoint, so a chain (or an ablation sharing its prefixes) can be
rerun after any interruption without losing work. The ablation runs the chain with stages
skipped and tabulates the last stage's headline metrics.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medalign.config import (
    ConfigError,
    RunConfig,
    build,
    read_yaml_mapping,
    set_path,
    split_override,
    to_dict,
)

Echo = Callable[[str], Any]
STATE_NAME = "stage.json"


@dataclass
class Curriculum:
    """A parsed curriculum file: stage number -> raw recipe mapping (not yet validated)."""

    path: Path
    out: Path
    stages: dict[int, dict[str, Any]]
    headline: list[str]

    def run_dir(self, chain: Sequence[int]) -> Path:
        return self.out / ("stages_" + "-".join(str(s) for s in chain))


def is_curriculum(path: str | Path) -> bool:
    """True when the YAML file's top level is a ``curriculum:`` mapping (not a plain recipe)."""
    try:
        return "curriculum" in read_yaml_mapping(path)
    except ConfigError:  # unreadable or not a mapping: not a curriculum (load_config will say why)
        return False


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of nested mappings; ``extra`` wins, lists and scalars are replaced whole."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_curriculum(path: str | Path, overrides: Sequence[str] = ()) -> Curriculum:
    """Read a curriculum file, resolve each stage's recipe file and apply ``key=value`` overrides."""
    path = Path(path)
    spec = read_yaml_mapping(path, "curriculum").get("curriculum")
    if not isinstance(spec, dict):
        raise ConfigError(f"'{path}': `curriculum:` must be a mapping with `out` and `stages`")
    unknown = sorted(set(spec) - {"out", "stages", "shared", "headline"})
    if unknown:
        raise ConfigError(f"'{path}': unknown curriculum key(s) {unknown}; known: headline, out, shared, stages")
    raw_stages = spec.get("stages")
    if not isinstance(raw_stages, dict) or not raw_stages:
        raise ConfigError(f"'{path}': curriculum.stages must map stage numbers (1, 2, 3) to recipes")
    per_stage: dict[int, list[tuple[list[str], Any]]] = {}
    common: list[tuple[list[str], Any]] = []
    for override in overrides:
        keys, value = split_override(override)
        head = keys[0]
        if head.startswith("stage") and head[5:].isdigit() and len(keys) > 1:
            per_stage.setdefault(int(head[5:]), []).append((keys[1:], value))
        elif keys == ["out"]:
            spec["out"] = value
        else:
            common.append((keys, value))
    stages: dict[int, dict[str, Any]] = {}
    for number, stage in raw_stages.items():
        if not isinstance(number, int) or number < 1:
            raise ConfigError(f"'{path}': stage keys must be positive integers, got {number!r}")
        if not isinstance(stage, dict):
            raise ConfigError(f"'{path}': stage {number} must be a mapping")
        stage = dict(stage)
        recipe: dict[str, Any] = {}
        if "recipe" in stage:
            recipe = read_yaml_mapping((path.parent / str(stage.pop("recipe"))).resolve(), f"stage {number} recipe")
        merged = _merge(_merge(recipe, spec.get("shared") or {}), stage)
        for keys, value in [*common, *per_stage.get(number, [])]:
            set_path(merged, keys, value)
        stages[number] = merged
    missing = sorted(set(per_stage) - set(stages))
    if missing:
        raise ConfigError(f"overrides name stage(s) {missing}, which '{path}' does not define")
    out = Path(str(spec.get("out") or f"runs/curriculum/{path.stem}"))
    headline = [str(h) for h in spec.get("headline") or []]
    return Curriculum(path, out, dict(sorted(stages.items())), headline)


def parse_stages(text: str | None, curriculum: Curriculum) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]; None -> every stage. Stages run in increasing order."""
    if text is None:
        return list(curriculum.stages)
    try:
        chosen = sorted({int(s) for s in text.replace(" ", "").split(",") if s})
    except ValueError as err:
        raise ConfigError(f"--stages {text!r}: expected comma-separated stage numbers like 1,2,3") from err
    unknown = [s for s in chosen if s not in curriculum.stages]
    if unknown or not chosen:
        raise ConfigError(f"--stages {text!r}: the curriculum defines stages {list(curriculum.stages)}")
    return chosen


def stage_config(curriculum: Curriculum, chain: Sequence[int]) -> RunConfig:
    """The validated recipe of the last stage of ``chain``, initialised from the stage before it."""
    number = chain[-1]
    raw = copy.deepcopy(curriculum.stages[number])
    raw["out"] = str(curriculum.run_dir(chain))
    if len(chain) > 1:
        raw.setdefault("model", {})["init_from"] = str(curriculum.run_dir(chain[:-1]) / "bundle")
    try:
        return build(RunConfig, raw, "")
    except ConfigError as err:
        raise ConfigError(f"stage {number}: {err}") from err


def _digest(config: RunConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    tmp.replace(run_dir / STATE_NAME)


def run_stage(curriculum: Curriculum, chain: Sequence[int], *, echo: Echo = print) -> Path:
    """Train one stage of a chain, or reuse/resume it; returns its run folder.

    Finished with the same resolved recipe -> reused. Started with the same recipe and killed
    -> resumed from its checkpoint. Anything else (a changed recipe) -> trained afresh.
    """
    from medalign.pipeline.run import run_training
    from medalign.training.engine import CHECKPOINT_NAME

    config = stage_config(curriculum, chain)
    run_dir = Path(config.out)
    # the stage it starts from is part of its recipe: a retrained parent invalidates the child
    parent = _state(curriculum.run_dir(chain[:-1])).get("digest", "") if len(chain) > 1 else ""
    digest = hashlib.sha256((_digest(config) + parent).encode()).hexdigest()[:16]
    state = _state(run_dir)
    label = f"stage {chain[-1]} ({config.task}) of chain {'-'.join(map(str, chain))}"
    if state.get("digest") == digest and state.get("complete") and (run_dir / "bundle").is_dir():
        echo(f"{label}: finished earlier with this recipe, reusing {run_dir}")
        return run_dir
    resume = state.get("digest") == digest and (run_dir / "checkpoints" / CHECKPOINT_NAME).is_file()
    if state and state.get("digest") != digest:
        echo(f"{label}: the recipe changed since {run_dir} was trained; training it again")
    echo(f"{label}: {'resuming' if resume else 'training'} -> {run_dir}")
    _write_state(run_dir, {"digest": digest, "chain": list(chain), "task": config.task, "complete": False})
    run_training(config, resume=resume, echo=echo)
    _write_state(run_dir, {"digest": digest, "chain": list(chain), "task": config.task, "complete": True})
    return run_dir


def run_curriculum(curriculum: Curriculum, stages: Sequence[int], *, echo: Echo = print) -> list[Path]:
    """Run ``stages`` in order as one chain; returns every stage's run folder."""
    return [run_stage(curriculum, list(stages[: i + 1]), echo=echo) for i in range(len(stages))]


def metric(metrics: dict[str, Any], dotted: str) -> Any:
    """``metrics["a"]["b"]`` for ``"a.b"``; None when any level is missing."""
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def default_variants(stages: Sequence[int]) -> list[list[int]]:
    """The full chain, the chain without each earlier stage, and the last stage alone."""
    full = list(stages)
    variants = [full] + [[s for s in full if s != skip] for skip in full[:-1]]
    if len(full) > 2:
        variants.append(full[-1:])
    return variants


def with_seed(curriculum: Curriculum, seed: int) -> Curriculum:
    """The curriculum with ``train.seed = seed`` in every stage, in its own ``<out>/seed_<seed>``."""
    stages = {number: copy.deepcopy(stage) for number, stage in curriculum.stages.items()}
    for stage in stages.values():
        set_path(stage, ["train", "seed"], seed)
    return Curriculum(curriculum.path, curriculum.out / f"seed_{seed}", stages, list(curriculum.headline))


def ablation_seeds(curriculum: Curriculum, seeds: int) -> list[int]:
    """``seeds`` consecutive training seeds from the last stage's ``train.seed``."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    last = list(curriculum.stages)[-1]
    base = stage_config(curriculum, [last]).train.seed
    return [base + i for i in range(seeds)]


def summarise(values: Sequence[Any]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1) of one metric over seeds; None when any is missing."""
    import statistics

    if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        return {"mean": None, "std": None}
    floats = [float(v) for v in values]
    return {"mean": statistics.fmean(floats), "std": statistics.stdev(floats) if len(floats) > 1 else 0.0}


def run_ablation(
    curriculum: Curriculum,
    variants: Sequence[Sequence[int]] | None = None,
    *,
    seeds: int = 1,
    echo: Echo = print,
) -> dict[str, Any]:
    """Run every variant chain (for each seed) and tabulate the last stage's headline metrics.

    Variants share run folders for their common prefixes, so Stage I is trained once for
    every chain that starts with it. With ``seeds`` N > 1 the whole ablation runs N times with
    consecutive training seeds (``ablation_seeds``), each in ``<out>/seed_<s>``, and every
    headline metric is reported as mean ± sample standard deviation over the seeds; with one
    seed the folders are ``<out>/stages_*`` as for ``medalign train``. Each row keeps
    ``<key>`` (the mean), ``std[<key>]`` and ``per_seed[<key>]``. Writes ``ablation.json``,
    ``ablation.md`` and ``ablation.html`` (the chains side by side with error bars) under ``out``.
    """
    from medalign.reporting.html_report import write_ablation_report

    variants = [list(v) for v in (variants or default_variants(list(curriculum.stages)))]
    seed_list = ablation_seeds(curriculum, seeds)
    runs = [curriculum] if seeds == 1 else [with_seed(curriculum, s) for s in seed_list]
    rows = []
    for chain in variants:
        folders, per_seed = [], {key: [] for key in curriculum.headline}
        for seeded in runs:
            run_dir = run_curriculum(seeded, chain, echo=echo)[-1]
            metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
            folders.append(str(run_dir))
            for key in curriculum.headline:
                per_seed[key].append(metric(metrics, key))
        summary = {key: summarise(values) for key, values in per_seed.items()}
        rows.append(
            {
                "stages": "-".join(map(str, chain)),
                "runs": folders,
                **{key: summary[key]["mean"] for key in curriculum.headline},
                "std": {key: summary[key]["std"] for key in curriculum.headline},
                "per_seed": per_seed,
            }
        )
    table = ablation_markdown(rows, curriculum.headline, seeds=len(seed_list))
    result = {
        "curriculum": str(curriculum.path),
        "headline": curriculum.headline,
        "seeds": seed_list,
        "rows": rows,
    }
    curriculum.out.mkdir(parents=True, exist_ok=True)
    (curriculum.out / "ablation.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (curriculum.out / "ablation.md").write_text(table + "\n", encoding="utf-8")
    write_ablation_report(curriculum.out, result)
    echo(table)
    return result


def _cell(value: Any, std: Any = None) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if std is None else f"{value:.4f} ± {std:.4f}"
    return "—" if value is None else str(value)


def ablation_markdown(rows: Sequence[dict[str, Any]], headline: Sequence[str], *, seeds: int = 1) -> str:
    """The chains side by side; over several seeds each cell is ``mean ± std``."""
    title = "stages run" if seeds == 1 else f"stages run (mean ± std, {seeds} seeds)"
    header = f"| {title} | " + " | ".join(headline) + " |"
    rule = "|---|" + "---|" * len(headline)
    body = [
        "| "
        + " | ".join(
            [row["stages"], *(_cell(row.get(k), row.get("std", {}).get(k) if seeds > 1 else None) for k in headline)]
        )
        + " |"
        for row in rows
    ]
    return "\n".join([header, rule, *body])
