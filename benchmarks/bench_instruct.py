"""Visual instruction tuning benchmarks: choices on the validation split, the test split read once.

``phantom``: ``configs/instruct/phantom_tiny.yaml``. The recipe's choices (whether Stage 1 aligns
the ViT first, and stage 3's length) are compared on the phantom's VAL split (closed-question
accuracy of the first answer); the variant with the best val accuracy is then trained with seeds
0, 1, 2 (``--seeds``) and each seed's final bundle is scored once on the TEST split, next to the retrieval
baseline (the answer of the nearest training image) and the majority answer per question.
``medpix``: ``configs/instruct/medpix.yaml`` at the report benchmark's MedPix protocol, trained
once; the n-gram guard (``no_repeat_ngram_size``) is chosen on the release's DEV split (val) by
ROUGE-L, and only the chosen decoding is scored on test, with the retrieval and most-frequent-
caption baselines.
``speed``: tokens/s of greedy generation with and without the KV cache on this CPU, for the
tiny Llama and a larger random one (512 wide, 8 layers), 16 and 128 new tokens after one image;
cached and uncached runs interleaved, medians, and the greedy answers compared.

    python benchmarks/bench_instruct.py phantom medpix speed [--write]

``--write`` saves ``benchmarks/results/bench_instruct_<part>.json`` and rewrites its block of
BENCHMARKS.md; ``blocks()`` renders every block from its results file alone. Runs live under
``$MEDALIGN_BENCH_RUNS`` (default /tmp/medalign-bench); finished stages are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import benchlib

KINDS = ("count", "side", "zone", "diagnosis")
SPEED_LENGTHS = (16, 128)
SPEED_THREADS = (1,)
PHANTOM_RECIPE = benchlib.REPO / "configs/instruct/phantom_tiny.yaml"
SEEDS = 3  # the chosen variant is trained with seeds 0 .. SEEDS-1 (``--seeds`` for fewer)
# variant -> (stages run, overrides): the recipe's choices, compared on val
PHANTOM_VARIANTS: dict[str, tuple[list[int], list[str]]] = {
    "Stage 1 alignment, stage 3 for 6 epochs (the recipe)": ([1, 2, 3], []),
    "Stage 1 alignment, stage 3 for 3 epochs": ([1, 2, 3], ["stage3.train.epochs=3"]),
    "no Stage 1: a random ViT trained in stage 3, 6 epochs": ([2, 3], ["stage3.instruct.train_vision=true"]),
}
GUARDS = (0, 2, 3, 4)  # MedPix: no_repeat_ngram_size candidates, chosen on dev
MEDPIX_CRITERION, MEDPIX_CRITERION_NAME = "rouge_l", "ROUGE-L"
TEXT_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")
# the report-generation benchmark's MedPix protocol (benchmarks/bench_report.py): 64 px, 5 epochs,
# captions cut at 64 tokens, at most 64 new tokens, greedy; trained with val as its eval split
MEDPIX = ["data.num_workers=0", "train.epochs=5", "train.seed=0", "instruct.max_new_tokens=64",
          "instruct.decoding=greedy", "model.overrides.max_length=96", "eval.split=val"]  # fmt: skip


def machine(threads: str, precision: str) -> str:
    return benchlib.machine(threads, precision)


def score_bundle(run: Path, split: str, **instruct: Any) -> dict[str, Any]:
    """The finished run's bundle scored on ``split`` (its config, ``instruct`` fields replaced),
    with the baselines and the number of distinct generated answers; the answers go to
    ``<run>/scored/<split>_<fields>/answers.jsonl``, the run's own files stay as they are."""
    import dataclasses

    from medalign.bundle import load_bundle
    from medalign.config import load_config
    from medalign.data.conversations import conversation_rows
    from medalign.run import image_columns, load_run_manifest
    from medalign.tasks.instruct import ANSWERS_FILE, evaluate_instruct

    config = load_config(run / "config.yaml")
    tag = "_".join(f"{k}{v}" for k, v in sorted(instruct.items())) or "recipe"
    folder = run / "scored" / f"{split}_{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(
        config, out=str(folder), instruct=dataclasses.replace(config.instruct, **instruct)
    )
    rows, _ = conversation_rows(load_run_manifest(config, run), config.instruct.conversations)
    model = load_bundle(run / "bundle").eval()
    scored = evaluate_instruct(model, rows, config, image_columns(config, rows), split)
    answers = [json.loads(line)["generated"] for line in (folder / ANSWERS_FILE).read_text().splitlines()]
    return {**scored, "distinct_answers": len(set(answers))}


