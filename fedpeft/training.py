"""Local training and evaluation loops: plain PyTorch, seeded per (seed, round, client).

Kept free of Flower so that the same functions drive the federated clients, the server's
global evaluation and the in-process baseline of ``benchmarks/simulation_overhead``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from fedpeft.config import TrainConfig
from fedpeft.models import FedModel


@dataclass(frozen=True)
class Encoded:
    """A tokenized dataset, padded to its own longest row (batches trim further)."""

    input_ids: torch.Tensor  # [N, L] int64
    attention_mask: torch.Tensor  # [N, L] int64
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    steps: int
    loss: float  # mean training loss over the steps taken


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], labels: Sequence[int], max_length: int
) -> Encoded:
    """Tokenize once (truncate to ``max_length``); done once per process and partition."""
    enc = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.as_tensor(list(labels), dtype=torch.long))


def _batches(
    data: Encoded, idx: torch.Tensor, batch_size: int, device: torch.device
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    for start in range(0, len(idx), batch_size):
        sel = idx[start : start + batch_size]
        mask = data.attention_mask[sel]
        width = int(mask.sum(dim=1).max())  # dynamic padding: trim to this batch's longest row
        inputs = {
            "input_ids": data.input_ids[sel, :width].to(device),
            "attention_mask": mask[:, :width].to(device),
        }
        yield inputs, data.labels[sel].to(device)


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (Li et al., 2020) ``mu / 2 * ||w - w_global||^2`` over the exchanged tensors."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))  # type: ignore[return-value]


def train_local(
    model: FedModel, data: Encoded, cfg: TrainConfig, seed: int, proximal_mu: float = 0.0
) -> TrainResult:
    """Run ``cfg.local_epochs`` epochs (capped at ``cfg.max_steps``) of AdamW on the exchanged params.

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
    optim = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps, total, seen = 0, 0.0, 0
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(data), generator=gen)
        for inputs, labels in _batches(data, order, cfg.batch_size, model.device):
            logits = module(**inputs).logits
            loss = F.cross_entropy(logits, labels)
            objective = loss + proximal_term(params, anchor, proximal_mu) if anchor else loss
            optim.zero_grad(set_to_none=True)
            objective.backward()
            optim.step()
            steps += 1
            total += float(loss.detach())
            seen += int(labels.shape[0])
            if cfg.max_steps and steps >= cfg.max_steps:
                break
        if cfg.max_steps and steps >= cfg.max_steps:
            break
    module.eval()
    return TrainResult(seen, steps, total / max(steps, 1))


@torch.no_grad()
def evaluate(model: FedModel, data: Encoded, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``data``."""
    module = model.module
    module.eval()
    loss_sum, correct = 0.0, 0
    for inputs, labels in _batches(data, torch.arange(len(data)), batch_size, model.device):
        logits = module(**inputs).logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    n = max(len(data), 1)
    return loss_sum / n, correct / n
