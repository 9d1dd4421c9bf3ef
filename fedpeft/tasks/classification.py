"""Sequence classification: one label per text, cross-entropy, accuracy (``task.name =
"sequence-classification"``, the default).

Which examples each party holds (:mod:`fedpeft.tasks.splits`), tokenized once per process.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from fedpeft.config import RunConfig
from fedpeft.data import TextDataset, load_source
from fedpeft.models import FedModel
from fedpeft.models.backbone import load_tokenizer
from fedpeft.tasks import splits
from fedpeft.tasks.base import Evaluation, Examples
from fedpeft.training import Encoded, forward_batches


class LabelObjective:
    """The objective of a task with one label per example: cross-entropy; accuracy."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the batch."""
        return F.cross_entropy(logits, targets)

    def evaluate(self, model: FedModel, data: Examples, batch_size: int) -> Evaluation:
        """Mean cross-entropy loss and accuracy of ``model`` on ``data``."""
        return evaluate_labels(model, data, batch_size)


class SequenceClassification(LabelObjective):
    """The :class:`~fedpeft.tasks.base.Task` of a labelled text corpus (``data.*`` keys)."""

    model_kind = "sequence-classification"

    def label_names(self, cfg: RunConfig) -> tuple[str, ...]:
        return source(cfg).label_names

    def num_outputs(self, cfg: RunConfig) -> int:
        return source(cfg).num_classes

    def client_train_size(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> int:
        return client_train_size(cfg, partition_id, num_partitions)

    def client_train_set(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> Encoded:
        return client_train_set(cfg, partition_id, num_partitions)

    def server_test_set(self, cfg: RunConfig) -> Encoded:
        return server_test_set(cfg)

    def server_validation_set(self, cfg: RunConfig) -> Encoded:
        return server_validation_set(cfg)

    def partition_stats(self, cfg: RunConfig) -> list[dict[str, Any]]:
        """Size and label histogram of every client's partition."""
        return splits.client_stats(load_source, cfg)


@torch.no_grad()
def evaluate_labels(model: FedModel, data: Examples, batch_size: int) -> Evaluation:
    """Mean cross-entropy loss and accuracy of a classifier on labelled examples (text or images)."""
    loss_sum, correct = 0.0, 0
    for raw, labels in forward_batches(model, data, batch_size):
        logits = raw.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    n = max(len(data), 1)
    return Evaluation(loss_sum / n, {"accuracy": correct / n})


# ---------------------------------------------------------------------- data, cached per process
def source(cfg: RunConfig) -> TextDataset:
    """The whole labelled dataset of the run (cached per process by ``load_source``)."""
    return splits.source(load_source, cfg)


def split(cfg: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training pool the clients partition, held-out split of the server)."""
    return splits.split(load_source, cfg)


def server_splits(cfg: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(validation, test) of the held-out split (:func:`fedpeft.tasks.splits.server_splits`)."""
    return splits.server_splits(load_source, cfg)


@functools.lru_cache(maxsize=2)
def server_test_set(cfg: RunConfig) -> Encoded:
    """The held-out test split (less any validation examples), tokenized (server only)."""
    test = server_splits(cfg)[1]
    return encode(load_tokenizer(cfg.model.name), test["text"], test["label"], cfg.model.max_length)


@functools.lru_cache(maxsize=2)
def server_validation_set(cfg: RunConfig) -> Encoded:
    """The server's validation examples, tokenized (empty unless data.validation-examples > 0)."""
    val = server_splits(cfg)[0]
    return encode(load_tokenizer(cfg.model.name), val["text"], val["label"], cfg.model.max_length)


def client_train_size(cfg: RunConfig, partition_id: int, num_partitions: int) -> int:
    """How many training examples client ``partition_id`` holds, without tokenizing them."""
    return splits.client_partition(load_source, cfg, partition_id, num_partitions).num_rows


@functools.lru_cache(maxsize=256)
def client_train_set(cfg: RunConfig, partition_id: int, num_partitions: int) -> Encoded:
    """Client ``partition_id``'s share of the training split, tokenized (cached per process)."""
    part = splits.client_partition(load_source, cfg, partition_id, num_partitions)
    return encode(load_tokenizer(cfg.model.name), part["text"], part["label"], cfg.model.max_length)


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], labels: Sequence[int], max_length: int
) -> Encoded:
    """Tokenize once (truncate to ``max_length``); done once per process and partition."""
    if not len(texts):  # the tokenizer cannot batch nothing (no validation split, say)
        empty = torch.zeros((0, 0), dtype=torch.long)
        return Encoded(empty, empty, torch.zeros(0, dtype=torch.long))
    enc = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.as_tensor(list(labels), dtype=torch.long))