def closed_summary(scored: dict[str, Any]) -> dict[str, Any]:
    closed = scored["closed"]
    return {"accuracy": closed["accuracy"], "n": closed["n"], **{k: closed["per_kind"][k]["accuracy"] for k in KINDS}}


# ------------------------------------------------------------------------------------------- phantom


def phantom_curriculum(out: Path, seed: int, extra: list[str]) -> Any:
    from medalign.curriculum import load_curriculum

    return load_curriculum(
        PHANTOM_RECIPE, [f"out={out}", f"train.seed={seed}", "eval.split=val", "train.progress=false", *extra]
    )


def kept(run: Path, name: str) -> Path:
    """A copy of a finished stage folder (bundle, config, metrics), safe from the next variant, which
    may retrain the same chain's last stage in the same folder."""
    import shutil

    copy = benchlib.RUNS / "instruct_phantom_variants" / "".join(c if c.isalnum() else "_" for c in name)
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    return copy


def phantom(seeds: int = SEEDS) -> dict[str, Any]:
    """Variants on val (seed 0), then the best one over ``seeds`` seeds, each scored once on test."""
    from medalign.curriculum import run_curriculum

    val: dict[str, Any] = {}
    finished: dict[str, Path] = {}
    for name, (chain, extra) in PHANTOM_VARIANTS.items():
        curriculum = phantom_curriculum(benchlib.RUNS / "instruct_phantom_seed0", 0, extra)
        folders = run_curriculum(curriculum, chain)
        stage_metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
        finished[name] = kept(folders[-1], name)
        val[name] = {
            **closed_summary(stage_metrics[-1]),
            "train_seconds": sum(m["train"]["seconds"] for m in stage_metrics),
        }
    chosen = max(val, key=lambda name: val[name]["accuracy"])
    chain, extra = PHANTOM_VARIANTS[chosen]
    tests = []
    for seed in range(seeds):
        if seed == 0:
            run, seconds = finished[chosen], val[chosen]["train_seconds"]
        else:
            curriculum = phantom_curriculum(benchlib.RUNS / f"instruct_phantom_seed{seed}", seed, extra)
            folders = run_curriculum(curriculum, chain)
            run = folders[-1]
            seconds = sum(json.loads((f / "metrics.json").read_text())["train"]["seconds"] for f in folders)
        scored = score_bundle(run, "test")
        tests.append(
            {
                "seed": seed,
                "tuned": closed_summary(scored),
                "retrieval": closed_summary(scored["retrieval"]),
                "majority": closed_summary(scored["majority"]),
                "train_seconds": seconds,
            }
        )
    return {"val": val, "chosen": chosen, "test": tests, "machine": machine(", 1 thread", ", bf16-mixed")}


