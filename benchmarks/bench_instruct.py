"""Visual instruction tuning benchmarks; writes its sections of BENCHMARKS.md.

``phantom``: ``configs/instruct/phantom_tiny.yaml`` (stage A then stage B) trained here; test
closed-question accuracy per attribute of the tuned tiny LM vs the untuned one (stage A's
bundle), the retrieval baseline and the majority answer.
``speed``: tokens/s of greedy generation with and without the KV cache on this CPU, for the
tuned tiny model and a larger random Llama (512 wide, 8 layers), 64 new tokens after one image.

    python benchmarks/bench_instruct.py phantom speed
"""

from __future__ import annotations

import sys
import time

import torch

import benchlib

KINDS = ("count", "side", "zone", "diagnosis")


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


def tokens_per_second(model: torch.nn.Module, pixels: torch.Tensor, use_cache: bool, new: int = 64) -> float:
    turns = [{"from": "human", "value": "<image>\nDescribe this image."}]
    ids, mask = model.prompt_batch([turns])
    embeds, mask, _ = model.splice(ids, mask, model.image_embeddings(pixels), left_pad=True)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False, use_cache=use_cache,
                                    pad_token_id=model.pad_id)  # fmt: skip
        best = max(best, out.shape[1] / (time.perf_counter() - start))
    return best


def speed() -> str:
    from medalign.models import create_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = ["| LM | image tokens | KV cache | tokens/s | speed-up |", "|---|---|---|---|---|"]
    larger = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8}  # fmt: skip
    for name, lm in (("tiny Llama (128 wide, 2 layers)", {}), ("Llama 512 wide, 8 layers", larger)):
        model = create_model("instruct_tiny", lm=lm, in_channels=2, image_size=64, vision={"config": {"patch_size": 8}})
        model.eval()
        pixels = torch.rand(1, 2, 64, 64)
        cached, plain = tokens_per_second(model, pixels, True), tokens_per_second(model, pixels, False)
        rows.append(f"| {name} | 64 | yes | {cached:.0f} | {cached / plain:.1f}x |")
        rows.append(f"| {name} | 64 | no | {plain:.0f} | 1.0x |")
    return f"Machine: {benchlib.machine(' (shared by 4 agents), 2 threads', ', fp32')}. Greedy, 64 new tokens, batch 1.\n\n" + "\n".join(rows)


if __name__ == "__main__":
    chosen = sys.argv[1:] or ["phantom", "speed"]
    for part in chosen:
        body = {"phantom": phantom, "speed": speed}[part]()
        title = {"phantom": "Visual instruction tuning: phantom closed questions",
                 "speed": "Visual instruction tuning: generation speed with and without the KV cache"}[part]  # fmt: skip
        benchlib.write_section(part, body, script="bench_instruct", title=title)
        print(body)
