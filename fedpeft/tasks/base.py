"""What a learning task is: its data, as each party holds it, its loss and its metrics.

A task is chosen by ``task.name`` (:mod:`fedpeft.tasks.registry`).  Everything else in a
run is task-agnostic: the training loop (:func:`fedpeft.training.train_local`) batches
whatever :class:`Examples` the task prepared, runs the model's forward pass on each batch
and asks the task for the loss; the server and the clients evaluate through
:meth:`Task.evaluate`.

Every method takes the run's config: a task is a stateless recipe, and whatever it
prepares (tokenized partitions, the server's test set) it caches per process, keyed by
the config, so a worker that serves many clients prepares each partition once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from fedpeft.config import RunConfig
    from fedpeft.models import FedModel

# One batch: the model's forward keyword arguments, and the targets the loss compares with.
Batch = tuple[dict[str, "torch.Tensor"], "torch.Tensor"]


class Examples(Protocol):
    """A task's prepared examples (tokenized text, image tensors, ...), ready to batch."""

    def __len__(self) -> int: ...

    def batches(self, order: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[Batch]:
        """The rows ``order`` in batches of at most ``batch_size``, on ``device``."""
        ...


@dataclass(frozen=True)
class Evaluation:
    """A model's mean loss on a set of examples, and the task's named metrics there."""

    loss: float
    # Metric name -> value; the apps record "accuracy" as the round's headline figure.
    metrics: Mapping[str, float] = field(default_factory=dict)


class Task(Protocol):
    """A learning task: data formatting, the training loss, and evaluation.

    ``fedpeft.tasks.conformance.check_task`` checks the contract on any implementation.
    """

    #: What the backbone is loaded as (``fedpeft.models.MODEL_KINDS``): "sequence-classification"
    #: (a K-way head), "causal-lm" (the LM with its own output layer) or "image-classification"
    #: (a vision transformer with a K-way head).
    model_kind: str

    # ------------------------------------------------------------------ data
    def label_names(self, cfg: RunConfig) -> tuple[str, ...]:
        """Names of the model's outputs (saved with the adapter); may be empty."""
        ...

    def num_outputs(self, cfg: RunConfig) -> int:
        """Width of the model's head (the number of classes; a causal LM's vocabulary)."""
        ...

    def client_train_size(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> int:
        """How many training examples a client holds, without preparing them (discovery)."""
        ...

    def client_train_set(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> Examples:
        """Client ``partition_id``'s training examples, prepared (cached per process)."""
        ...

    def server_test_set(self, cfg: RunConfig) -> Examples:
        """The server's held-out test examples, prepared: every reported figure uses these."""
        ...

    def server_validation_set(self, cfg: RunConfig) -> Examples:
        """The server's validation examples, for what it tunes (empty when it tunes nothing)."""
        ...

    def partition_stats(self, cfg: RunConfig) -> list[dict[str, Any]]:
        """What each client's partition holds, in partition order: at least ``partition_id``
        and ``size`` per client (``partitions.json`` of the results folder)."""
        ...

    # ------------------------------------------------------------------ objective
    # A task may also define ``forward(module, inputs, targets) -> (outputs, targets)``: what
    # its loss reads on a batch, computed its own way (the causal LM scores response tokens
    # only, :meth:`fedpeft.tasks.causal_lm.CausalLM.forward`).  Without one the outputs are
    # the model's logits and the targets the batch's (:func:`model_outputs`).

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch, a scalar: the mean over its examples.  Row i of
        ``outputs`` and ``targets`` is example i, so DP-SGD gets each example's loss by
        calling it on one row."""
        ...

    def evaluate(self, model: FedModel, data: Examples, batch_size: int) -> Evaluation:
        """Mean loss and the task's metrics (at least ``accuracy``, in [0, 1]: the round's
        headline figure) of ``model`` on ``data``."""
        ...


def model_outputs(
    task: Task, module: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) of a batch as ``task.loss`` reads them: the task's own ``forward``
    where it defines one, else ``module``'s logits and the batch's targets."""
    forward = getattr(task, "forward", None)
    if forward is not None:
        outputs, kept = forward(module, inputs, targets)
        return outputs, kept
    return module(**inputs).logits, targets


def first_examples(data: Examples, count: int) -> Examples:
    """The first ``count`` of ``data`` (all of it for 0, or for examples that cannot be
    cut: a task's examples may define ``head(count)``).  The server's test split is in a
    seeded shuffled order, so its first examples are a fixed random subsample."""
    head = getattr(data, "head", None)
    if count <= 0 or count >= len(data) or head is None:
        return data
    part: Examples = head(count)
    return part
