"""Non-IID partitioning of the training set across simulated clients.

A thin, seeded layer over flwr-datasets' partitioners
(``flwr_datasets.partitioner``, https://flower.ai/docs/datasets/):

* ``iid`` -- :class:`ShuffledIidPartitioner`, flwr-datasets' ``IidPartitioner``
  (equal contiguous shards) applied to a seeded shuffle of the data, because the
  upstream one does not shuffle and a label-sorted dataset would give label-skewed
  "IID" partitions;
* ``dirichlet`` -- ``DirichletPartitioner`` (Hsu et al., 2019): each class is split
  across clients with proportions drawn from ``Dir(data.alpha)``; small alpha = more
  skew;
* ``pathological`` -- ``PathologicalPartitioner``: each client holds exactly
  ``data.classes-per-client`` classes (McMahan et al., 2017);
* ``shard`` -- ``ShardPartitioner``: the data is sorted by label, cut into
  equal shards and each client gets ``data.shards-per-client`` random shards (the
  FedAvg paper's MNIST split).  Shards are ``floor(n / (clients * shards))`` rows, so
  up to ``clients * shards - 1`` rows are left unassigned;
* ``natural`` -- ``NaturalIdPartitioner``: one client per distinct value of
  ``data.partition-column`` (a user id in a local file, say, or ``label`` for one class
  per client), the way real federated data comes; ``num-clients`` must equal the number
  of distinct values in the training split.

flwr-datasets computes every partition on the first ``load_partition`` call, so the
partitioner is cached per process and per-client look-ups are cheap.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)

from fedpeft.config import ConfigError, DataConfig, unknown_choice
from fedpeft.data.sources import label_array

__all__ = [
    "PARTITIONERS",
    "Partitioner",
    "PartitionerBuilder",
    "ShuffledIidPartitioner",
    "clear_partition_cache",
    "load_partition",
    "make_partitioner",
    "partition_stats",
]

LABEL = "label"

PartitionerBuilder = Callable[[DataConfig, int, int], Partitioner]


class ShuffledIidPartitioner(IidPartitioner):
    """flwr-datasets' ``IidPartitioner`` on a seeded shuffle of the dataset.

    Upstream ``IidPartitioner`` returns contiguous ``Dataset.shard``s without
    shuffling; shuffling first makes the partitions IID whatever the row order.
    """

    def __init__(self, num_partitions: int, seed: int) -> None:
        super().__init__(num_partitions)
        self._seed = seed
        self._shuffled: datasets.Dataset | None = None
        self._shuffled_from: str | None = None

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        if self._shuffled is None or self._shuffled_from != self.dataset._fingerprint:
            self._shuffled = self.dataset.shuffle(seed=self._seed)
            self._shuffled_from = self.dataset._fingerprint
        return self._shuffled.shard(num_shards=self._num_partitions, index=partition_id, contiguous=True)


def _iid(cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    return ShuffledIidPartitioner(num_partitions, seed=seed)


def _by_label(cls: Callable[..., Partitioner], num_partitions: int, seed: int, **own: Any) -> Partitioner:
    """A flwr-datasets partitioner ``cls`` over the label column, shuffled with ``seed``."""
    return cls(num_partitions=num_partitions, partition_by=LABEL, shuffle=True, seed=seed, **own)


def _dirichlet(cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    # min_partition_size is set in load_partition once the dataset size is known
    # (see _min_partition_sizes); flwr-datasets resamples up to 10 times to meet it.
    return _by_label(
        DirichletPartitioner,
        num_partitions,
        seed,
        alpha=float(cfg.alpha),
        min_partition_size=0,
        self_balancing=False,
    )


def _pathological(cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    # "first-deterministic": client i surely gets class i mod K (so every class is
    # used when there are at least K clients), the others are drawn with the seed.
    return _by_label(
        PathologicalPartitioner,
        num_partitions,
        seed,
        num_classes_per_partition=cfg.classes_per_client,
        class_assignment_mode="first-deterministic",
    )


def _shard(cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    return _by_label(ShardPartitioner, num_partitions, seed, num_shards_per_partition=cfg.shards_per_client)


class GroupedNaturalIdPartitioner(NaturalIdPartitioner):
    """flwr-datasets' ``NaturalIdPartitioner``, its row grouping done in one NumPy pass.

    Upstream walks the rows in Python under a tqdm progress bar, which every client
    process would print; the partitions (sorted natural ids -> their rows in order)
    are the same.
    """

    def _create_partition_id_to_indices(self) -> None:
        ids = np.asarray(
            self.dataset.with_format("arrow", columns=[self._partition_by])[:][self._partition_by]
        )
        order = np.argsort(ids, kind="stable")
        values, starts = np.unique(ids[order], return_index=True)
        groups = np.split(order, starts[1:])
        self._partition_id_to_indices = {
            self._natural_id_to_partition_id[value.item() if isinstance(value, np.generic) else value]: rows
            for value, rows in zip(values, groups, strict=True)
        }


def _natural(cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    return GroupedNaturalIdPartitioner(partition_by=cfg.partition_column)


#: ``data.partitioner`` name -> builder ``(cfg, num_partitions, seed) -> Partitioner``.
PARTITIONERS: dict[str, PartitionerBuilder] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "pathological": _pathological,
    "shard": _shard,
    "natural": _natural,
}

# The config key whose value most likely made a partitioner fail.
_HINT_KEY = {
    "dirichlet": "data.alpha",
    "pathological": "data.classes-per-client",
    "shard": "data.shards-per-client",
    "natural": "data.partition-column",
}


def make_partitioner(cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    """A fresh (dataset-less) flwr-datasets partitioner for ``cfg.partitioner``."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    try:
        builder = PARTITIONERS[cfg.partitioner]
    except KeyError:
        raise unknown_choice("data.partitioner", cfg.partitioner, PARTITIONERS) from None
    return builder(cfg, num_partitions, seed)


