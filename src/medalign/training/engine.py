"""The one training loop every task runs through.

Lightning Fabric supplies devices, precision (bf16 autocast on CPU and GPU) and distribution
(DDP/FSDP, launched by ``torchrun`` or Fabric's own launcher); this module supplies what
Fabric leaves to the user and what medalign needs to be trustworthy:

* **Whole contrastive batches under accumulation** (GradCache, Gao et al. 2021): a batch is
  split into micro-batches that are embedded without a graph, the loss is computed on the
  whole batch of embeddings, and each micro-batch is then re-embedded with a graph and
  back-propagated with the cached embedding gradients. Every negative of the effective batch
  counts, while activations of only one micro-batch live at a time. The RNG state of each
  micro-batch is replayed so dropout draws the same mask in both passes.
* **Exact resume**: the data order and each sample's augmentation are functions of
  (seed, epoch, position), not of worker state, and the checkpoint holds the step, the
  position in the epoch, and the model, optimiser, scheduler and RNG states.
* **Faults**: checkpoints are written to a temporary file, fsynced and renamed (then the folder
  fsynced), so a kill or a full disk during a write leaves the previous one; a batch that
  cannot be loaded, in a worker or not, ends the run with one line naming the sample and why.
* Logs to CSV and TensorBoard, a progress bar, the resolved config beside the run.

A task (``medalign.tasks``) provides ``training_step(batch)``; to use GradCache it also
provides ``embed(batch)`` (per-sample tensors, via the model's ``forward``) and
``loss_from_embeddings(embeddings, batch)``.
"""

# Why one module: the one training loop; accumulation, GradCache, checkpoints, resume and logging
# interleave inside one step and share the loop's state.

from __future__ import annotations

import itertools
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from medalign.config import OptimConfig, TrainConfig
from medalign.models.param_groups import parameter_groups
from medalign.rng import RngSnapshot, load_rng_state, rng_state

CHECKPOINT_NAME = "last.ckpt"
PARTIAL_SUFFIX = ".tmp"  # a checkpoint being written; renamed into place once complete
Batch = dict[str, Any]


class Task(Protocol):
    model: nn.Module

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]: ...


def _logger_base() -> type:
    from lightning.fabric.loggers.logger import Logger

    return Logger


