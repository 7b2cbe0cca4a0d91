"""Training throughput of one alignment step: medalign's dual encoder vs transformers' CLIPModel.

Both sides train the same architecture on the same batch: CLIP vision and text towers built
from identical configs (ViT 384 wide, 6 layers, 6 heads, patch 16 at 128 px; text transformer
256 wide, 4 layers, 4 heads, 64 tokens, MiniLM's 30522-token vocabulary), linear projections
without bias to a 256-d space, a learnable temperature, and the symmetric InfoNCE loss over
64 image-text pairs. The medalign model starts from the reference's weights.

* **reference**: ``transformers.CLIPModel(CLIPConfig(...))`` in fp32 with its default
  attention (SDPA), ``return_loss=True``, ``loss.backward()``, ``torch.optim.AdamW``,
  ``zero_grad()``: the plain PyTorch loop.
* **medalign**: ``create_model("align_clip_b16", vision=..., text=...)`` with the same tower
  configs, trained as ``medalign.training.engine.Engine`` trains it with the default precision
  (``bf16-mixed``: CPU autocast to bfloat16 around the model's forward, embeddings back to
  fp32), ``medalign.losses.clip_loss``, ``medalign.training.engine.build_optimizer`` (fused AdamW, no
  decay on 1-D parameters), gradient clipping at 1.0 (``OptimConfig.grad_clip``), the
  scheduler step, ``zero_grad(set_to_none=True)``. The engine itself is not driven: its data
  loader, logging and checkpoints are not part of a step's cost.

Three ablations of the medalign side show where its speed comes from: the same step with the
towers on transformers' SDPA attention (PyTorch's fused CPU kernel, slow in bf16), the same
step in fp32, and the same step with the model under ``torch.compile`` (``train.compile``).

After 3 warm-up steps each, rounds of ``--steps`` steps alternate between the setups (the
order reversed every other round) so that load on a shared machine hits all alike; the
median of the rounds is reported. Every setup trains its own model on the same batch, so the
losses before and after show that each one learns.

    python benchmarks/bench_align_step.py [--rounds 5] [--steps 5] [--no-ablations] [--write]

``--write`` replaces the section between the bench_align_step markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from transformers import CLIPConfig, CLIPModel

import benchlib
from benchlib import replace_section
from medalign.config import OptimConfig
from medalign.losses import clip_loss
from medalign.models import DualEncoder, TowerConfig, create_model
from medalign.training.engine import build_optimizer, build_scheduler

SECTION_BEGIN, SECTION_END = "<!-- bench_align_step:begin -->", "<!-- bench_align_step:end -->"
HEADING = "## Alignment training step (`benchmarks/bench_align_step.py`)"
PROTOCOL = """\
One optimisation step of image-text alignment on a batch of 64 pairs, CLIP-style towers
(ViT 384 wide x 6 layers at 128 px, patch 16; text 256 wide x 4 layers, 64 tokens) with identical
configs and initial weights on both sides. Reference: `transformers.CLIPModel` with
`return_loss=True` and `torch.optim.AdamW`, fp32, the plain PyTorch loop. medalign: the same
towers in `DualEncoder` (`create_model("align_clip_b16", ...)`), trained as `Engine` trains it
(bf16 autocast, `clip_loss`, `build_optimizer`, gradient clipping, scheduler). Rounds alternate
between the setups; the median is reported."""

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
REFERENCE = "transformers CLIPModel, fp32, torch AdamW"
OURS = "medalign DualEncoder, as the Engine trains it (bf16)"
OURS_SDPA = "medalign, towers on torch SDPA attention"
OURS_FP32 = "medalign, fp32 (precision 32-true)"
OURS_COMPILE = "medalign bf16 + torch.compile (train.compile)"


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


def build_reference() -> CLIPModel:
    config = CLIPConfig(
        text_config=dict(TEXT),
        vision_config={**VISION, "image_size": IMAGE_SIZE, "num_channels": 3},
        projection_dim=EMBED_DIM,
    )
    return CLIPModel(config).train()


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
    """The plain loop: fp32 forward with return_loss, backward, AdamW step, zero_grad."""

    def __init__(self, model: CLIPModel, batch: dict[str, torch.Tensor]) -> None:
        self.model = model
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        # CLIPProcessor normalises in the data pipeline; done once here, outside the timed step.
        self.inputs = {**batch, "pixel_values": (batch["pixel_values"] - mean) / std}
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=OPTIM.lr, betas=tuple(OPTIM.betas), weight_decay=OPTIM.weight_decay
        )

    def step(self) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and setup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-ablations", action="store_true", help="time only reference and medalign")
    parser.add_argument("--write", action="store_true", help="rewrite the section in BENCHMARKS.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    batch = make_batch()
    reference = build_reference()
    setups: dict[str, Callable[[], float]] = {
        REFERENCE: ReferenceTrainer(reference, batch).step,
        OURS: MedalignTrainer(build_ours(reference), batch).step,
    }
    if not args.no_ablations:
        setups[OURS_SDPA] = MedalignTrainer(build_ours(reference, attention="sdpa"), batch).step
        setups[OURS_FP32] = MedalignTrainer(build_ours(reference), batch, bf16=False).step
        compiled = MedalignTrainer(build_ours(reference), batch)
        compiled.model = torch.compile(compiled.model)  # what Engine does with train.compile: true
        setups[OURS_COMPILE] = compiled.step
    n_params = sum(p.numel() for p in reference.parameters())
    print(f"{n_params / 1e6:.1f}M parameters; {machine()}", flush=True)

    first: dict[str, float] = {}
    for name, step in setups.items():
        first[name] = step()
        for _ in range(args.warmup - 1):
            step()
        print(f"warm-up {name}: initial loss {first[name]:.4f}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in setups}
    last: dict[str, float] = {}
    for round_index in range(args.rounds):
        names = list(setups) if round_index % 2 == 0 else list(reversed(setups))
        for name in names:
            start = time.perf_counter()
            for _ in range(args.steps):
                last[name] = setups[name]()
            rate = args.steps * BATCH / (time.perf_counter() - start)
            rates[name].append(rate)
            print(f"round {round_index + 1}: {name}: {rate:.1f} pairs/s, loss {last[name]:.4f}", flush=True)

    medians = {name: statistics.median(r) for name, r in rates.items()}
    steps_each = args.warmup + args.rounds * args.steps
    rows = [
        f"| {name} | {medians[name]:.1f} | {min(r):.1f}–{max(r):.1f} | {1000 * BATCH / medians[name]:.0f} "
        f"| {medians[name] / medians[REFERENCE]:.2f} | {first[name]:.3f} → {last[name]:.3f} |"
        for name, r in rates.items()
    ]
    body = "\n".join(
        [
            f"Batch {BATCH} pairs, {IMAGE_SIZE} px, text {TEXT_LENGTH} tokens (16–64 real, rest padding), "
            f"{n_params / 1e6:.1f}M parameters; {args.warmup} warm-up steps, then {args.rounds} alternating "
            f"rounds of {args.steps} steps per setup (median). Loss: before the first step → after the "
            f"last ({steps_each} steps on the same batch; ln {BATCH} = {torch.log(torch.tensor(BATCH)):.3f} "
            f"is chance). Machine: {machine()}.",
            "",
            "| setup | pairs/s | range | ms/step | ÷ reference | loss |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "What is trained is the same on both sides: the towers, the bias-free linear projections, the "
            "temperature and the symmetric InfoNCE. `DualEncoder` also holds token projections for local "
            "alignment (unused by this loss, so without gradients and skipped by the optimiser), normalises "
            "pixels inside `forward` (the reference gets normalised pixels), layer-norms the patch tokens "
            "and clamps the temperature at 100. How it is trained follows medalign's defaults: bf16 autocast, "
            "gradient clipping at 1.0, no weight decay on 1-D parameters and the temperature, fused AdamW.",
        ]
    )
    print(body)
    ratio = medians[OURS] / medians[REFERENCE]
    print(f"medalign / reference: {ratio:.2f}x ({'meets' if ratio >= 2 else 'below'} the 2x target)")
    if args.write:
        replace_section(body, SECTION_BEGIN, SECTION_END, f"{HEADING}\n\n{PROTOCOL}")


if __name__ == "__main__":
    main()
