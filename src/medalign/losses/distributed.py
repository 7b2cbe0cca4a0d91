"""The cross-rank gather every batch-contrastive loss depends on (open_clip's layout).

Everything here is plain torch so that a loss can be checked by hand, reused by any task,
and imported without training dependencies (open_clip's layout).

Conventions shared by every loss
--------------------------------
* ``image_embeds`` and ``text_embeds`` are ``[B_local, D]`` and already L2-normalised by the
  model. The losses do not normalise again: the model owns that step so retrieval and the
  loss see the same vectors, and normalising twice would hide a model that forgot to.
  (``local_alignment_loss`` is the exception: token features are normalised inside it.)
* ``logit_scale`` is the *already exponentiated* temperature ``t`` (a tensor, so it can be a
  learnable ``exp(log_t)`` upstream); clamping it is the model's job.
* Row ``i`` of the image batch is paired with row ``i`` of the text batch.

Distributed training (world size ``W``, the same ``B_local`` on every rank)
---------------------------------------------------------------------------
With ``gather=True`` each rank gathers the embeddings of all ranks with
:func:`gather_with_grad` and scores only *its own* rows against all ``W * B_local``
columns (open_clip's ``local_loss``); the positive of local row ``i`` sits at column
``rank * B_local + i``. Every per-rank loss is a mean over its local rows, so the mean of
the per-rank losses equals, exactly, the single-process loss on the global batch.

Gradients: the backward of ``torch.distributed.nn.functional.all_gather`` *sums* into each
rank's input the gradients of every rank's loss, so the gradient a rank sees on its
embeddings is ``sum_k dL_k/dx_r = W * d(mean_k L_k)/dx_r``, i.e. ``W`` times the
single-process gradient. DDP then *averages* parameter gradients over the ranks, which
cancels that ``W``: the parameter update equals the single-process update on the global
batch. Therefore call ``loss.backward()`` on the per-rank loss as is; do not scale it by
``W`` or ``1/W``. Without DDP, all-reduce parameter gradients with a mean, not a sum.
All ranks must call the gathered losses together (they run collectives).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor


# --------------------------------------------------------------------------- distributed helpers
def _distributed() -> bool:
    """True only when there is more than one rank to talk to, so single-process runs never pay."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_and_world() -> tuple[int, int]:
    if not _distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` over ranks along dim 0, keeping the autograd graph to every rank's input.

    A plain ``dist.all_gather`` cuts the graph, so other ranks' rows would act as constants
    and the negatives would push only one way. The differentiable gather makes each rank's
    embeddings receive the gradients that all ranks' losses put on them (see the module
    docstring for the resulting factor ``W``, which DDP's averaging cancels).
    Identity when torch.distributed is not initialised or has a single rank.
    """
    if not _distributed():
        return x
    with warnings.catch_warnings():
        # Its suggested replacement lives in a private module; the public function is stable.
        warnings.filterwarnings(
            "ignore", message=r".*nn\.functional\.all_gather is deprecated", category=FutureWarning
        )
        parts = dist_nn.all_gather(x)
    return torch.cat(parts, dim=0)


def _gather_no_grad(x: Tensor) -> Tensor:
    """Gather tensors that only define targets (labels, detached texts): no graph is needed."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