def render_phantom(results: dict[str, Any]) -> str:
    val, tests, chosen = results["val"], results["test"], results["chosen"]
    n_val = next(iter(val.values()))["n"]
    lines = [
        "`configs/instruct/phantom_tiny.yaml` (480 cases, the phantom's patient-level split). Selection on val: "
        f"the recipe's choices below were compared on the val split ({n_val} questions, seed 0, closed-question "
        "accuracy of the first answer, greedy; a tie goes to the variant listed first, the recipe as written); the best one was trained with seeds "
        f"{', '.join(str(t['seed']) for t in tests)} and each seed's final model was scored once on the test split. "
        f"Machine: {results['machine']}.",
        "",
        "| variant (val, seed 0) | " + " | ".join(KINDS) + " | all closed | train s |",
        "|---|" + "---|" * (len(KINDS) + 2),
    ]
    for name, entry in val.items():
        label = f"**{name}** (chosen)" if name == chosen else name
        cells = " | ".join(f"{entry[k]:.3f}" for k in KINDS)
        lines.append(f"| {label} | {cells} | {entry['accuracy']:.3f} | {entry['train_seconds']:.0f} |")
    n_test = tests[0]["tuned"]["n"]
    lines += [
        "",
        f"Test split ({n_test} questions about {n_test // 6} cases), the chosen variant:",
        "",
        "| seed | tuned (all closed) | retrieval | majority | " + " | ".join(KINDS) + " | train s |",
        "|---|---|---|---|" + "---|" * (len(KINDS) + 1),
    ]
    for t in tests:
        cells = " | ".join(f"{t['tuned'][k]:.3f}" for k in KINDS)
        lines.append(
            f"| {t['seed']} | **{t['tuned']['accuracy']:.3f}** | {t['retrieval']['accuracy']:.3f} "
            f"| {t['majority']['accuracy']:.3f} | {cells} | {t['train_seconds']:.0f} |"
        )

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    tuned = [t["tuned"]["accuracy"] for t in tests]
    retrieval = [t["retrieval"]["accuracy"] for t in tests]
    majority = [t["majority"]["accuracy"] for t in tests]
    lines.append(
        f"| mean ± sd | **{spread(tuned)}** | {spread(retrieval)} | {spread(majority)} | "
        + " | ".join(spread([t["tuned"][k] for t in tests]) for k in KINDS)
        + " | |"
    )
    above = sum(t > r and t > m for t, r, m in zip(tuned, retrieval, majority, strict=True))
    lines += [
        "",
        f"The tuned tiny LM answers {spread(tuned)} of the closed test questions, against {spread(retrieval)} for "
        f"retrieval and {spread(majority)} for the majority answer; it is above both baselines in {above} of "
        f"{len(tests)} seeds. Train s: all stages of the chain.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- medpix


def medpix() -> dict[str, Any]:
    """Train (or reuse) the MedPix run; the guard on dev, then test once with the chosen guard."""
    manifest = benchlib.imported("medpix", "medpix", "medpix-2")
    metrics = benchlib.train("medpix", "instruct_medpix", [f"data.manifest={manifest}", *MEDPIX], folder="instruct")
    run = benchlib.RUNS / "instruct_medpix"
    val = {}
    for guard in GUARDS:
        scored = score_bundle(run, "val", no_repeat_ngram_size=guard)
        val[str(guard)] = {**{k: scored["open"][k] for k in (*TEXT_KEYS, "n")}, "distinct": scored["distinct_answers"]}
        print(f"val, no-repeat {guard}: {val[str(guard)]}", flush=True)
    chosen = max(val, key=lambda guard: val[guard][MEDPIX_CRITERION])
    scored = score_bundle(run, "test", no_repeat_ngram_size=int(chosen))
    return {
        "val": val,
        "chosen_guard": int(chosen),
        "test": {
            "tuned": {**{k: scored["open"][k] for k in (*TEXT_KEYS, "n")}, "distinct": scored["distinct_answers"]},
            "retrieval": {k: scored["retrieval"]["open"][k] for k in TEXT_KEYS},
            "majority": {k: scored["majority"]["open"][k] for k in TEXT_KEYS},
        },
        "overrides": MEDPIX,
        "train": metrics["train"],
        "machine": machine(", 1 thread", ", bf16-mixed"),
    }


def guard_name(guard: int) -> str:
    return "greedy (no guard)" if guard == 0 else f"greedy, no-repeat {guard}"


def render_medpix(results: dict[str, Any]) -> str:
    val, test, chosen = results["val"], results["test"], results["chosen_guard"]
    train = results["train"]
    header = "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | distinct captions |"
    lines = [
        f"`configs/instruct/medpix.yaml` with {' '.join(results['overrides'])}: the report benchmark's MedPix "
        f"protocol (release split, 1 channel, 64 px, 5 epochs, batch 32, at most 64 new tokens, corpus BLEU and "
        f"mean ROUGE-L from `medalign.textmetrics`); one trained model, {train['steps']} steps in "
        f"{train['seconds']:.0f} s. Selection on val: the n-gram guard (`instruct.no_repeat_ngram_size`) with the "
        f"best dev {MEDPIX_CRITERION_NAME}; test scored once, with it. Machine: {results['machine']}.",
        "",
        f"| decoding (dev, {next(iter(val.values()))['n']} captions) {header}",
        "|---|---|---|---|---|---|---|",
    ]
    for guard, m in val.items():
        name = guard_name(int(guard))
        label = f"**{name}** (chosen)" if int(guard) == chosen else name
        lines.append(f"| {label} | " + " | ".join(f"{m[k]:.3f}" for k in TEXT_KEYS) + f" | {m['distinct']} |")
    tuned = test["tuned"]
    lines += [
        "",
        f"| captions from (test, {tuned['n']} captions) {header}",
        "|---|---|---|---|---|---|---|",
        f"| instruct_tiny, {guard_name(chosen)} | " + " | ".join(f"{tuned[k]:.3f}" for k in TEXT_KEYS) + f" | {tuned['distinct']} |",
        "| retrieval (nearest training image, its ViT) | "
        + " | ".join(f"{test['retrieval'][k]:.3f}" for k in TEXT_KEYS)
        + " | |",
        "| majority (most frequent training caption) | "
        + " | ".join(f"{test['majority'][k]:.3f}" for k in TEXT_KEYS)
        + " | 1 |",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- speed


def generation_seconds(
    model: Any, embeds: torch.Tensor, mask: torch.Tensor, use_cache: bool, new: int
) -> float:
    """Wall time of one greedy generation of exactly ``new`` tokens (prefill included): transformers'
    ``generate`` (which always caches when it starts from embeddings) or the model's uncached loop."""
    start = time.perf_counter()
    with torch.inference_mode():
        if use_cache:
            out = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False, pad_token_id=model.pad_id)  # fmt: skip
        else:
            out = model.greedy_without_cache(embeds, mask, new, stop_at_eos=False)
    assert out.shape[1] == new, out.shape
    return time.perf_counter() - start


def speed_rows(name: str, model: torch.nn.Module, rounds: int, threads: int) -> list[dict[str, Any]]:
    """Cached and uncached runs interleaved round by round (the shared CPU's load hits both alike);
    greedy answers checked equal with and without the cache."""
    turns = [{"from": "human", "value": "<image>\nDescribe this image."}]
    pixels = torch.rand(1, model.config.in_channels, model.config.image_size, model.config.image_size)
    ids, mask = model.prompt_batch([turns])
    with torch.inference_mode():
        embeds, mask, _ = model.splice(ids, mask, model.image_embeddings(pixels), left_pad=True)
        same = model.generate([turns], pixels, max_new_tokens=32) == model.generate(
            [turns], pixels, max_new_tokens=32, use_cache=False)  # fmt: skip
    rows = []
    for new in SPEED_LENGTHS:
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for use_cache in (True, False):
                times[use_cache].append(generation_seconds(model, embeds, mask, use_cache, new))
        rows.append(
            {
                "lm": name,
                "threads": threads,
                "prompt_tokens": int(embeds.shape[1]),
                "new_tokens": new,
                "seconds_cached": times[True],
                "seconds_uncached": times[False],
                "same_answer": bool(same),
            }
        )
    return rows


def speed() -> dict[str, Any]:
    from medalign.models import create_model

    larger = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8}  # fmt: skip
    rows: list[dict[str, Any]] = []
    for threads in SPEED_THREADS:
        torch.set_num_threads(threads)
        for name, lm in (("tiny Llama (128 wide, 2 layers)", {}), ("Llama 512 wide, 8 layers", larger)):
            torch.manual_seed(0)
            model = create_model(
                "instruct_tiny", lm=lm, in_channels=2, image_size=64, vision={"config": {"patch_size": 8}}
            )
            rows += speed_rows(name, model.eval(), rounds=3, threads=threads)
    return {"rows": rows, "rounds": 3, "machine": machine("", ", fp32")}


