"""The learning task of a run: which examples each party holds, tokenized once per process.

The server keeps a held-out, stratified test split for global evaluation; the rest is
partitioned among the clients with a ``flwr-datasets`` partitioner.  Both sides derive
the same split from the same seed, so no data ever travels.
"""

from __future__ import annotations

import functools

import datasets

from fedpeft.config import ConfigError, RunConfig
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


AUTO_VALIDATION_FRACTION, AUTO_VALIDATION_MIN = 0.2, 32


@functools.lru_cache(maxsize=2)
def server_splits(cfg: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(validation, test): ``data.validation-examples`` of the held-out split, chosen by the
    seed, for what the server tunes; the rest is the test set every figure is measured on."""
    held_out = split(cfg)[1]
    n = cfg.data.validation_examples
    if n == 0 and cfg.server_tunes():
        n = max(round(AUTO_VALIDATION_FRACTION * len(held_out)), min(AUTO_VALIDATION_MIN, len(held_out) // 2))
    if n == 0:
        return held_out.select([]), held_out
    if n >= len(held_out):
        raise ConfigError(
            f"config key 'data.validation-examples' ({n}) must be smaller than the held-out split "
            f"({len(held_out)} examples)"
        )
    order = held_out.shuffle(seed=cfg.seed)
    return order.select(range(n)), order.select(range(n, len(held_out)))


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
    return load_partition(split(cfg)[0], cfg.data, num_partitions, partition_id, cfg.seed).num_rows


@functools.lru_cache(maxsize=256)
def client_train_set(cfg: RunConfig, partition_id: int, num_partitions: int) -> Encoded:
    """Client ``partition_id``'s share of the training split, tokenized (cached per process)."""
    part = load_partition(split(cfg)[0], cfg.data, num_partitions, partition_id, cfg.seed)
    return encode(load_tokenizer(cfg.model.name), part["text"], part["label"], cfg.model.max_length)
