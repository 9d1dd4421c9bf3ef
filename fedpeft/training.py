"""Local training and evaluation loops: plain PyTorch, seeded per (seed, round, client).

The loops know nothing of the learning task: the task's examples batch themselves
(:meth:`~fedpeft.tasks.Examples.batches`), the model's forward pass gives logits, and the
task turns them into a loss (:meth:`~fedpeft.tasks.Task.loss`) or its metrics
(:meth:`~fedpeft.tasks.Task.evaluate`, over :func:`forward_batches`).  Kept free of Flower
so that the same functions drive the federated clients, the server's global evaluation
and the in-process baseline of ``benchmarks/simulation_overhead``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Self

import torch

from fedpeft.models import FedModel
from fedpeft.tasks.base import Batch, Examples, Task, model_outputs
from fedpeft.tasks.settings import TrainConfig


@dataclass(frozen=True)
class Encoded:
    """A tokenized dataset, right-padded to its own longest row (batches trim further)."""

    input_ids: torch.Tensor  # [N, L] int64
    attention_mask: torch.Tensor  # [N, L] int64: 1 on real tokens
    # [N] int64 class labels, or [N, L] token targets (-100 where no loss is taken).
    labels: torch.Tensor
    # [N, L] positions restarting at 0 for each example packed into a row (see
    # ``lm.packing``); None when every row is one example.  Given instead of the mask, so
    # ``transformers`` builds block-diagonal causal masks: packed examples never attend
    # to each other.
    position_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, count: int) -> Self:
        """The first ``count`` rows (:func:`fedpeft.tasks.base.first_examples`)."""
        rows = slice(0, count)
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            labels=self.labels[rows],
            position_ids=None if self.position_ids is None else self.position_ids[rows],
        )

    def batches(self, order: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[Batch]:
        """The rows ``order`` in batches, each trimmed to its own longest row (dynamic padding)."""
        for start in range(0, len(order), batch_size):
            sel = order[start : start + batch_size]
            mask = self.attention_mask[sel]
            width = int(mask.sum(dim=1).max())
            inputs = {"input_ids": self.input_ids[sel, :width].to(device)}
            if self.position_ids is None:
                inputs["attention_mask"] = mask[:, :width].to(device)
            else:
                inputs["position_ids"] = self.position_ids[sel, :width].to(device)
            labels = self.labels[sel]
            yield inputs, (labels[:, :width] if labels.dim() == 2 else labels).to(device)


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    steps: int
    loss: float  # mean training loss over the steps taken


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (Li et al., 2020) ``mu / 2 * ||w - w_global||^2`` over the exchanged tensors."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))  # type: ignore[return-value]


def make_optimizer(cfg: TrainConfig, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """The clients' optimizer over the exchanged tensors (``train.optimizer``)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def train_local(
    model: FedModel, data: Examples, cfg: TrainConfig, seed: int, proximal_mu: float = 0.0, *, task: Task
) -> TrainResult:
    """Run ``cfg.local_epochs`` epochs (capped at ``cfg.max_steps``) of ``train.optimizer`` on the exchanged
    params, minimising ``task``'s loss.

    ``seed`` fixes dropout and the shuffling order, so a client's round is reproducible
    whichever worker runs it.  ``proximal_mu > 0`` adds FedProx's proximal term, anchored
    at the tensors the client received.
    """
    if len(data) == 0:
        return TrainResult(0, 0, math.nan)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    module = model.module
    module.train()
    params = list(model.params.values())
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optim = make_optimizer(cfg, params)
    steps, total, seen = 0, 0.0, 0
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(data), generator=gen)
        for inputs, targets in data.batches(order, cfg.batch_size, model.device):
            loss = task.loss(*model_outputs(task, module, inputs, targets))
            objective = loss + proximal_term(params, anchor, proximal_mu) if anchor else loss
            optim.zero_grad(set_to_none=True)
            objective.backward()
            optim.step()
            steps += 1
            total += float(loss.detach())
            seen += int(targets.shape[0])
            if cfg.max_steps and steps >= cfg.max_steps:
                break
        if cfg.max_steps and steps >= cfg.max_steps:
            break
    module.eval()
    return TrainResult(seen, steps, total / max(steps, 1))


@torch.no_grad()
def forward_batches(
    model: FedModel, data: Examples, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, targets) of every batch of ``data`` in order: eval mode, no gradients.

    What a task's :meth:`~fedpeft.tasks.Task.evaluate` accumulates its loss and metrics over.
    """
    module = model.module
    module.eval()
    for inputs, targets in data.batches(torch.arange(len(data)), batch_size, model.device):
        yield module(**inputs).logits, targets
