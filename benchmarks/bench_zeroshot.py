"""Zero-shot classification throughput: medalign's Predictor path vs transformers' CLIPModel.

Both sides classify the same 512 images into 3 classes with a 4-template prompt ensemble
(12 prompts), with the towers of `bench_align_step.py` (CLIP ViT 384 x 6 at 128 px, text
256 x 4) and identical weights.

* **reference**: what the transformers zero-shot pipeline does per batch: ``CLIPModel`` in fp32
  with all 12 prompts encoded again in every batch, and the prompt ensemble formed as CLIP does
  it (the mean of each class's unit prompt embeddings, renormalised).
* **medalign**: ``ZeroShotClassifier`` as ``Predictor.classify`` uses it: class embeddings (the
  mean of each class's unit prompt embeddings) computed once, images embedded under bf16
  autocast, one matrix product per batch.

Images/s is the median of interleaved rounds. Agreement is the share of images whose predicted
class is the same as the reference's: for medalign in fp32 (the same rule, so it must be 100%) and
in bf16 (random weights make near-ties common, so bf16 rounding flips some).

    python benchmarks/bench_zeroshot.py [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import benchlib
from bench_align_step import BOS, EOS, PAD, TEXT_LENGTH, build_ours, build_reference
from medalign.evaluation.zeroshot import ZeroShotClassifier

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    assert TEXT_LENGTH >= 16
    torch.manual_seed(0)
    reference = build_reference().eval()
    ours = build_ours(reference).eval()
    images = torch.rand(IMAGES, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    ids, mask = prompts()
    k = len(CLASSES)

    def run_reference() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, IMAGES, BATCH):
                pixels = (images[start : start + BATCH] - MEAN) / STD  # the processor's normalisation
                text = F.normalize(reference.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
                weights = F.normalize(text.view(k, TEMPLATES, -1).mean(1), dim=-1)
                image = F.normalize(reference.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
                out.append(image @ weights.T)
        return torch.cat(out).argmax(1).numpy()

    def run_ours(bf16: bool = True) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            classifier = ZeroShotClassifier.from_prompts(
                lambda texts: ours.encode_text(ids, mask).float(),
                [f"{{}} {t}" for t in range(TEMPLATES)],
                {name: [name] for name in CLASSES},
                float(ours.logit_scale.exp()),
            )
            embeds = torch.cat([ours.encode_image(images[s : s + BATCH]).float() for s in range(0, IMAGES, BATCH)])
        return classifier.predict(embeds)

    run_reference(), run_ours()  # warm-up
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    answers = {}
    for round_ in range(args.rounds):
        order = [("reference", run_reference), ("ours", run_ours)]
        for name, fn in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            answers[name] = fn()
            times[name].append(time.perf_counter() - start)
    speed = {name: IMAGES / statistics.median(t) for name, t in times.items()}
    agreement = float((answers["reference"] == answers["ours"]).mean())
    exact = float((answers["reference"] == run_ours(bf16=False)).mean())
    print(speed, "agreement bf16", agreement, "fp32", exact)
    if args.write:
        body = (
            f"{IMAGES} images (128 px RGB), 3 classes x {TEMPLATES} templates, batch {BATCH}, towers of the "
            "alignment-step benchmark with identical weights; median of "
            f"{args.rounds} interleaved rounds. Reference: `CLIPModel` fp32 with every prompt encoded again in "
            "each batch (the transformers zero-shot pipeline's way) and CLIP's class-mean ensemble. medalign: `ZeroShotClassifier` (class embeddings "
            f"once) + bf16 image embedding. Machine: {benchlib.machine()}.\n\n"
            "| setup | images/s | ÷ reference |\n|---|---|---|\n"
            f"| transformers CLIPModel, fp32, prompts per batch | {speed['reference']:.1f} | 1.00 |\n"
            f"| medalign zero-shot (bf16, cached class embeddings) | {speed['ours']:.1f} | "
            f"{speed['ours'] / speed['reference']:.2f} |\n\n"
            f"Predicted classes agree with the reference's on {100 * exact:.1f}% of the images for medalign in "
            f"fp32 and {100 * agreement:.1f}% in bf16 (bf16 rounding can flip near-ties)."
        )
        benchlib.write_section("throughput", body, script="bench_zeroshot", title="Zero-shot throughput")


if __name__ == "__main__":
    main()