class AppendingCSVLogger(_logger_base()):
    """Long-format CSV (step, key, value) appended to, so a resumed run keeps its earlier rows.

    (Fabric's CSVLogger rewrites its file when a run restarts in the same folder.)
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("a", encoding="utf-8") as handle:
            if new:
                handle.write("step,key,value\n")
            for key, value in metrics.items():
                handle.write(f"{step},{key},{float(value)!r}\n")


class ResumableSampler(torch.utils.data.Sampler):
    """Seeded per-epoch permutation, split across ranks, that can start mid-epoch.

    Yields ``(index, sample_seed)`` so that a dataset can seed each sample's augmentation
    from its position in the run rather than from a worker's random stream.
    """

    def __init__(
        self, n: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.n))
        else:
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            ).tolist()
        padded = order + order[: (-len(order)) % self.world_size]  # equal share per rank
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self._order()[self.start :], start=self.start):
            yield (
                index,
                (self.seed * 1_000_003 + self.epoch * 10_007 + position * self.world_size + self.rank)
                % 2**31,
            )

    def __len__(self) -> int:
        return len(self._order()) - self.start


def streamed_batches(
    samples: Iterable[Any],
    size: int,
    collate: Callable[[list[Any]], Batch],
    *,
    skip: int = 0,
    drop_last: bool = True,
) -> Iterator[Batch]:
    """Batches of a sample stream (a shard dataset's loader), after skipping ``skip`` samples.

    Batching here rather than in the workers keeps every batch whole whatever the worker count
    (a worker's last partial batch would otherwise give ranks different step counts), and
    skipping by samples resumes mid-epoch: a shard stream's samples and augmentations do not
    depend on where reading started.
    """
    stream = itertools.islice(iter(samples), skip, None)
    while chunk := list(itertools.islice(stream, size)):
        if len(chunk) < size and drop_last:
            return
        yield collate(chunk)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over ``medalign.models.param_groups``: no decay on 1-D parameters, per-part learning rates."""
    groups = parameter_groups(model, config.lr, config.weight_decay, config.lr_multipliers, config.layer_decay)
    kwargs = {"lr": config.lr, "betas": tuple(config.betas), "eps": config.eps}
    try:
        # One fused kernel per step instead of about ten ops per tensor (on the CPU, where
        # torch's default is that per-tensor loop, the step takes a third of the time); same update.
        return torch.optim.AdamW(groups, **kwargs, fused=True)
    except (RuntimeError, ValueError):  # torch < 2.4 has no fused CPU kernel
        return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Micro-batches along dim 0; tensors are chunked, lists sliced, anything else shared."""
    size = next(len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list)))
    bounds = np.linspace(0, size, parts + 1).astype(int)
    return [
        {k: v[lo:hi] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}
        for lo, hi in itertools.pairwise(bounds)
    ]


class Engine:
    """Runs a task's training steps with Fabric; see the module docstring for what it guarantees."""

    def __init__(
        self, train: TrainConfig, optim: OptimConfig, out_dir: str | os.PathLike, fabric: Any = None
    ) -> None:
        from lightning.fabric import Fabric
        from lightning.fabric.loggers import TensorBoardLogger

        self.train, self.optim = train, optim
        self.out_dir = Path(out_dir)
        if fabric is None:
            loggers = [
                AppendingCSVLogger(self.out_dir / "logs" / "metrics.csv"),
                TensorBoardLogger(self.out_dir, name="tb", version=""),
            ]
            fabric = Fabric(
                accelerator=train.accelerator,
                devices=train.devices,
                num_nodes=train.num_nodes,
                strategy=train.strategy,
                precision=train.precision,
                loggers=loggers,
            )
            fabric.launch()
        self.fabric = fabric
        # called with the step number after every optimizer step and its checkpoint; the loop
        # itself has no test hooks (the resume tests append one that kills the process)
        self.after_step: list[Callable[[int], None]] = []
        if train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / CHECKPOINT_NAME

    def fit(
        self,
        task: Task,
        dataset: torch.utils.data.Dataset,
        collate: Callable[[list[Any]], Batch],
        *,
        batch_size: int,
        num_workers: int = 0,
        drop_last: bool = True,
        resume: bool = False,
        on_epoch_end: Callable[[int], dict[str, float]] | None = None,
    ) -> TrainState:
        fabric, cfg = self.fabric, self.train
        fabric.seed_everything(cfg.seed, verbose=False)
        if batch_size % (fabric.world_size * cfg.accumulate):
            raise ValueError(
                f"batch size {batch_size} must be divisible by {fabric.world_size} processes x "
                f"{cfg.accumulate} micro-batches: it is the global contrastive batch"
            )
        local_batch = batch_size // fabric.world_size
        streamed = isinstance(dataset, torch.utils.data.IterableDataset)
        sampler = None
        if streamed:  # shards: the dataset splits itself over ranks and workers
            dataset.set_distributed(fabric.global_rank, fabric.world_size)
            per_rank = len(dataset)
        else:
            sampler = ResumableSampler(
                len(dataset), seed=cfg.seed, rank=fabric.global_rank, world_size=fabric.world_size
            )
            per_rank = len(sampler)
        steps_per_epoch = per_rank // local_batch if drop_last else math.ceil(per_rank / local_batch)
        if steps_per_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} samples is smaller than one batch of {batch_size}")
        total_steps = min(cfg.max_steps or 10**12, cfg.epochs * steps_per_epoch)
        # train() explicitly: models keep frozen towers in eval mode (no dropout) only through their
        # train(), and a freshly built module is in train mode without having called it
        task.model.train()
        optimizer = build_optimizer(task.model, self.optim)
        scheduler = build_scheduler(optimizer, self.optim, total_steps)
        if cfg.compile:  # Fabric unwraps it, wraps the plain module (DDP, precision) and recompiles
            task.model = torch.compile(task.model)
        task.model, optimizer = fabric.setup(task.model, optimizer)
        state = TrainState()
        if fabric.global_rank == 0:
            remove_partial_writes(self.checkpoint_path)
        if resume and self.checkpoint_path.is_file():
            state = self._load_checkpoint(task.model, optimizer, scheduler)
            fabric.print(f"resumed from {self.checkpoint_path} at step {state.step}")
        progress = self._progress(total_steps, state.step)
        while state.step < total_steps and state.epoch < cfg.epochs:
            start = state.batch_in_epoch * local_batch
            # its own generator: creating a loader must not draw from the global RNG, or a resumed
            # run (which creates one more loader) would draw different dropout masks
            generator = torch.Generator().manual_seed(cfg.seed * 7919 + state.epoch)
            if sampler is None:  # a streamed (sharded) dataset: batches are formed after the workers
                dataset.set_epoch(state.epoch)
                loader = streamed_batches(
                    torch.utils.data.DataLoader(
                        dataset, batch_size=None, num_workers=num_workers, generator=generator
                    ),
                    local_batch,
                    collate,
                    skip=start,
                    drop_last=drop_last,
                )
            else:
                sampler.set_epoch(state.epoch, start=start)
                loader = torch.utils.data.DataLoader(
                    dataset,
                    batch_size=local_batch,
                    sampler=sampler,
                    num_workers=num_workers,
                    collate_fn=collate,
                    drop_last=drop_last,
                    persistent_workers=False,
                    generator=generator,
                )
            failure = LoadingFailure(dataset, sampler, local_batch, state)
            try:
                finished = self._run_epoch(
                    task, optimizer, scheduler, failure.guard(loader), state, total_steps, progress
                )
            except RuntimeError as err:  # a worker that dies mid-step is reported by a SIGCHLD handler
                if isinstance(err, DataLoadingError) or not _worker_died(err):
                    raise
                raise failure.error(err, during_step=True) from err
            if not finished:
                break
            state.epoch += 1
            state.batch_in_epoch = 0
            if on_epoch_end is not None:
                metrics = on_epoch_end(state.epoch)
                fabric.log_dict({f"val/{k}": v for k, v in metrics.items()}, step=state.step)
        if progress is not None:
            progress.close()
        for logger in fabric.loggers:
            logger.finalize("success")
        fabric.barrier()
        return state

    def close(self) -> None:
        """Tear down the process group this engine joined.

        Gloo keeps worker threads alive; a process that exits with the group still open can abort
        with "terminate called without an active exception" on some ranks.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.fabric.barrier()
            dist.destroy_process_group()

    def _run_epoch(
        self,
        task: Task,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        batches: Iterator[Batch],
        state: TrainState,
        total_steps: int,
        progress: Any,
    ) -> bool:
        """Train on the epoch's remaining batches; False when ``total_steps`` ended it early."""
        cfg = self.train
        for batch in batches:
            logs = self._step(task, optimizer, scheduler, batch)
            state.step += 1
            state.batch_in_epoch += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{logs['loss']:.4f}")
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                logs |= {"lr": scheduler.get_last_lr()[0], "epoch": state.epoch}
                self.fabric.log_dict({f"train/{k}": v for k, v in logs.items()}, step=state.step)
                state.history.append({"step": state.step, **logs})
            if state.step % cfg.checkpoint_every == 0 or state.step == total_steps:
                self._save_checkpoint(task.model, optimizer, scheduler, state)
            for hook in self.after_step:
                hook(state.step)
            if state.step >= total_steps:
                return False
        return True

    def _step(
        self, task: Task, optimizer: torch.optim.Optimizer, scheduler: Any, batch: Batch
    ) -> dict[str, float]:
        cfg, fabric = self.train, self.fabric
        use_cache = cfg.grad_cache and cfg.accumulate > 1 and hasattr(task, "embed")
        if use_cache:
            logs = self._grad_cache_step(task, batch)
        else:
            logs = {}
            chunks = split_batch(batch, cfg.accumulate)
            for i, chunk in enumerate(chunks):
                with fabric.no_backward_sync(task.model, enabled=i < len(chunks) - 1):
                    out = task.training_step(chunk)
                    fabric.backward(out["loss"] / len(chunks))
                for key, value in out.items():
                    logs[key] = logs.get(key, 0.0) + float(value.detach()) / len(chunks)
        if self.optim.grad_clip:
            fabric.clip_gradients(
                task.model, optimizer, max_norm=self.optim.grad_clip, error_if_nonfinite=False
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return logs

    def _grad_cache_step(self, task: Any, batch: Batch) -> dict[str, float]:
        """GradCache: embed without a graph, loss on the whole batch, re-embed and back-propagate.

        Scalars that ``embed`` returns (the logit scale and bias) enter the loss once; their
        cached gradient is pushed back through the last micro-batch's forward so that every
        parameter's gradient passes through the model's ``forward`` (which DDP requires).
        """
        fabric = self.fabric
        chunks = split_batch(batch, self.train.accumulate)
        rng_states, cached = [], []
        with torch.no_grad():
            for chunk in chunks:
                rng_states.append(RngSnapshot.capture(fabric.device))
                cached.append({k: v.detach().float() for k, v in task.embed(chunk).items() if v is not None})
        leaves = {
            k: (cached[0][k] if cached[0][k].ndim == 0 else torch.cat([c[k] for c in cached]))
            .clone()
            .requires_grad_(True)
            for k in cached[0]
        }
        out = task.loss_from_embeddings(leaves, batch)
        fabric.backward(out["loss"])
        grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
        offset = 0
        for i, (chunk, rng) in enumerate(zip(chunks, rng_states, strict=True)):
            last = i == len(chunks) - 1
            size = len(next(v for v in cached[i].values() if v.ndim > 0))
            with rng.replay(), fabric.no_backward_sync(task.model, enabled=not last):
                embeddings = task.embed(chunk)
                terms = []
                for key, grad in grads.items():
                    value = embeddings[key].float()
                    if value.ndim == 0:
                        if last:
                            terms.append(value * grad)
                    else:
                        terms.append((value * grad[offset : offset + size]).sum())
                fabric.backward(torch.stack(terms).sum())
            offset += size
        return {k: float(v.detach()) for k, v in out.items()}

    def _progress(self, total: int, start: int) -> Any:
        if not self.train.progress or self.fabric.global_rank != 0:
            return None
        from medalign.progress import progress_bar

        return progress_bar(total=total, initial=start, desc="train")

    def drop_checkpoints(self) -> None:
        """Delete the optimiser checkpoint of a finished run (its bundle holds the weights)."""
        if self.fabric.global_rank != 0:
            return
        self.checkpoint_path.unlink(missing_ok=True)
        remove_partial_writes(self.checkpoint_path)
        folder = self.checkpoint_path.parent
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def _save_checkpoint(self, model: nn.Module, optimizer: Any, scheduler: Any, state: TrainState) -> None:
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "rng": rng_state(self.fabric.device),
            "python_rng": _python_rng_state(),
            "numpy_rng": _numpy_rng_state(),
            "history": state.history,
        }
        if self.fabric.global_rank == 0:
            write_checkpoint(self.checkpoint_path, payload)
        self.fabric.barrier()

    def _load_checkpoint(self, model: nn.Module, optimizer: Any, scheduler: Any) -> TrainState:
        try:
            payload = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:  # written atomically, so only a copy or a failing disk truncates it
            raise RuntimeError(
                f"cannot resume: checkpoint {self.checkpoint_path} is unreadable ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:300]}); delete it to train from the start"
            ) from err
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if "rng" in payload:
            load_rng_state(payload["rng"], self.fabric.device)
        else:  # a checkpoint written before accelerator states were saved: the CPU state only
            torch.set_rng_state(payload["torch_rng"])
        _restore_python_rng(payload["python_rng"])
        _restore_numpy_rng(payload["numpy_rng"])
        return TrainState(
            payload["step"], payload["epoch"], payload["batch_in_epoch"], list(payload["history"])
        )


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` so that ``path`` holds either its old or its complete new bytes, whatever happens.

    The payload goes to a temporary file beside ``path``, which is flushed and fsynced before
    ``os.replace`` puts it in place; the folder is then fsynced so the rename survives a power
    cut. A kill mid-write leaves only the temporary (removed by the next run, never read). A
    failed write (ENOSPC: the disk is full) removes the temporary and raises a RuntimeError
    naming ``path`` and the OS's reason; the previous checkpoint is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    recorder: _WriteRecorder | None = None
    try:
        with tmp.open("wb") as handle:
            recorder = _WriteRecorder(handle)
            torch.save(payload, recorder)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        reason = recorder.error if recorder is not None and recorder.error else err
        raise RuntimeError(
            f"cannot write checkpoint {path}: {reason}; the previous checkpoint is kept"
        ) from reason
    except BaseException:  # KeyboardInterrupt: no half-written file left behind either
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


class _WriteRecorder:
    """A file's ``write`` that keeps the OSError it raised.

    ``torch.save`` reports a failed write as an opaque RuntimeError ("unexpected pos ..."),
    losing the OS's reason (ENOSPC, EIO, quota); this keeps it for the message.
    """

    def __init__(self, handle: Any) -> None:
        self.handle, self.error = handle, None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def remove_partial_writes(path: Path) -> None:
    """Delete temporaries of ``path`` that a killed process left behind (never read: only renamed)."""
    for partial in path.parent.glob(f"{path.name}.*{PARTIAL_SUFFIX}"):
        partial.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is all there is
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems refuse fsync on a directory; the data itself is synced
        pass
    finally:
        os.close(descriptor)


class DataLoadingError(RuntimeError):
    """A training batch could not be loaded; the message names the sample or the worker, and why."""


WORKER_DIED = "DataLoader worker (pid"  # torch's message when a worker process exits or is killed
_WORKER_RERAISED = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.")


def _worker_died(err: BaseException) -> bool:
    return WORKER_DIED in str(err)


class LoadingFailure:
    """Turns a failure to load one of an epoch's batches into a one-line :class:`DataLoadingError`.

    A sample's own error raised in a worker reaches the main process as the worker's whole
    traceback in one message; its last line (which names the case and file) is kept. A worker
    that died (killed by the OS, often out of memory) leaves only its pid: the message adds the
    cases of the batch being waited for, from the sampler's order.
    """

    def __init__(
        self, dataset: Any, sampler: ResumableSampler | None, batch_size: int, state: TrainState
    ) -> None:
        self.dataset, self.sampler, self.batch_size, self.state = dataset, sampler, batch_size, state

    def guard(self, loader: Any) -> Iterator[Batch]:
        """The loader's batches; an error while loading one is raised as a DataLoadingError."""
        try:
            yield from loader
        except Exception as err:
            raise self.error(err) from err

    def error(self, err: BaseException, *, during_step: bool = False) -> DataLoadingError:
        """``during_step``: raised while a batch trained, so the failed load is of a later one."""
        pending = self.state.batch_in_epoch + int(during_step)
        where = f"cannot load training batch {pending + 1} of epoch {self.state.epoch + 1}"
        text = str(err).strip()
        reraised = _WORKER_RERAISED.match(text)
        if reraised:
            kind, worker = reraised.groups()
            last = text.splitlines()[-1]
            message = re.sub(rf"^[\w.]*{kind}: ", "", last)
            return DataLoadingError(f"{where} in DataLoader worker {worker}: {kind}: {message}")
        if _worker_died(err):
            return DataLoadingError(
                f"{where}: {' '.join(text.split())} while it loaded {self.cases(pending)} or a later batch. "
                "A worker killed by the system is usually out of memory: lower data.num_workers or "
                "data.batch_size; data.num_workers=0 shows a failing sample's own error"
            )
        return DataLoadingError(f"{where}: {type(err).__name__}: {' '.join(text.split())}")

    def cases(self, batch: int) -> str:
        """The epoch's ``batch``: its case ids when the dataset knows them, else its indices."""
        if self.sampler is None:  # streamed from shards: no index order to look up
            return f"batch {batch + 1} of the stream"
        order = self.sampler._order()
        first = batch * self.batch_size
        indices = order[first : first + self.batch_size]
        name = getattr(self.dataset, "case_id", None)
        return f"cases {[name(i) for i in indices]}" if callable(name) else f"samples {indices}"


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_python_rng(state: list[Any]) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _restore_numpy_rng(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached"]))


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 2)
