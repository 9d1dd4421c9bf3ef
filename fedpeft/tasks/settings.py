"""Which task a run trains (``task.name``) and how each client trains it (``train.*``).

Light (no PyTorch): the run config imports it to know every key.  A task with settings of
its own names their section in its registry entry (:class:`~fedpeft.tasks.registry.TaskSpec`,
``settings=``), as the causal LM does with ``lm.*`` (:mod:`fedpeft.tasks.lm_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpeft.settings import Section, choices, from_registry, value_range
from fedpeft.tasks.registry import TASKS


@dataclass(frozen=True)
class TaskConfig(Section, section="task"):
    """Which learning task the run trains (``fedpeft.tasks``): data formatting, loss, metrics."""

    name: str = field(default="sequence-classification", metadata=from_registry(TASKS))

    def names_with(self, settings: type[Section]) -> list[str]:
        """The registered tasks whose own settings are ``settings`` (sorted)."""
        return sorted(name for name, spec in TASKS.items() if spec.settings is settings)


@dataclass(frozen=True)
class TrainConfig(Section, section="train"):
    """Local training on each client (and evaluation batch size on the server)."""

    local_epochs: int = field(default=1, metadata=value_range(1))
    # Cap on optimizer steps per client per round (0 = no cap, run the epochs).
    max_steps: int = field(default=0, metadata=value_range(0))
    batch_size: int = field(default=16, metadata=value_range(1))
    learning_rate: float = field(default=2e-3, metadata=value_range(0.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=value_range(0.0))
    # The clients' optimizer (fresh each round): "adamw", or "sgd" (plain SGD: the update
    # stays proportional to the gradient, which keeps clients' updates aligned under
    # user-level clipping, as in DP-FedAvg; Adam's per-coordinate steps are not).
    optimizer: str = field(default="adamw", metadata=choices("adamw", "sgd"))
    eval_batch_size: int = field(default=64, metadata=value_range(1))
