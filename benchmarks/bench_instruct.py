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

    python benchmarks/bench_instruct.py phantom medpix speed
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import benchlib

KINDS = ("count", "side", "zone", "diagnosis")
SPEED_LENGTHS = (16, 128)


def phantom() -> str:
    from medalign.curriculum import load_curriculum, run_curriculum

    curriculum = load_curriculum(benchlib.REPO / "configs/instruct/phantom_tiny.yaml", [
        f"out={benchlib.RUNS / 'instruct_phantom_tiny'}", "train.progress=false"])  # fmt: skip
    import json

    run = run_curriculum(curriculum, list(curriculum.stages))[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    rows = ["| answers from | " + " | ".join(KINDS) + " | all closed |", "|---|" + "---|" * (len(KINDS) + 1)]
    for name, block in (("tuned tiny LM (stage B)", metrics), ("untuned (stage A bundle)", metrics["untuned"]),
                        ("retrieval (nearest training image)", metrics["retrieval"]),
                        ("majority answer per question", metrics["majority"])):  # fmt: skip
        closed = block["closed"]
        cells = [f"{closed['per_kind'][k]['accuracy']:.3f}" for k in KINDS]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | **{closed['accuracy']:.3f}** |")
    steps = metrics["train"]["steps"]
    return (
        f"Machine: {benchlib.machine(' (shared by 4 agents)', ', bf16-mixed')}. Test split: "
        f"{metrics['closed']['n']} questions about {metrics['closed']['n'] // 6} cases; stage B {steps} steps.\n\n"
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
    manifest = benchlib.imported("medpix", "medpix", "medpix-2")
    start = time.perf_counter()
    metrics = benchlib.train(
        "medpix", "instruct_medpix", [f"data.manifest={manifest}", *MEDPIX], folder="instruct"
    )
    wall = time.perf_counter() - start
    keys = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")
    rows = ["| captions from | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L |", "|---|---|---|---|---|---|"]
    for name, block in (("instruct_tiny, tuned (greedy)", metrics), ("retrieval (nearest training image, its ViT)",
                        metrics["retrieval"]), ("majority (most frequent training caption)", metrics["majority"])):  # fmt: skip
        rows.append(f"| {name} | " + " | ".join(f"{block['open'][k]:.3f}" for k in keys) + " |")
    for name, values in REPORT_ROWS.items():
        rows.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    train = metrics["train"]
    return (
        f"Machine: {benchlib.machine(' (shared by 4 agents)', ', bf16-mixed')}. `configs/instruct/medpix.yaml` "
        f"with {' '.join(MEDPIX)}: {metrics['open']['n']} test captions, {train['steps']} steps, "
        f"{wall:.0f} s training + evaluation (0 s: the run of an earlier invocation, reused).\n\n"
        + "\n".join(rows)
    )


def generation_seconds(
    model: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor, use_cache: bool, new: int
) -> float:
    """Wall time of one greedy generation of exactly ``new`` tokens (prefill included)."""
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, use_cache=use_cache, pad_token_id=model.pad_id)  # fmt: skip
    assert out.shape[1] == new, out.shape
    return time.perf_counter() - start


def speed_rows(name: str, model: torch.nn.Module, lengths: tuple[int, ...], rounds: int) -> list[str]:
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
        rows.append(f"| {name} | {embeds.shape[1]} | {new} | {cached:.0f} | {plain:.0f} | {cached / plain:.1f}x "
                    f"| {'yes' if same else '**no**'} |")  # fmt: skip
    return rows


def speed() -> str:
    from medalign.models import create_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = ["| LM | prompt tokens (64 image) | new tokens | tokens/s, KV cache | tokens/s, no cache | speed-up "
            "| same greedy answer |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    larger = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8}  # fmt: skip
    for name, lm in (("tiny Llama (128 wide, 2 layers)", {}), ("Llama 512 wide, 8 layers", larger)):
        model = create_model(
            "instruct_tiny", lm=lm, in_channels=2, image_size=64, vision={"config": {"patch_size": 8}}
        )
        rows += speed_rows(name, model.eval(), SPEED_LENGTHS, rounds=3)
    return (
        f"Machine: {benchlib.machine(' (shared by 4 agents), 2 threads', ', fp32')}. Greedy, batch 1, exactly "
        "the stated number of new tokens (prefill included in the time); cached and uncached runs interleaved, "
        "median of 3 rounds.\n\n" + "\n".join(rows)
    )


if __name__ == "__main__":
    chosen = sys.argv[1:] or ["phantom", "medpix", "speed"]
    for part in chosen:
        body = {"phantom": phantom, "medpix": medpix, "speed": speed}[part]()
        title = {"phantom": "Visual instruction tuning: phantom closed questions",
                 "medpix": "Visual instruction tuning: MedPix 2.0 captions",
                 "speed": "Visual instruction tuning: generation speed with and without the KV cache"}[part]  # fmt: skip
        benchlib.write_section(part, body, script="bench_instruct", title=title)
        print(body)
