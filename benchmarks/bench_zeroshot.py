"""Zero-shot classification throughput: medalign's Predictor path vs transformers' CLIPModel.

Both sides classify the same 512 images into 3 classes with a 4-template prompt ensemble
(12 prompts), with the towers of `bench_align_step.py` (CLIP ViT 384 x 6 at 128 px, text
256 x 4) and identical weights.

* **reference**: what a CLIP user writes: ``CLIPModel`` encodes the 12 prompts once, forms the
  prompt ensemble as CLIP does (the mean of each class's unit prompt embeddings, renormalised),
  then embeds the images batch by batch; under the same CPU bf16 autocast as medalign (the
  headline) and in fp32. A secondary row re-encodes every prompt in every batch in fp32 (what
  the transformers zero-shot pipeline does), labelled as such.
* **medalign**: ``ZeroShotClassifier`` as ``Predictor.classify`` uses it: class embeddings (the
  mean of each class's unit prompt embeddings) computed once, images embedded under bf16
  autocast (or fp32), one matrix product per batch.

Every run includes its prompt encoding. Images/s is the median of interleaved rounds; each
medalign row is compared with the reference at the same precision. Agreement is the share of
images whose predicted class equals that reference's (random weights make near-ties common, so
bf16 rounding can flip some).

    python benchmarks/bench_zeroshot.py [--rounds 3] [--write]

``--write`` saves ``benchmarks/results/bench_zeroshot_throughput.json`` and rewrites its block.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import benchlib
from bench_align_step import BOS, EOS, PAD, TEXT_LENGTH, build_ours, build_reference
from medalign.zeroshot import ZeroShotClassifier

IMAGES, BATCH = 512, 64
CLASSES = {"normal": 1, "benign": 2, "malignant": 3}
TEMPLATES = 4
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """12 tokenised prompts (class-major): random ids framed as CLIP text, padded to 16 tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.full((len(CLASSES) * TEMPLATES, 16), PAD)
    mask = torch.zeros_like(ids)
    for row in range(len(ids)):
        length = int(torch.randint(6, 16, (1,), generator=g))
        ids[row, :length] = torch.randint(1000, 30000, (length,), generator=g)
        ids[row, 0], ids[row, length - 1] = BOS, EOS
        mask[row, :length] = 1
    return ids, mask


REF_BF16 = "transformers CLIPModel, bf16 autocast, prompts encoded once"
REF_FP32 = "transformers CLIPModel, fp32, prompts encoded once"
REF_NAIVE = "transformers CLIPModel, fp32, every prompt re-encoded per batch (pipeline style)"
OURS_BF16 = "medalign zero-shot, bf16 (cached class embeddings)"
OURS_FP32 = "medalign zero-shot, fp32"
COMPARED_WITH = {REF_BF16: REF_BF16, OURS_BF16: REF_BF16, REF_FP32: REF_FP32, OURS_FP32: REF_FP32, REF_NAIVE: REF_FP32}


def run(rounds: int) -> dict[str, Any]:
    assert TEXT_LENGTH >= 16
    torch.manual_seed(0)
    reference = build_reference().eval()
    ours = build_ours(reference).eval()
    images = torch.rand(IMAGES, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    ids, mask = prompts()
    k = len(CLASSES)

    def class_weights() -> torch.Tensor:
        text = F.normalize(reference.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.float(), dim=-1)
        return F.normalize(text.view(k, TEMPLATES, -1).mean(1), dim=-1)

    def image_features(start: int) -> torch.Tensor:
        pixels = (images[start : start + BATCH] - MEAN) / STD  # the processor's normalisation
        return F.normalize(reference.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    def run_reference(bf16: bool, per_batch: bool = False) -> np.ndarray:
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            weights = None if per_batch else class_weights()
            for start in range(0, IMAGES, BATCH):
                batch_weights = class_weights() if per_batch else weights
                out.append(image_features(start) @ batch_weights.T)
        return torch.cat(out).argmax(1).numpy()

    def run_ours(bf16: bool) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            classifier = ZeroShotClassifier.from_prompts(
                lambda texts: ours.encode_text(ids, mask).float(),
                [f"{{}} {t}" for t in range(TEMPLATES)],
                {name: [name] for name in CLASSES},
                float(ours.logit_scale.exp()),
            )
            embeds = torch.cat([ours.encode_image(images[s : s + BATCH]).float() for s in range(0, IMAGES, BATCH)])
        return classifier.predict(embeds)

    setups: dict[str, Callable[[], np.ndarray]] = {
        REF_BF16: lambda: run_reference(True),
        OURS_BF16: lambda: run_ours(True),
        REF_FP32: lambda: run_reference(False),
        OURS_FP32: lambda: run_ours(False),
        REF_NAIVE: lambda: run_reference(False, per_batch=True),
    }
    answers = {name: fn() for name, fn in setups.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in setups}
    for round_ in range(rounds):
        order = list(setups.items())
        for name, fn in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            answers[name] = fn()
            times[name].append(time.perf_counter() - start)
    agreement = {name: float((answers[name] == answers[COMPARED_WITH[name]]).mean()) for name in setups}
    return {
        "images": IMAGES,
        "batch": BATCH,
        "templates": TEMPLATES,
        "rounds": rounds,
        "seconds": times,
        "agreement": agreement,
        "machine": benchlib.machine(),
    }


def render(results: dict[str, Any]) -> str:
    speed = {name: results["images"] / statistics.median(t) for name, t in results["seconds"].items()}
    rows = [
        f"| {name} | {speed[name]:.1f} | {speed[name] / speed[COMPARED_WITH[name]]:.2f} "
        f"| {COMPARED_WITH[name].replace('transformers CLIPModel, ', '')} | {100 * results['agreement'][name]:.1f}% |"
        for name in results["seconds"]
    ]
    return "\n".join(
        [
            f"{results['images']} images (128 px RGB), 3 classes x {results['templates']} templates, batch "
            f"{results['batch']}, towers of the alignment-step benchmark with identical weights; median of "
            f"{results['rounds']} interleaved rounds, prompt encoding included. Each row's ratio is against "
            "`CLIPModel` encoding the class prompts once at the same precision (CLIP's class-mean ensemble); "
            f"agreement = predicted classes equal to that reference's. Machine: {results['machine']}.",
            "",
            "| setup | images/s | ÷ CLIPModel, same precision | that reference | same class |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Headline: {speed[OURS_BF16] / speed[REF_BF16]:.2f}x at bf16. Secondary (not like for like): the "
            f"pipeline-style reference that re-encodes every prompt per batch runs at {speed[REF_NAIVE]:.1f} images/s; "
            f"medalign in bf16 is {speed[OURS_BF16] / speed[REF_NAIVE]:.2f}x that.",
        ]
    )


def blocks() -> dict[str, str]:
    return benchlib.rendered({"bench_zeroshot_throughput": render})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    results = run(args.rounds)
    if args.write:
        heading = "## Zero-shot throughput (`benchmarks/bench_zeroshot.py throughput`)"
        print(benchlib.publish("bench_zeroshot_throughput", results, render, heading))
    else:
        print(render(results))


if __name__ == "__main__":
    main()
