"""What every task must do, as one function a user can call on their own task.

``tests/unit/tasks/test_conformance.py`` runs :func:`check_task` over every registered
task on a tiny config; ``tests/unit/tasks/test_registry.py`` runs it on a task written in
the test.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedpeft.config import RunConfig
from fedpeft.models import FedModel, build_model
from fedpeft.tasks.base import Examples, Task, model_outputs
from fedpeft.tasks.settings import TrainConfig
from fedpeft.training import train_local


class TaskConformanceError(AssertionError):
    """A task broke the contract; the message says which part."""


def check_task(task: Task, cfg: RunConfig, model: FedModel | None = None, *, batch_size: int = 4) -> None:
    """Raise :class:`TaskConformanceError` unless ``task`` keeps the task contract on ``cfg``:

    * the head has at least one output, and the label names (if any) name each one;
    * every client's announced size is the length of its prepared set, and some client
      holds examples; preparing a set again gives the same examples;
    * batches cover the rows asked for once, at most ``batch_size`` at a time, with inputs
      and targets of one first dimension, on the model's device;
    * the server's test set is not empty; the partition stats hold one entry per client
      with its size;
    * the loss of a batch is a finite scalar whose gradient reaches the exchanged
      tensors, and :func:`~fedpeft.training.train_local` moves them;
    * evaluation gives a finite loss >= 0 and finite metrics, ``accuracy`` among them in
      [0, 1], the same twice, without changing the model or leaving gradients off.

    ``model`` defaults to a fresh model of ``cfg`` with the task's head; its exchanged
    tensors are as they were when this returns.
    """
    n = cfg.num_clients
    outputs = task.num_outputs(cfg)
    _expect(outputs >= 1, f"num_outputs is {outputs}")
    names = task.label_names(cfg)
    _expect(len(names) in (0, outputs), f"{len(names)} label names for {outputs} outputs")
    sizes = [task.client_train_size(cfg, pid, n) for pid in range(n)]
    for pid, size in enumerate(sizes):
        got = len(task.client_train_set(cfg, pid, n))
        _expect(got == size, f"client {pid}: client_train_size says {size}, its set holds {got}")
    _expect(sum(sizes) > 0, "no client holds a training example")
    model = model or build_model(cfg, outputs, kind=task.model_kind)
    pid = int(np.argmax(sizes))
    train = task.client_train_set(cfg, pid, n)
    _expect(
        _same(
            _first(train, model, batch_size), _first(task.client_train_set(cfg, pid, n), model, batch_size)
        ),
        "preparing a client's set twice gives other examples",
    )
    _check_batches(train, model.device, batch_size)
    test = task.server_test_set(cfg)
    _expect(len(test) > 0, "the server's test set is empty")
    _check_batches(test, model.device, batch_size)
    len(task.server_validation_set(cfg))  # may be empty; must be preparable
    stats = task.partition_stats(cfg)
    _expect(len(stats) == n, f"partition_stats has {len(stats)} entries for {n} clients")
    _expect([int(s["size"]) for s in stats] == sizes, "partition_stats sizes differ from client_train_size")
    state = model.exchange_state()
    try:
        _check_loss(task, model, train, batch_size)
        _check_evaluate(task, model, test, batch_size)
    finally:
        model.load_exchange_state(state)


def _check_batches(data: Examples, device: torch.device, batch_size: int) -> None:
    rows = 0
    order = torch.arange(len(data)).flip(0)
    for inputs, targets in data.batches(order, batch_size, device):
        _expect(0 < len(targets) <= batch_size, f"a batch of {len(targets)} rows for batch size {batch_size}")
        for key, value in inputs.items():
            _expect(value.shape[0] == targets.shape[0], f"input {key!r} and targets differ in rows")
            _expect(value.device.type == device.type, f"input {key!r} is on {value.device}, not {device}")
        _expect(targets.device.type == device.type, f"targets are on {targets.device}, not {device}")
        rows += len(targets)
    _expect(rows == len(data), f"batches cover {rows} rows of {len(data)}")


def _check_loss(task: Task, model: FedModel, train: Examples, batch_size: int) -> None:
    inputs, targets = _first(train, model, batch_size)
    model.module.train()
    loss = task.loss(*model_outputs(task, model.module, inputs, targets))
    _expect(loss.dim() == 0 and bool(torch.isfinite(loss)), f"the loss is not a finite scalar: {loss}")
    loss.backward()
    reached = [k for k, p in model.params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    for p in model.params.values():
        p.grad = None
    model.module.eval()
    _expect(bool(reached), "no gradient of the loss reaches the exchanged tensors")
    before = model.exchange_state()
    result = train_local(model, train, TrainConfig(batch_size=batch_size, max_steps=2), seed=0, task=task)
    _expect(result.steps > 0 and math.isfinite(result.loss), f"train_local gave {result}")
    after = model.exchange_state()
    _expect(any(not np.array_equal(before[k], after[k]) for k in before), "training moved no tensor")


def _check_evaluate(task: Task, model: FedModel, test: Examples, batch_size: int) -> None:
    before = model.exchange_state()
    first = task.evaluate(model, test, batch_size)
    _expect(torch.is_grad_enabled(), "evaluate left gradients switched off")
    _expect(math.isfinite(first.loss) and first.loss >= 0, f"evaluation loss {first.loss}")
    _expect(
        all(isinstance(v, float) and math.isfinite(v) for v in first.metrics.values()),
        f"metrics must be finite floats: {dict(first.metrics)}",
    )
    accuracy = first.metrics.get("accuracy")
    _expect(
        accuracy is not None and 0.0 <= accuracy <= 1.0, f"accuracy missing or outside [0, 1]: {accuracy}"
    )
    again = task.evaluate(model, test, batch_size)
    _expect(again == first, f"evaluating twice gives {again} then {first}")
    after = model.exchange_state()
    _expect(all(np.array_equal(before[k], after[k]) for k in before), "evaluate changed the model")


def _first(data: Examples, model: FedModel, batch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return next(iter(data.batches(torch.arange(len(data)), batch_size, model.device)))


def _same(
    a: tuple[dict[str, torch.Tensor], torch.Tensor], b: tuple[dict[str, torch.Tensor], torch.Tensor]
) -> bool:
    return (
        a[0].keys() == b[0].keys()
        and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
        and torch.equal(a[1], b[1])
    )


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise TaskConformanceError(what)
