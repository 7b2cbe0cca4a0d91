"""Two CPU ranks (gloo, loopback only) must train exactly like one process on the whole batch.

Each rank holds half of a fixed global batch, runs the gathered loss and its backward, and
then does what DDP does: all-reduce the parameter gradients and divide by the world size.
Checked against a single process on the full batch:

(a) the mean of the per-rank losses equals the single-process loss;
(b) the DDP-averaged parameter gradients equal the single-process gradients;
(c) the gradient on a rank's own embeddings is ``world_size`` times the single-process
    gradient of those rows: the differentiable all-gather sums every rank's loss into it,
    and (b) shows DDP's averaging cancels that factor (convention documented in losses.py).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medalign.losses import ContrastiveLoss, clip_loss, dcl_loss, siglip_loss

WORLD = 2
B_LOCAL = 3
D_IN, D = 5, 4
CASES = ("clip", "siglip", "dcl", "clip_labels", "clip_text")
PARAM_NAMES = ("w_img", "w_txt", "log_scale", "bias")
# duplicates across ranks (0 and 1) and an unknown (-1), so label targets span both halves
LABELS = torch.tensor([0, 1, 2, 0, -1, 1])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=torch.float64)
    return x_img, x_txt


def _params() -> dict[str, torch.Tensor]:
    """The same initial parameters on every rank, as DDP guarantees by broadcasting them."""
    g = torch.Generator().manual_seed(1)
    return {
        "w_img": torch.randn(D_IN, D, generator=g, dtype=torch.float64).requires_grad_(True),
        "w_txt": torch.randn(D_IN, D, generator=g, dtype=torch.float64).requires_grad_(True),
        "log_scale": torch.tensor(1.5, dtype=torch.float64, requires_grad=True),
        "bias": torch.tensor(-2.0, dtype=torch.float64, requires_grad=True),
    }


def _loss(
    case: str, params: dict[str, torch.Tensor], rows: slice
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_img, x_txt = _batch()
    image = F.normalize(x_img[rows] @ params["w_img"], dim=-1)
    text = F.normalize(x_txt[rows] @ params["w_txt"], dim=-1)
    image.retain_grad()
    text.retain_grad()
    scale = params["log_scale"].exp()
    if case == "clip":
        loss = clip_loss(image, text, scale)
    elif case == "siglip":
        loss = siglip_loss(image, text, scale, params["bias"])
    elif case == "dcl":
        loss = dcl_loss(image, text, scale)
    else:
        mode = "labels" if case == "clip_labels" else "text"
        outputs = {"image_embeds": image, "text_embeds": text, "logit_scale": scale}
        criterion = ContrastiveLoss("clip", soft_targets=mode, soft_target_temperature=0.5)
        loss = criterion(outputs, LABELS[rows])["loss"]
    return loss, image, text


def _grads(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in params.items()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = {}
        for case in CASES:
            params = _params()
            loss, image, text = _loss(case, params, rows)
            loss.backward()
            grads = _grads(params)
            for g in grads.values():  # what DDP does with parameter gradients
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= world
            results[case] = {"loss": loss.detach(), "grads": grads, "image": image.grad, "text": text.grad}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
def test_two_ranks_match_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Spawned children unpickle _worker by module name: put the root of that name on the
    # path they inherit, whatever import mode pytest used.
    depth = _worker.__module__.count(".")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[depth]))
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for case in CASES:
        params = _params()
        loss, image, text = _loss(case, params, slice(None))
        loss.backward()
        ref_grads = _grads(params)

        rank_losses = [ranks[r][case]["loss"].item() for r in range(WORLD)]
        assert sum(rank_losses) / WORLD == pytest.approx(loss.item(), abs=1e-9), case
        assert rank_losses[0] != pytest.approx(rank_losses[1]), case  # the halves really differ
        for name in PARAM_NAMES:
            for r in range(WORLD):
                torch.testing.assert_close(
                    ranks[r][case]["grads"][name], ref_grads[name], atol=1e-9, rtol=0, msg=f"{case}/{name}"
                )
        assert ref_grads["w_img"].abs().sum() > 0
        for r in range(WORLD):
            rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
            assert image.grad is not None and text.grad is not None
            torch.testing.assert_close(ranks[r][case]["image"], WORLD * image.grad[rows], atol=1e-9, rtol=0)
            torch.testing.assert_close(ranks[r][case]["text"], WORLD * text.grad[rows], atol=1e-9, rtol=0)
