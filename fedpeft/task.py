"""The learning task of a run: which examples each party holds, tokenized once per process.

The server keeps a held-out, stratified test split for global evaluation; the rest is
partitioned among the clients with a ``flwr-datasets`` partitioner.  Both sides derive
the same split from the same seed, so no data ever travels.
"""

from __future__ import annotations

import functools

import datasets

from fedpeft.config import RunConfig
from fedpeft.data import TextDataset, load_partition, load_source, split_train_test
from fedpeft.models.backbone import load_tokenizer
from fedpeft.training import Encoded, encode


def source(cfg: RunConfig) -> TextDataset:
    """The whole labelled dataset of the run (cached per process by ``load_source``)."""
    return load_source(cfg.data, cfg.seed)


def num_labels(cfg: RunConfig) -> int:
    return source(cfg).num_classes


@functools.lru_cache(maxsize=2)
def split(cfg: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    return split_train_test(source(cfg), cfg.data.test_fraction, cfg.data.max_test_examples, cfg.seed)


@functools.lru_cache(maxsize=2)
def server_test_set(cfg: RunConfig) -> Encoded:
    """The held-out test split, tokenized (server only)."""
    test = split(cfg)[1]
    return encode(load_tokenizer(cfg.model.name), test["text"], test["label"], cfg.model.max_length)


def client_train_size(cfg: RunConfig, partition_id: int, num_partitions: int) -> int:
    """How many training examples client ``partition_id`` holds, without tokenizing them."""
    return load_partition(split(cfg)[0], cfg.data, num_partitions, partition_id, cfg.seed).num_rows


@functools.lru_cache(maxsize=256)
def client_train_set(cfg: RunConfig, partition_id: int, num_partitions: int) -> Encoded:
    """Client ``partition_id``'s share of the training split, tokenized (cached per process)."""
    part = load_partition(split(cfg)[0], cfg.data, num_partitions, partition_id, cfg.seed)
    return encode(load_tokenizer(cfg.model.name), part["text"], part["label"], cfg.model.max_length)