def _min_partition_sizes(num_rows: int, num_partitions: int) -> list[int]:
    """Dirichlet minimum client sizes to try, strictest first.

    flwr-datasets' ``DirichletPartitioner`` resamples until every partition holds
    ``min_partition_size`` rows and gives up with ``ValueError`` after 10 tries.  Aim
    for 10 rows (or a fair share on tiny data) so clients can train at all, then fall
    back to 1 (no empty client): with small alpha and many clients, 10 is often
    unreachable (e.g. 5 classes, 10 clients, alpha=0.1).
    """
    first = max(1, min(10, num_rows // (2 * num_partitions)))
    return [first, 1] if first > 1 else [1]


_CACHE_SIZE = 8
_cache: OrderedDict[tuple[Any, ...], Partitioner] = OrderedDict()
_cache_lock = threading.Lock()


def _partitioner_for(train: datasets.Dataset, cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    """The cached partitioner of ``train``, with all partitions already computed.

    Keyed on ``train._fingerprint`` (``datasets``' content/transform hash, stable for
    the same source, seed and split) plus the partitioning settings.
    """
    key = (
        train._fingerprint,
        train.num_rows,
        cfg.partitioner,
        cfg.alpha,
        cfg.classes_per_client,
        cfg.shards_per_client,
        cfg.partition_column,
        num_partitions,
        seed,
    )
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    if num_partitions > train.num_rows:
        raise ConfigError(
            f"cannot split {train.num_rows} training examples into {num_partitions} "
            "partitions; lower num-clients or raise data.max-examples"
        )
    sizes: list[int | None] = [None]
    if cfg.partitioner == "dirichlet":
        sizes = list(_min_partition_sizes(train.num_rows, num_partitions))
    error: ValueError | None = None
    for min_size in sizes:
        partitioner = make_partitioner(cfg, num_partitions, seed)
        if min_size is not None and isinstance(partitioner, DirichletPartitioner):
            partitioner._min_partition_size = min_size
        partitioner.dataset = train
        if isinstance(partitioner, NaturalIdPartitioner):
            _check_natural(partitioner, cfg, num_partitions)
        try:
            with warnings.catch_warnings():
                # flwr-datasets warns on every Dirichlet resampling; the final
                # failure (if any) is reported below as a ConfigError instead.
                warnings.filterwarnings("ignore", message=".*min_partition_size.*")
                partitioner.load_partition(0)  # computes every partition's indices
        except ValueError as e:
            error = e
            continue
        break
    else:
        assert error is not None
        hint = _HINT_KEY.get(cfg.partitioner)
        also = f" (check '{hint}')" if hint else ""
        raise ConfigError(
            f"config key 'data.partitioner': {cfg.partitioner!r} cannot split "
            f"{train.num_rows} examples into {num_partitions} partitions{also}: {error}"
        ) from error
    with _cache_lock:
        _cache[key] = partitioner
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return partitioner


def _check_natural(partitioner: NaturalIdPartitioner, cfg: DataConfig, num_partitions: int) -> None:
    """A natural partition has one client per distinct id: that count must be num-clients."""
    if cfg.partition_column not in partitioner.dataset.column_names:
        raise ConfigError(
            f"config key 'data.partition-column': no column {cfg.partition_column!r} "
            f"(columns: {', '.join(partitioner.dataset.column_names)})"
        )
    found = partitioner.num_partitions
    if found != num_partitions:
        raise ConfigError(
            f"config key 'num-clients' ({num_partitions}) must equal the number of distinct values of "
            f"data.partition-column {cfg.partition_column!r} in the training split ({found}) "
            "when data.partitioner = 'natural'"
        )


def load_partition(
    train: datasets.Dataset,
    cfg: DataConfig,
    num_partitions: int,
    partition_id: int,
    seed: int,
) -> datasets.Dataset:
    """Client ``partition_id``'s share of ``train`` under ``cfg.partitioner``.

    Same ``(train, cfg, num_partitions, seed)`` -> the same partitions, in any
    process.  Raises ``ValueError`` if ``partition_id`` is not in
    ``0..num_partitions-1``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id {partition_id} out of range for {num_partitions} partitions "
            f"(valid: 0..{num_partitions - 1})"
        )
    return _partitioner_for(train, cfg, num_partitions, seed).load_partition(partition_id)


def partition_stats(
    train: datasets.Dataset, cfg: DataConfig, num_partitions: int, seed: int
) -> list[dict[str, Any]]:
    """Per partition: ``{"partition_id", "size", "label_counts"}`` (length-K counts).

    K is the number of ``ClassLabel`` names of ``train["label"]`` (or max label + 1).
    """
    feature = train.features[LABEL]
    if isinstance(feature, datasets.ClassLabel):
        k = int(feature.num_classes)
    else:
        k = int(label_array(train).max()) + 1 if train.num_rows else 0
    stats = []
    for pid in range(num_partitions):
        part = load_partition(train, cfg, num_partitions, pid, seed)
        labels = label_array(part)
        counts = np.bincount(labels, minlength=k) if labels.size else np.zeros(k, np.int64)
        stats.append({"partition_id": pid, "size": int(part.num_rows), "label_counts": counts.tolist()})
    return stats


def clear_partition_cache() -> None:
    """Forget every partitioner cached by :func:`load_partition`."""
    with _cache_lock:
        _cache.clear()
