"""Who holds which examples, for any task whose data is a labelled :class:`TextDataset`.

The server keeps a held-out, stratified split for global evaluation (less any validation
examples it tunes on); the rest is partitioned among the clients with a
``flwr-datasets`` partitioner.  Both sides derive the same split from the same seed, so
no data ever travels.  A task passes its own ``loader`` (``load_source`` for
classification, ``load_instructions`` for causal-LM tuning); everything is cached per
process, keyed by (loader, config).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import datasets

from fedpeft.config import RunConfig
from fedpeft.data import TextDataset, load_partition, partition_stats, split_train_test
from fedpeft.data.settings import DataConfig
from fedpeft.settings import ConfigError

#: ``(data config, seed) -> the whole dataset``, cached by the loader itself.
Loader = Callable[[DataConfig, int], TextDataset]

AUTO_VALIDATION_FRACTION, AUTO_VALIDATION_MIN = 0.2, 32


def source(loader: Loader, cfg: RunConfig) -> TextDataset:
    """The whole dataset of the run."""
    return loader(cfg.data, cfg.seed)


@functools.lru_cache(maxsize=4)
def split(loader: Loader, cfg: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training pool the clients partition, held-out split of the server)."""
    return split_train_test(source(loader, cfg), cfg.data.test_fraction, cfg.data.max_test_examples, cfg.seed)


@functools.lru_cache(maxsize=4)
def server_splits(loader: Loader, cfg: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(validation, test): ``data.validation-examples`` of the held-out split, chosen by the
    seed, for what the server tunes; the rest is the test set every figure is measured on."""
    held_out = split(loader, cfg)[1]
    n = cfg.data.validation_examples
    if n == 0 and cfg.server.tunes():
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


def client_partition(
    loader: Loader, cfg: RunConfig, partition_id: int, num_partitions: int
) -> datasets.Dataset:
    """Client ``partition_id``'s share of the training split."""
    return load_partition(split(loader, cfg)[0], cfg.data, num_partitions, partition_id, cfg.seed)


def client_stats(loader: Loader, cfg: RunConfig) -> list[dict[str, Any]]:
    """Size and label histogram of every client's partition."""
    return partition_stats(split(loader, cfg)[0], cfg.data, cfg.num_clients, cfg.seed)