def render_speed(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']}. Greedy, batch 1, exactly the stated number of new tokens (prefill "
        f"included in the time); cached and uncached runs interleaved, median of {results['rounds']} rounds. "
        "Reference: the same model decoding without a cache (`greedy_without_cache`: the LM over the whole "
        "sequence at every step, same positions as `generate`).",
        "",
        "| LM | threads | prompt tokens | new tokens | tokens/s, KV cache | tokens/s, no cache | speed-up | same greedy answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        cached = r["new_tokens"] / statistics.median(r["seconds_cached"])
        plain = r["new_tokens"] / statistics.median(r["seconds_uncached"])
        lines.append(
            f"| {r['lm']} | {r['threads']} | {r['prompt_tokens']} | {r['new_tokens']} | {cached:.0f} | {plain:.0f} "
            f"| {cached / plain:.1f}x | {'yes' if r['same_answer'] else '**no**'} |"
        )
    return "\n".join(lines)


PARTS: dict[str, tuple[str, Callable[[], dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "phantom": ("Visual instruction tuning: phantom closed questions", phantom, render_phantom),
    "medpix": ("Visual instruction tuning: MedPix 2.0 captions", medpix, render_medpix),
    "speed": ("Visual instruction tuning: generation speed with and without the KV cache", speed, render_speed),
}


def blocks() -> dict[str, str]:
    return benchlib.rendered({f"bench_instruct_{name}": render for name, (_, _, render) in PARTS.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--seeds", type=int, default=SEEDS, help="phantom: seeds of the chosen variant (at least 2)")
    parser.add_argument("--write", action="store_true", help="save the results files and rewrite the blocks")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds: at least 2 (the table gives mean ± sd over the seeds)")
    for part in args.parts:
        title, run, render = PARTS[part]
        results = phantom(args.seeds) if part == "phantom" else run()
        if args.write:
            heading = f"## {title} (`benchmarks/bench_instruct.py {part}`)"
            print(benchlib.publish(f"bench_instruct_{part}", results, render, heading))
        else:
            print(render(json.loads(json.dumps(results, default=float))))


if __name__ == "__main__":
    main()
