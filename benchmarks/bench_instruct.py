"""Visual instruction tuning benchmarks; writes its sections of BENCHMARKS.md.

``phantom``: ``configs/instruct/phantom_tiny.yaml`` (stage A then stage B) trained here; test
closed-question accuracy per attribute of the tuned tiny LM vs the untuned one (stage A's
bundle), the retrieval baseline and the majority answer.
``medpix``: ``configs/instruct/medpix.yaml`` at the report benchmark's MedPix protocol; test
caption BLEU-1..4 / ROUGE-L of the tuned tiny LM vs retrieval and the most frequent caption,
next to the report decoder's numbers from BENCHMARKS.md (same split, size, epochs, metrics).
``speed``: tokens/s of greedy generation with and without the KV cache on this CPU, for the
tiny Llama and a larger random one (512 wide, 8 layers), 16 and 128 new tokens after one image;
cached and uncached runs interleaved, medians, and the greedy answers compared.
``seeds``: the phantom recipe trained whole with seeds 0, 1, 2; mean and spread (not run by default).

    python benchmarks/bench_instruct.py phantom medpix speed
    python benchmarks/bench_instruct.py seeds
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import torch

import benchlib

KINDS = ("count", "side", "zone", "diagnosis")
SPEED_LENGTHS = (16, 128)
SPEED_THREADS = (1,)
PHANTOM_RECIPE = benchlib.REPO / "configs/instruct/phantom_tiny.yaml"


def phantom() -> str:
    """Trains the curriculum under ``MEDALIGN_BENCH_RUNS``, or reads the finished run folder that
    ``MEDALIGN_INSTRUCT_PHANTOM_RUN`` names (``medalign train --config ...phantom_tiny.yaml``)."""
    import json
    import os

    from medalign.pipeline.curriculum import load_curriculum, run_curriculum

    given = os.environ.get("MEDALIGN_INSTRUCT_PHANTOM_RUN")
    curriculum = load_curriculum(PHANTOM_RECIPE, [
        f"out={given or benchlib.RUNS / 'instruct_phantom_tiny'}", "train.progress=false"])  # fmt: skip
    chain = list(curriculum.stages)
    run = curriculum.run_dir(chain) if given else run_curriculum(curriculum, chain)[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    rows = ["| answers from | " + " | ".join(KINDS) + " | all closed |", "|---|" + "---|" * (len(KINDS) + 1)]
    for name, block in (("tuned tiny LM (stage B)", metrics), ("untuned (stage A bundle)", metrics["untuned"]),
                        ("retrieval (nearest training image)", metrics["retrieval"]),
                        ("majority answer per question", metrics["majority"])):  # fmt: skip
        closed = block["closed"]
        cells = [f"{closed['per_kind'][k]['accuracy']:.3f}" for k in KINDS]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | **{closed['accuracy']:.3f}** |")
    train = metrics["train"]
    return (
        f"Machine: {benchlib.machine(' (shared by 4 agents), 1 thread', ', bf16-mixed')}. Test split: "
        f"{metrics['closed']['n']} questions about {metrics['closed']['n'] // 6} cases; stage B {train['steps']} "
        f"steps in {train['seconds']:.0f} s.\n\n" + "\n".join(rows)
    )


SEEDS = (0, 1, 2)


def seeds() -> str:
    """The phantom recipe trained again with ``train.seed`` 0, 1, 2 (every stage's weights, order
    and augmentation; the phantom and its split stay fixed): how much of the table is one seed."""
    from medalign.pipeline.curriculum import load_curriculum, metric, run_curriculum

    columns = [("tuned", "closed.accuracy"), ("retrieval", "retrieval.closed.accuracy"),
               *((kind, f"closed.per_kind.{kind}.accuracy") for kind in KINDS)]  # fmt: skip
    rows = ["| seed | tuned (all closed) | retrieval | majority | " + " | ".join(KINDS) + " | train s |",
            "|---|---|---|---|" + "---|" * (len(KINDS) + 1)]  # fmt: skip
    values: dict[str, list[float]] = {name: [] for name, _ in columns}
    majority = None
    for seed in SEEDS:
        curriculum = load_curriculum(PHANTOM_RECIPE, [
            f"out={benchlib.RUNS / f'instruct_phantom_seed{seed}'}", f"train.seed={seed}",
            "train.progress=false"])  # fmt: skip
        stage_metrics = [json.loads((folder / "metrics.json").read_text())
                         for folder in run_curriculum(curriculum, list(curriculum.stages))]  # fmt: skip
        found = stage_metrics[-1]
        for name, key in columns:
            values[name].append(metric(found, key))
        majority = metric(found, "majority.closed.accuracy")  # the training answers': seed-free
        seconds = sum(stage["train"]["seconds"] for stage in stage_metrics)
        cells = " | ".join(f"{values[kind][-1]:.3f}" for kind in KINDS)
        rows.append(f"| {seed} | **{values['tuned'][-1]:.3f}** | {values['retrieval'][-1]:.3f} | {majority:.3f} | "
                    f"{cells} | {seconds:.0f} |")  # fmt: skip

    def spread(name: str) -> str:
        return f"{statistics.mean(values[name]):.3f} ± {statistics.stdev(values[name]):.3f}"

    rows.append(
        f"| mean ± sd | **{spread('tuned')}** | {spread('retrieval')} | {majority:.3f} | "
        + " | ".join(spread(kind) for kind in KINDS)
        + " | |"
    )
    return (
        f"Machine: {benchlib.machine(', 1 thread', ', bf16-mixed')}. `configs/instruct/phantom_tiny.yaml` "
        f"as written, whole curriculum (stages 1-3) per seed; test split, {len(SEEDS)} seeds.\n\n"
        + "\n".join(rows)
    )


# the report-generation benchmark's MedPix protocol (benchmarks/bench_report.py): 64 px, 5 epochs,
# captions cut at 64 tokens, at most 64 new tokens, greedy
MEDPIX = ["data.num_workers=0", "train.epochs=5", "train.seed=0", "instruct.max_new_tokens=64",
          "instruct.decoding=greedy", "model.overrides.max_length=96"]  # fmt: skip
REPORT_ROWS = {  # BENCHMARKS.md "Report generation", MedPix 2.0, the same 200 test images
    "report decoder (report_small_minilm), greedy": (0.125, 0.056, 0.023, 0.011, 0.151),
    "report decoder, greedy, no-repeat 3": (0.180, 0.081, 0.035, 0.014, 0.157),
    "report decoder, beam 3, no-repeat 3 (its recipe)": (0.161, 0.080, 0.034, 0.009, 0.174),
}


def medpix() -> str:
    """Train (or reuse) the MedPix run, then decode its bundle greedily with and without the
    3-gram guard (the same model: rows differ only in decoding)."""
    import dataclasses

    from medalign.tasks.columns import image_columns

    from medalign.bundle import load_bundle
    from medalign.config import load_config
    from medalign.data.conversations import conversation_rows
    from medalign.data.manifest import read_manifest
    from medalign.tasks.instruct import evaluate_instruct

    manifest = benchlib.imported("medpix", "medpix", "medpix-2")
    overrides = [f"data.manifest={manifest}", *MEDPIX]
    metrics = benchlib.train("medpix", "instruct_medpix", overrides, folder="instruct")
    out = benchlib.RUNS / "instruct_medpix"
    config = load_config(benchlib.REPO / "configs/instruct/medpix.yaml", [f"out={out}", *overrides])
    model = load_bundle(out / "bundle").eval()
    rows, _ = conversation_rows(read_manifest(manifest), "caption")
    keys = image_columns(config, rows)
    keys_ = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")
    table = ["| captions from | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | distinct captions |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    baselines: dict = {}
    for guard in (0, 3):
        variant = dataclasses.replace(
            config, instruct=dataclasses.replace(config.instruct, no_repeat_ngram_size=guard)
        )
        scored = evaluate_instruct(model, rows, variant, keys, "test", baselines=not baselines)
        baselines = baselines or {"retrieval": scored["retrieval"], "majority": scored["majority"]}
        answers = [json.loads(line)["generated"] for line in (out / "answers.jsonl").read_text().splitlines()]
        name = f"instruct_tiny, greedy{', no-repeat 3' if guard else ' (no guard)'}"
        cells = " | ".join(f"{scored['open'][k]:.3f}" for k in keys_)
        table.append(f"| {name} | {cells} | {len(set(answers))} |")
    for name, key in (("retrieval (nearest training image, its ViT)", "retrieval"),
                      ("majority (most frequent training caption)", "majority")):  # fmt: skip
        table.append(f"| {name} | " + " | ".join(f"{baselines[key]['open'][k]:.3f}" for k in keys_) + " | |")
    for name, values in REPORT_ROWS.items():
        table.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " | |")
    train = metrics["train"]
    return (
        f"Machine: {benchlib.machine(' (shared by 4 agents), 1 thread', ', bf16-mixed')}. "
        f"`configs/instruct/medpix.yaml` with {' '.join(MEDPIX)}: {scored['open']['n']} test captions, "
        f"{train['steps']} steps in {train['seconds']:.0f} s.\n\n" + "\n".join(table)
    )


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


def speed_rows(
    name: str, model: torch.nn.Module, lengths: tuple[int, ...], rounds: int, threads: int
) -> list[str]:
    """Cached and uncached runs interleaved round by round (the shared CPU's load hits both alike);
    the median of the rounds; greedy answers checked equal with and without the cache."""
    turns = [{"from": "human", "value": "<image>\nDescribe this image."}]
    pixels = torch.rand(1, model.config.in_channels, model.config.image_size, model.config.image_size)
    ids, mask = model.prompt_batch([turns])
    with torch.inference_mode():
        embeds, mask, _ = model.splice(ids, mask, model.image_embeddings(pixels), left_pad=True)
        same = model.generate([turns], pixels, max_new_tokens=32) == model.generate(
            [turns], pixels, max_new_tokens=32, use_cache=False)  # fmt: skip
    rows = []
    for new in lengths:
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for use_cache in (True, False):
                times[use_cache].append(generation_seconds(model, embeds, mask, use_cache, new))
        cached, plain = (new / statistics.median(times[c]) for c in (True, False))
        rows.append(f"| {name} | {threads} | {embeds.shape[1]} | {new} | {cached:.0f} | {plain:.0f} | {cached / plain:.1f}x "
                    f"| {'yes' if same else '**no**'} |")  # fmt: skip
    return rows


def speed() -> str:
    """Both LMs at 1 and at 2 torch threads: on this shared 2-core machine, 2 threads are
    oversubscribed whenever another process runs, which hits the cached decode (many tiny
    kernels per token, each ending at a thread barrier) far harder than the uncached one."""
    from medalign.models import create_model

    rows = ["| LM | threads | prompt tokens (64 image) | new tokens | tokens/s, KV cache | tokens/s, no cache "
            "| speed-up | same greedy answer |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    larger = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8}  # fmt: skip
    for threads in SPEED_THREADS:
        torch.set_num_threads(threads)
        for name, lm in (("tiny Llama (128 wide, 2 layers)", {}), ("Llama 512 wide, 8 layers", larger)):
            torch.manual_seed(0)
            model = create_model(
                "instruct_tiny", lm=lm, in_channels=2, image_size=64, vision={"config": {"patch_size": 8}}
            )
            rows += speed_rows(name, model.eval(), SPEED_LENGTHS, rounds=3, threads=threads)
    return (
        f"Machine: {benchlib.machine(' (shared by 4 agents)', ', fp32')}. Greedy, batch 1, exactly "
        "the stated number of new tokens (prefill included in the time); cached and uncached runs interleaved, "
        "median of 3 rounds.\n\n" + "\n".join(rows)
    )


if __name__ == "__main__":
    chosen = sys.argv[1:] or ["phantom", "medpix", "speed"]
    for part in chosen:
        body = {"phantom": phantom, "seeds": seeds, "medpix": medpix, "speed": speed}[part]()
        title = {"phantom": "Visual instruction tuning: phantom closed questions",
                 "seeds": "Visual instruction tuning: phantom closed questions over seeds",
                 "medpix": "Visual instruction tuning: MedPix 2.0 captions",
                 "speed": "Visual instruction tuning: generation speed with and without the KV cache"}[part]  # fmt: skip
        benchlib.write_section(part, body, script="bench_instruct", title=title)
        print(body)
