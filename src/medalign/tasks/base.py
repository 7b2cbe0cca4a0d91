"""What a task is to the one pipeline: its name, the model it trains, and a training plan.

``medalign.pipeline.run.run_training`` knows no task by name. It prepares the run folder and
the manifest, builds the recipe's model, and asks the :class:`Task` registered under
``config.task`` for a :class:`TrainingPlan`: the object the engine steps (``training_step``,
and ``embed``/``loss_from_embeddings`` for GradCache), the train split it reads, and how the
trained model is evaluated. The pipeline hands that plan to the engine and the bundle writer.

A task lives in ``medalign/tasks/<name>.py`` (``name`` is the recipe's ``task:`` value) and
registers one instance with :func:`register_task`; :func:`get_task` imports the module on
first use, so ``medalign train`` of one task never imports the others' models.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from medalign.config import RunConfig
from medalign.data.manifest import Manifest


@dataclass
class TrainingPlan:
    """Everything task-specific the pipeline needs to train, evaluate and save a model."""

    step: Any  # what the engine steps: training_step(batch) -> {"loss": ...}
    dataset: Any  # the train split the engine reads (a ManifestDataset, or a wrapper of one)
    evaluate: Callable[[Any], dict[str, Any]]  # trained model -> metrics.json (on eval.split)
    collate: Callable[[list[Any]], dict[str, Any]] | None = None  # default: Collator of the model's tokenizer
    batch_size: int | None = None  # dataset items per batch (default data.batch_size)
    separate_images: bool = False  # the bundle takes each image as its own input (instruct's "separate")


class Task:
    """One kind of training run. Subclasses set ``name`` (and ``model_class``) and write ``plan``."""

    name: ClassVar[str]
    model_kind: ClassVar[str] = ""  # "a fusion model (fuse_adf, fuse_moe, ...)": how errors name it

    def model_class(self) -> type | None:
        """The model class the task trains (None: any); imported lazily by each task."""
        return None

    def check_model(self, model: Any, config: RunConfig) -> None:
        expected = self.model_class()
        if expected is not None and not isinstance(model, expected):
            raise ValueError(f"task {self.name} needs {self.model_kind}, not {config.model.name!r}")

    def plan(self, config: RunConfig, manifest: Manifest, model: Any, out: Path, echo: Any) -> TrainingPlan:
        """The train split, the engine's step object and the evaluation of this run."""
        raise NotImplementedError


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` the one :func:`get_task` returns for ``task.name``."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task registered as ``name``, importing ``medalign.tasks.<name>`` on first use."""
    if name not in TASKS:
        try:
            importlib.import_module(f"medalign.tasks.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"medalign.tasks.{name}":
                raise
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(known_tasks())}")
    return TASKS[name]


def known_tasks() -> list[str]:
    """The task names recipes may use (``RunConfig.task``)."""
    import typing

    return list(typing.get_args(typing.get_type_hints(RunConfig)["task"]))
