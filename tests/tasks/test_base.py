"""The task registry: every recipe task has one Task, and the pipeline names none of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medalign.config import RunConfig
from medalign.models import create_model
from medalign.tasks.base import Task, TrainingPlan, get_task, known_tasks, register_task

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", known_tasks())
def test_every_recipe_task_is_registered_under_its_name(name: str) -> None:
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name
    assert get_task(name) is task


def test_an_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'segmentt'.*segment"):
        get_task("segmentt")


def test_a_model_of_another_kind_is_refused_with_the_kind_the_task_needs() -> None:
    config = RunConfig(task="fuse")
    config.model.name = "align_tiny"
    with pytest.raises(ValueError, match=r"task fuse needs a fusion model \(fuse_adf, fuse_moe, \.\.\.\), not 'align_tiny'"):
        get_task("fuse").check_model(create_model("align_tiny"), config)


def test_a_registered_task_replaces_the_previous_one_of_its_name() -> None:
    class Probe(Task):
        name = "probe_only_in_this_test"

        def plan(self, config, manifest, model, out, echo) -> TrainingPlan:  # type: ignore[override]
            return TrainingPlan(step=None, dataset=[], evaluate=dict)

    first, second = register_task(Probe()), register_task(Probe())
    assert get_task("probe_only_in_this_test") is second is not first


def test_the_pipeline_names_no_task() -> None:
    """run.py is generic: no task name in its strings, no import of a task module."""
    source = (REPO / "src" / "medalign" / "pipeline" / "run.py").read_text(encoding="utf-8")
    names = "|".join(known_tasks())
    assert not re.search(rf"[\"']({names})[\"']", source)
    assert not re.search(rf"medalign\.tasks\.({names})\b", source)
