"""Stage I training-step throughput: the hybrid MAE against a plain MAE and HF ViTMAE, same run.

    OMP_NUM_THREADS=1 python benchmarks/bench_pretrain.py [--steps 10] [--warmup 2] [--batch 16]

Protocol: one process, ``torch.set_num_threads(1)``, bf16 autocast, random 224 px RGB images
(the same batch for every model), the same ViT-Small/16 encoder (384 wide, 12 layers, 6 heads,
MLP 1536), a 4 x 256 decoder (8 heads, MLP 1024), mask ratio 0.75, norm-pix loss, AdamW (fused
where available). A step is forward + backward + optimizer step + zero_grad. Each model gets
``--warmup`` untimed steps, then ``--steps`` timed steps are taken in rounds that alternate the
order of the models (so drift on a shared machine hits all of them alike); throughput is input
images per second from the median step time. Models:

* ``hybrid``: ours, ``views: augment`` (two augmented views of each image, each masked, plus the
  contrastive InfoNCE on the encoder embeddings): the Stage I recipe's step;
* ``plain``: ours with ``contrastive_weight 0`` and one view: a plain MAE step;
* ``hf_vitmae``: ``transformers.ViTMAEForPreTraining`` with the same sizes and mask ratio (the
  reference; its default SDPA attention).

The table (ratios against the HF reference) is printed and written to
``benchmarks/results/bench_pretrain.json`` with the protocol.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from medalign.config import OptimConfig, PretrainLossConfig
from medalign.models import create_model
from medalign.tasks.pretrain import PretrainTask
from medalign.training.engine import build_optimizer

ENCODER = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536}
DECODER = {"dim": 256, "depth": 4, "heads": 8}
MASK_RATIO = 0.75
SIZE = 224
RESULTS = Path(__file__).resolve().parent / "results" / "bench_pretrain.json"


def ours(contrastive: bool) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    model = create_model(
        "mae_vit_b16",
        vision={"config": {**ENCODER, "patch_size": 16}},
        image_size=SIZE,
        in_channels=3,
        mask_ratio=MASK_RATIO,
        decoder_dim=DECODER["dim"],
        decoder_depth=DECODER["depth"],
        decoder_heads=DECODER["heads"],
    ).train()
    loss = PretrainLossConfig(views="augment", contrastive_weight=0.1 if contrastive else 0.0)
    task = PretrainTask(model, loss, ["image"])

    def step(images: torch.Tensor) -> torch.Tensor:
        if contrastive:
            return task.training_step({"image": images})["loss"]
        return model(images)["loss"]  # one view, reconstruction only

    return model, step


def hf_reference() -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        **ENCODER,
        image_size=SIZE,
        patch_size=16,
        num_channels=3,
        decoder_hidden_size=DECODER["dim"],
        decoder_num_hidden_layers=DECODER["depth"],
        decoder_num_attention_heads=DECODER["heads"],
        decoder_intermediate_size=4 * DECODER["dim"],
        mask_ratio=MASK_RATIO,
        norm_pix_loss=True,
    )
    model = ViTMAEForPreTraining(config).train()
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)

    def step(images: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=(images - mean) / 0.5).loss

    return model, step


def timed_step(model: torch.nn.Module, step: Callable, optimizer: torch.optim.Optimizer, images) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step(images)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--write", action="store_true", help="rewrite the section in BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, SIZE, SIZE)
    builders = {"hybrid": lambda: ours(True), "plain": lambda: ours(False), "hf_vitmae": hf_reference}
    runs = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        model, step = build()
        optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
        params = sum(p.numel() for p in model.parameters())
        runs[name] = {"model": model, "step": step, "optimizer": optimizer, "times": [], "params": params}
    start = time.perf_counter()
    for run in runs.values():
        for _ in range(args.warmup):
            timed_step(run["model"], run["step"], run["optimizer"], images)
    order = list(runs)
    for round_index in range(args.steps):
        for name in order if round_index % 2 == 0 else order[::-1]:
            run = runs[name]
            run["times"].append(timed_step(run["model"], run["step"], run["optimizer"], images))
    wall = time.perf_counter() - start
    reference = statistics.median(runs["hf_vitmae"]["times"])
    rows = []
    for name, run in runs.items():
        median = statistics.median(run["times"])
        rows.append(
            {
                "model": name,
                "params_M": round(run["params"] / 1e6, 2),
                "step_s_median": round(median, 3),
                "step_s_all": [round(t, 3) for t in run["times"]],
                "images_per_s": round(args.batch / median, 2),
                "vs_hf": round(reference / median, 3),
            }
        )
    print("| model | params (M) | step (s, median) | images/s | vs HF ViTMAE |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['params_M']} | {row['step_s_median']} | {row['images_per_s']} "
            f"| {row['vs_hf']:.2f}x |"
        )
    protocol = {
        "encoder": ENCODER,
        "patch_size": 16,
        "decoder": DECODER,
        "mask_ratio": MASK_RATIO,
        "image_size": SIZE,
        "channels": 3,
        "batch": args.batch,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "order": "alternating per round",
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast (CPU)",
        "step": "forward + backward + AdamW step + zero_grad",
        "hybrid": "2 augmented views per image, each masked, + 0.1 x InfoNCE (T 0.1) on encoder embeddings",
        "plain": "1 view, reconstruction only (same model)",
        "images_per_s": "input images (batch) / median step time",
        "wall_s": round(wall, 1),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"wall {wall:.0f}s; written {RESULTS}")
    if args.write:
        write_section(rows, args)


LABELS = {
    "hybrid": "medalign hybrid (2 augmented views + InfoNCE on encoder embeddings)",
    "plain": "medalign plain MAE (same model, 1 view, no contrastive term)",
    "hf_vitmae": "HF `ViTMAEForPreTraining` (reference)",
}


def write_section(rows: list[dict], args: argparse.Namespace) -> None:
    import benchlib

    table = "\n".join(
        f"| {LABELS[r['model']]} | {r['step_s_median']:.3f} | {r['images_per_s']:.2f} | {r['vs_hf']:.2f}x |"
        for r in rows
    )
    body = (
        f"One training step (forward + backward + AdamW step) on one fixed batch of {args.batch} random RGB "
        f"images at {SIZE} px, ViT-S/16 encoder (384 wide, 12 layers, 6 heads, MLP 1536), MAE decoder 4 x 256 "
        f"(8 heads), mask ratio {MASK_RATIO}, norm-pix loss; bf16 autocast on the CPU, 1 torch thread; "
        f"{args.warmup} warm-up steps then {args.steps} timed steps with the three models alternating each "
        f"round; images/s = {args.batch} / median step. Reference: Hugging Face `ViTMAEForPreTraining` with "
        "the same encoder/decoder sizes and mask ratio, in the same run (per-step times in "
        f"`benchmarks/results/bench_pretrain.json`). Machine: {benchlib.machine()}.\n\n"
        "| model | step (s, median) | images/s | vs HF ViTMAE |\n|---|---|---|---|\n" + table + "\n\n"
        "The hybrid step encodes and decodes two views of every image, so it costs about 2x a plain step "
        "per input image."
    )
    benchlib.replace_section(
        body,
        "<!-- bench_pretrain:begin -->",
        "<!-- bench_pretrain:end -->",
        "## Stage I throughput: hybrid MAE vs a plain MAE step of the same ViT (`benchmarks/bench_pretrain.py`)",
    )


if __name__ == "__main__":
    main()
