"""The task registry: ``task.name`` is validated against it.

Adding a task is one module (a class satisfying :class:`~fedpeft.tasks.base.Task`) and
one line below; ``tests/unit/tasks`` then runs the conformance check
(:func:`fedpeft.tasks.conformance.check_task`) over it.

An entry names its class as ``"module:Class"``, imported when the task is first built:
the config validates ``task.name`` whenever it is built, and a task module pulls in
torch, transformers and datasets, which commands that only read configs or results do
not need.  A class (or any factory) works too, for a task defined elsewhere.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedpeft.settings import Section, unknown_choice
from fedpeft.tasks.base import Task
from fedpeft.tasks.lm_settings import LMConfig

if TYPE_CHECKING:  # the run config reads this registry for its choices: no import at run time
    from fedpeft.config import RunConfig


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: where its class is, and one line on what it learns."""

    target: str | Callable[[], Task]  # "module:Class", or the class / factory itself
    description: str
    # Its own run-config section, if it has settings (declared in a light module: the run
    # config imports it to know every key, without loading the task's code).
    settings: type[Section] | None = None


TASKS: dict[str, TaskSpec] = {
    "sequence-classification": TaskSpec(
        "fedpeft.tasks.classification:SequenceClassification",
        "one label per text (cross-entropy; accuracy)",
    ),
    "image-classification": TaskSpec(
        "fedpeft.tasks.image_classification:ImageClassification",
        "one label per image, a vision transformer (cross-entropy; accuracy)",
    ),
    "causal-lm": TaskSpec(
        "fedpeft.tasks.causal_lm:CausalLM",
        "instruction tuning of a causal LM (loss on response tokens; perplexity, exact match)",
        LMConfig,
    ),
}


def build_task(name: str) -> Task:
    """The task registered as ``name`` (one object per process); an unknown name is a
    :class:`~fedpeft.config.ConfigError` naming ``task.name`` and the valid choices."""
    try:
        spec = TASKS[name]
    except KeyError:
        raise unknown_choice("task.name", name, TASKS) from None
    return _build(spec)


def get_task(cfg: RunConfig) -> Task:
    """The task of the run."""
    return build_task(cfg.task.name)


@functools.cache
def _build(spec: TaskSpec) -> Task:
    factory = _resolve(spec.target) if isinstance(spec.target, str) else spec.target
    return factory()


def _resolve(target: str) -> Callable[[], Task]:
    module, _, attr = target.partition(":")
    factory: Callable[[], Task] = getattr(importlib.import_module(module), attr)
    return factory
