"""A toy image-text task for engine tests: small enough to train in a second, with dropout and
per-sample augmentation noise so that replaying RNG state and seeds actually matters.

Run as a script (``python toy.py OUT [--steps N] [--resume]``) it trains and saves the final
weights to OUT/final.pt; the resume test kills it midway with ``--kill-at STEP``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medalign.config import OptimConfig, TrainConfig
from medalign.losses import clip_loss
from medalign.training.engine import Engine


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, dim: int = 12, vocab: int = 20, length: int = 5) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, dim, generator=g)
        self.tokens = torch.randint(1, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        noise = torch.randn(self.images.shape[1], generator=torch.Generator().manual_seed(seed)) * 0.1
        return {
            "image": self.images[index] + noise,
            "input_ids": self.tokens[index],
            "attention_mask": torch.ones_like(self.tokens[index]),
        }


def collate(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class ToyDualEncoder(nn.Module):
    def __init__(self, dim: int = 12, vocab: int = 20, embed: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(dim, 16), nn.Dropout(dropout), nn.GELU(), nn.Linear(16, embed))
        self.text = nn.EmbeddingBag(vocab, embed)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, pixel_values, input_ids, attention_mask, return_tokens=False):
        return {
            "image_embeds": F.normalize(self.image(pixel_values), dim=-1),
            "text_embeds": F.normalize(self.text(input_ids), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


class ToyTask:
    """``gathered=True`` uses medalign's clip_loss, whose negatives span every rank."""

    def __init__(self, model: nn.Module, gathered: bool = False) -> None:
        self.model = model
        self.gathered = gathered

    def embed(self, batch):
        return self.model(batch["image"], batch["input_ids"], batch["attention_mask"])

    def loss_from_embeddings(self, e, batch):
        if self.gathered:
            return {"loss": clip_loss(e["image_embeds"], e["text_embeds"], e["logit_scale"])}
        logits = e["logit_scale"] * e["image_embeds"] @ e["text_embeds"].T
        target = torch.arange(len(logits))
        return {"loss": (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2}

    def training_step(self, batch):
        return self.loss_from_embeddings(self.embed(batch), batch)


def train(
    out: Path,
    *,
    steps: int = 9,
    accumulate: int = 1,
    grad_cache: bool = True,
    resume: bool = False,
    checkpoint_every: int = 2,
    batch_size: int = 16,
    epochs: int = 3,
    precision: str = "32-true",
    gathered: bool = False,
    devices: int = 1,
    data: ToyData | None = None,
    num_workers: int = 0,
    compile: bool = False,
    kill_at: int | None = None,
):
    torch.manual_seed(0)
    model = ToyDualEncoder(dropout=0.0 if gathered else 0.1)  # dropout streams differ per rank
    task = ToyTask(model, gathered)
    engine = Engine(
        TrainConfig(
            epochs=epochs,
            max_steps=steps,
            accumulate=accumulate,
            grad_cache=grad_cache,
            precision=precision,
            checkpoint_every=checkpoint_every,
            log_every=1,
            accelerator="cpu",
            progress=False,
            seed=3,
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            compile=compile,
        ),
        OptimConfig(lr=0.05, warmup_steps=2),
        out,
    )
    if kill_at is not None:
        from faulty_cli import kill_at_step

        engine.after_step.append(kill_at_step(kill_at))
    try:
        state = engine.fit(
            task, data or ToyData(), collate, batch_size=batch_size, resume=resume, num_workers=num_workers
        )
    finally:
        if devices > 1:
            engine.close()
    return model, state


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--gathered", action="store_true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL after this optimizer step")
    args = parser.parse_args()
    model, _ = train(
        args.out,
        resume=args.resume,
        gathered=args.gathered,
        accumulate=args.accumulate,
        devices=args.devices,
        compile=args.compile,
        kill_at=args.kill_at,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(model.state_dict(), args.out / "final.pt")
    sys.exit(0)
