"""Training throughput of one alignment step: medalign's dual encoder vs transformers' CLIPModel.

Both sides train the same architecture on the same batch: CLIP vision and text towers built
from identical configs (ViT 384 wide, 6 layers, 6 heads, patch 16 at 128 px; text transformer
256 wide, 4 layers, 4 heads, 64 tokens, MiniLM's 30522-token vocabulary), linear projections
without bias to a 256-d space, a learnable temperature, and the symmetric InfoNCE loss over
64 image-text pairs. The medalign model starts from the reference's weights.

* **reference**: ``transformers.CLIPModel(CLIPConfig(...))``, ``return_loss=True``,
  ``loss.backward()``, ``torch.optim.AdamW(fused=True)``, ``zero_grad()``: the plain PyTorch loop
  at its best practical setting, under the same CPU bf16 autocast as medalign, with either of
  transformers' attention implementations (SDPA, its default, and eager: the faster one is the
  headline reference). The same loop in fp32 with the default AdamW, the naive setup, is a
  secondary reference for medalign in fp32; a compiled reference for medalign compiled.
* **medalign**: ``create_model("align_clip_b16", vision=..., text=...)`` with the same tower
  configs, trained as ``medalign.engine.Engine`` trains it with the default precision
  (``bf16-mixed``: CPU autocast to bfloat16 around the model's forward, embeddings back to
  fp32), ``medalign.losses.clip_loss``, ``medalign.engine.build_optimizer`` (fused AdamW, no
  decay on 1-D parameters), gradient clipping at 1.0 (``OptimConfig.grad_clip``), the
  scheduler step, ``zero_grad(set_to_none=True)``. The engine itself is not driven: its data
  loader, logging and checkpoints are not part of a step's cost.

Three ablations of the medalign side show where its speed comes from: the same step with the
towers on transformers' SDPA attention (PyTorch's fused CPU kernel, slow in bf16), the same
step in fp32, and the same step with the model under ``torch.compile`` (``train.compile``);
each is compared with the reference at the same precision and compilation.

After 3 warm-up steps each, rounds of ``--steps`` steps alternate between the setups (the
order reversed every other round) so that load on a shared machine hits all alike; the
median of the rounds is reported. Every setup trains its own model on the same batch, so the
losses before and after show that each one learns.

    python benchmarks/bench_align_step.py [--rounds 5] [--steps 5] [--no-ablations] [--write]

``--write`` saves ``benchmarks/results/bench_align_step.json`` and rewrites the bench_align_step
block of BENCHMARKS.md from it (``blocks()``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

import benchlib
from medalign.config import OptimConfig
from medalign.engine import build_optimizer, build_scheduler
from medalign.losses import clip_loss
from medalign.models import DualEncoder, TowerConfig, create_model

BATCH, IMAGE_SIZE, TEXT_LENGTH, EMBED_DIM = 64, 128, 64, 256
VISION = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "patch_size": 16,
}
# MiniLM's tokenizer (BERT uncased), medalign's default for random text towers: [PAD] 0, [CLS] 101,
# [SEP] 102. CLIP pools the text at the first end-of-text token, here [SEP].
PAD, BOS, EOS, VOCAB = 0, 101, 102, 30522
TEXT = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": TEXT_LENGTH,
    "vocab_size": VOCAB,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
}
OPTIM = OptimConfig(
    schedule="constant"
)  # medalign's defaults (lr 1e-4, betas 0.9/0.98, decay 0.05, clip 1.0)
REF_SDPA = "transformers CLIPModel, bf16 autocast, SDPA attention (its default)"
REF_EAGER = "transformers CLIPModel, bf16 autocast, eager attention"
REF_FP32 = "transformers CLIPModel, fp32, torch AdamW (naive loop)"
REF_COMPILE = "transformers CLIPModel, bf16 autocast + torch.compile"
BEST_BF16 = "best bf16 CLIPModel"  # whichever of REF_SDPA / REF_EAGER is faster
OURS = "medalign DualEncoder, as the Engine trains it (bf16)"
OURS_SDPA = "medalign, towers on torch SDPA attention"
OURS_FP32 = "medalign, fp32 (precision 32-true)"
OURS_COMPILE = "medalign bf16 + torch.compile (train.compile)"
# each setup's reference at the same precision and compilation
COMPARED_WITH = {
    REF_SDPA: BEST_BF16, REF_EAGER: BEST_BF16, OURS: BEST_BF16, OURS_SDPA: BEST_BF16,
    REF_FP32: REF_FP32, OURS_FP32: REF_FP32, REF_COMPILE: REF_COMPILE, OURS_COMPILE: REF_COMPILE,
}  # fmt: skip


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """64 pairs: [0, 1] RGB images; token ids with [CLS] ... [SEP] and padding, 16-64 tokens long."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    ids = torch.randint(1000, VOCAB, (BATCH, TEXT_LENGTH), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate(torch.randint(16, TEXT_LENGTH + 1, (BATCH,), generator=g).tolist()):
        ids[row, 0], ids[row, length - 1] = BOS, EOS
        ids[row, length:], mask[row, length:] = PAD, 0
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def build_reference(attention: str | None = None) -> CLIPModel:
    config = CLIPConfig(
        text_config=dict(TEXT),
        vision_config={**VISION, "image_size": IMAGE_SIZE, "num_channels": 3},
        projection_dim=EMBED_DIM,
    )
    if attention is not None:
        config._attn_implementation = attention
    return CLIPModel(config).train()


