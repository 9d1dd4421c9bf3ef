"""The run's model as its task needs it: the backbone loaded as the task's kind."""

from __future__ import annotations

from fedpeft.config import RunConfig
from fedpeft.models import FedModel, get_model
from fedpeft.tasks.base import Task
from fedpeft.tasks.registry import get_task


def task_model(cfg: RunConfig, task: Task | None = None) -> FedModel:
    """The per-process model of ``cfg`` with the head of its task (built once, then reused)."""
    task = task or get_task(cfg)
    return get_model(cfg, task.num_outputs(cfg), task.model_kind)
