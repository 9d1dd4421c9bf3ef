"""Learning tasks: what is learned, from which data, with which loss and metrics.

A task is chosen by ``task.name``; see :mod:`fedpeft.tasks.base` (the contract) and
:mod:`fedpeft.tasks.registry` (the names).  Only the registry and the contract are
imported here: a task's own module loads when the task is first built.
"""

from fedpeft.tasks.base import Batch, Evaluation, Examples, Task
from fedpeft.tasks.registry import TASKS, TaskSpec, build_task, get_task

__all__ = ["TASKS", "Batch", "Evaluation", "Examples", "Task", "TaskSpec", "build_task", "get_task"]