def copy_of(reference: CLIPModel, attention: str | None = None) -> CLIPModel:
    """Another CLIPModel with the same initial weights (its own optimiser state and updates)."""
    model = build_reference(attention)
    model.load_state_dict(reference.state_dict())
    return model.train()


def build_ours(reference: CLIPModel, attention: str | None = None) -> DualEncoder:
    """The same towers in medalign's DualEncoder, starting from the reference's weights."""
    extra = {} if attention is None else {"attn_implementation": attention}
    model = create_model(
        "align_clip_b16",
        vision=TowerConfig("clip_vision", config={**VISION, **extra}),
        text=TowerConfig("clip_text", config={**TEXT, **extra}),
        embed_dim=EMBED_DIM,
        projection="linear",  # nn.Linear(bias=False), as CLIP's visual_projection / text_projection
        image_size=IMAGE_SIZE,
        max_text_length=TEXT_LENGTH,
    )
    model.vision.model.load_state_dict(reference.vision_model.state_dict())
    model.text.model.load_state_dict(reference.text_model.state_dict())
    model.image_proj.load_state_dict(reference.visual_projection.state_dict())
    model.text_proj.load_state_dict(reference.text_projection.state_dict())
    with torch.no_grad():
        model.logit_scale.copy_(reference.logit_scale)
    return model.train()


class ReferenceTrainer:
    """The plain loop: forward with return_loss (optionally under bf16 autocast), backward, AdamW
    step (fused when ``bf16``: the fast setting), zero_grad."""

    def __init__(self, model: CLIPModel, batch: dict[str, torch.Tensor], bf16: bool = True) -> None:
        self.model, self.bf16 = model, bf16
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        # CLIPProcessor normalises in the data pipeline; done once here, outside the timed step.
        self.inputs = {**batch, "pixel_values": (batch["pixel_values"] - mean) / std}
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=OPTIM.lr,
            betas=tuple(OPTIM.betas),
            weight_decay=OPTIM.weight_decay,
            fused=True if bf16 else None,
        )

    def step(self) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**self.inputs, return_loss=True).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())


class MedalignTrainer:
    """``Engine._step`` for one un-accumulated batch, with Fabric's precision plugin inlined.

    Fabric's ``bf16-mixed`` on the CPU runs the module's forward under
    ``torch.autocast("cpu", torch.bfloat16)`` and converts floating outputs to fp32; ``AlignTask``
    feeds the fp32 embeddings to the loss; the engine then clips gradients (``fabric.clip_gradients``
    is ``clip_grad_norm_``), steps the optimiser, zeroes gradients to None and steps the scheduler.
    """

    def __init__(self, model: DualEncoder, batch: dict[str, torch.Tensor], bf16: bool = True) -> None:
        self.model, self.batch, self.bf16 = model, batch, bf16
        self.optimizer = build_optimizer(model, OPTIM)
        self.scheduler = build_scheduler(self.optimizer, OPTIM, total_steps=10**6)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self) -> float:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with context:
            out = self.model(**self.batch)
        loss = clip_loss(
            out["image_embeds"].float(), out["text_embeds"].float(), out["logit_scale"].float(), gather=False
        )
        loss.backward()
        if OPTIM.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, max_norm=OPTIM.grad_clip, error_if_nonfinite=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(loss.detach())


def machine() -> str:
    return benchlib.machine(
        f" ({torch.get_num_threads()} torch threads, CPU capability {torch.backends.cpu.get_cpu_capability()})",
        f", transformers {__import__('transformers').__version__}",
    )


def run(rounds: int, steps: int, warmup: int, ablations: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    batch = make_batch()
    reference = build_reference()
    setups: dict[str, Callable[[], float]] = {
        REF_SDPA: ReferenceTrainer(copy_of(reference, "sdpa"), batch).step,
        REF_EAGER: ReferenceTrainer(copy_of(reference, "eager"), batch).step,
        OURS: MedalignTrainer(build_ours(reference), batch).step,
    }
    if ablations:
        setups[OURS_SDPA] = MedalignTrainer(build_ours(reference, attention="sdpa"), batch).step
        setups[REF_FP32] = ReferenceTrainer(copy_of(reference), batch, bf16=False).step
        setups[OURS_FP32] = MedalignTrainer(build_ours(reference), batch, bf16=False).step
        compiled_reference = ReferenceTrainer(copy_of(reference), batch)
        compiled_reference.model = torch.compile(compiled_reference.model)
        setups[REF_COMPILE] = compiled_reference.step
        compiled = MedalignTrainer(build_ours(reference), batch)
        compiled.model = torch.compile(compiled.model)  # what Engine does with train.compile: true
        setups[OURS_COMPILE] = compiled.step
    n_params = sum(p.numel() for p in reference.parameters())
    print(f"{n_params / 1e6:.1f}M parameters; {machine()}", flush=True)

    first: dict[str, float] = {}
    for name, step in setups.items():
        first[name] = step()
        for _ in range(warmup - 1):
            step()
        print(f"warm-up {name}: initial loss {first[name]:.4f}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in setups}
    last: dict[str, float] = {}
    for round_index in range(rounds):
        names = list(setups) if round_index % 2 == 0 else list(reversed(setups))
        for name in names:
            start = time.perf_counter()
            for _ in range(steps):
                last[name] = setups[name]()
            rate = steps * BATCH / (time.perf_counter() - start)
            rates[name].append(rate)
            print(f"round {round_index + 1}: {name}: {rate:.1f} pairs/s, loss {last[name]:.4f}", flush=True)
    return {
        "batch": BATCH,
        "image_size": IMAGE_SIZE,
        "text_length": TEXT_LENGTH,
        "parameters": n_params,
        "warmup": warmup,
        "rounds": rounds,
        "steps": steps,
        "setups": {
            name: {"pairs_per_s": rates[name], "loss_first": first[name], "loss_last": last[name]} for name in setups
        },
        "load_average": list(os.getloadavg()),
        "machine": machine(),
    }


def render(results: dict[str, Any]) -> str:
    setups, batch = results["setups"], results["batch"]
    median = {name: statistics.median(r["pairs_per_s"]) for name, r in setups.items()}
    best = max((REF_SDPA, REF_EAGER), key=lambda name: median[name])
    median[BEST_BF16] = median[best]
    steps_each = results["warmup"] + results["rounds"] * results["steps"]
    rows = []
    for name, r in setups.items():
        rates = r["pairs_per_s"]
        versus = COMPARED_WITH[name]
        label = best if versus == BEST_BF16 else versus
        rows.append(
            f"| {name} | {median[name]:.1f} | {min(rates):.1f}–{max(rates):.1f} | {1000 * batch / median[name]:.0f} "
            f"| {median[name] / median[versus]:.2f} | {label.replace('transformers CLIPModel, ', '')} "
            f"| {r['loss_first']:.3f} → {r['loss_last']:.3f} |"
        )
    lines = [
        f"Batch {batch} pairs, {results['image_size']} px, text {results['text_length']} tokens (16–64 real, rest "
        f"padding), {results['parameters'] / 1e6:.1f}M parameters; {results['warmup']} warm-up steps, then "
        f"{results['rounds']} alternating rounds of {results['steps']} steps per setup (median). Each row's ratio "
        "is against `transformers.CLIPModel` at the same precision and compilation: bf16 rows against the faster "
        "of its two attention implementations under the same bf16 autocast with fused AdamW, fp32 rows against "
        "the naive fp32 loop, compiled rows against the compiled CLIPModel. Loss: before the first step → after "
        f"the last ({steps_each} steps on the same batch; ln {batch} = {math.log(batch):.3f} is chance). "
        f"Machine: {results['machine']}; load average before the rounds "
        f"{results['load_average'][0]:.1f}.",
        "",
        "| setup | pairs/s | range | ms/step | ÷ CLIPModel, same precision | that reference | loss |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Headline: medalign's default step is {median[OURS] / median[BEST_BF16]:.2f}x the best bf16 CLIPModel loop.",
    ]
    if REF_FP32 in median:
        lines[-1] += (
            f" Secondary (not like for like): against the naive fp32 CLIPModel loop it is "
            f"{median[OURS] / median[REF_FP32]:.2f}x, most of which is bf16 autocast, not medalign."
        )
    lines += [
        "",
        "What is trained is the same on both sides: the towers, the bias-free linear projections, the "
        "temperature and the symmetric InfoNCE. `DualEncoder` also holds token projections for local "
        "alignment (unused by this loss, so without gradients and skipped by the optimiser), normalises "
        "pixels inside `forward` (the reference gets normalised pixels), layer-norms the patch tokens "
        "and clamps the temperature at 100. How it is trained follows medalign's defaults: bf16 autocast, "
        "gradient clipping at 1.0, no weight decay on 1-D parameters and the temperature, fused AdamW.",
    ]
    return "\n".join(lines)


def blocks() -> dict[str, str]:
    return benchlib.rendered({"bench_align_step": render})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and setup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-ablations", action="store_true", help="time only the references and medalign")
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    results = run(args.rounds, args.steps, args.warmup, not args.no_ablations)
    if args.write:
        print(benchlib.publish("bench_align_step", results, render, "## Alignment training step (`benchmarks/bench_align_step.py`)"))
    else:
        print(render(json.loads(json.dumps(results))))


if __name__ == "__main__":
    main()
