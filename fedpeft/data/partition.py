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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)

from fedpeft.data.sources import label_array
from fedpeft.settings import ConfigError, unknown_choice

if TYPE_CHECKING:
    from fedpeft.data.settings import DataConfig

__all__ = [
    "PARTITIONERS",
    "Partitioner",
    "PartitionerSpec",
    "ShuffledIidPartitioner",
    "clear_partition_cache",
    "load_partition",
    "make_partitioner",
    "partition_stats",
    "register_partitioner",
]

LABEL = "label"


@dataclass(frozen=True)
class PartitionerSpec:
    """A registered partitioner (``data.partitioner = <name>``).

    ``candidates(cfg, num_partitions, seed, num_rows)`` gives fresh flwr-datasets
    partitioners to try in turn, strictest first (one for most; Dirichlet relaxes its
    minimum client size); the first that splits the data is kept.  ``setting`` is the
    config key to check when none can.  ``check(cfg)`` refuses a data section this
    partitioner cannot use (run as the section is built).  A partitioner's cache key is the
    whole frozen data section (:func:`cache_key`), so a new setting needs no edit here.
    """

    candidates: Callable[[DataConfig, int, int, int], Sequence[Partitioner]]
    setting: str = ""
    check: Callable[[DataConfig], None] | None = None


class ShuffledIidPartitioner(Partitioner):
    """flwr-datasets' ``IidPartitioner`` on a seeded shuffle of the dataset.

    Upstream ``IidPartitioner`` returns contiguous ``Dataset.shard``s without
    shuffling; shuffling first makes the partitions IID whatever the row order.
    """

    def __init__(self, num_partitions: int, seed: int) -> None:
        super().__init__()
        self._count = num_partitions
        self._seed = seed
        self._iid: IidPartitioner | None = None  # upstream's, over the shuffled rows

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        if self._iid is None:  # a partitioner's dataset is set once (flwr-datasets refuses a second)
            self._iid = IidPartitioner(self._count)
            self._iid.dataset = self.dataset.shuffle(seed=self._seed)
        return self._iid.load_partition(partition_id)

    @property
    def num_partitions(self) -> int:
        return self._count


def _iid(cfg: DataConfig, num_partitions: int, seed: int, num_rows: int) -> list[Partitioner]:
    return [ShuffledIidPartitioner(num_partitions, seed=seed)]


def _by_label(cls: Callable[..., Partitioner], num_partitions: int, seed: int, **own: Any) -> Partitioner:
    """A flwr-datasets partitioner ``cls`` over the label column, shuffled with ``seed``."""
    return cls(num_partitions=num_partitions, partition_by=LABEL, shuffle=True, seed=seed, **own)


def _dirichlet(cfg: DataConfig, num_partitions: int, seed: int, num_rows: int) -> list[Partitioner]:
    # flwr-datasets resamples up to 10 times to give every client min_partition_size rows;
    # the sizes to try depend on the data (see _min_partition_sizes).
    return [
        _by_label(
            DirichletPartitioner,
            num_partitions,
            seed,
            alpha=float(cfg.alpha),
            min_partition_size=size,
            self_balancing=False,
        )
        for size in _min_partition_sizes(num_rows, num_partitions)
    ]


def _pathological(cfg: DataConfig, num_partitions: int, seed: int, num_rows: int) -> list[Partitioner]:
    # "first-deterministic": client i surely gets class i mod K (so every class is
    # used when there are at least K clients), the others are drawn with the seed.
    return [
        _by_label(
            PathologicalPartitioner,
            num_partitions,
            seed,
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="first-deterministic",
        )
    ]


def _shard(cfg: DataConfig, num_partitions: int, seed: int, num_rows: int) -> list[Partitioner]:
    return [_by_label(ShardPartitioner, num_partitions, seed, num_shards_per_partition=cfg.shards_per_client)]


class GroupedNaturalIdPartitioner(Partitioner):
    """flwr-datasets' ``NaturalIdPartitioner``'s partitions, its rows grouped in one NumPy pass.

    Partition ``i`` holds the rows of the ``i``-th natural id in sorted order, each in
    dataset order, as upstream's; upstream walks the rows in Python under a tqdm progress
    bar, which every client process would print.
    """

    def __init__(self, partition_by: str) -> None:
        super().__init__()
        self.partition_by = partition_by
        self._groups: list[np.ndarray] | None = None
        self.natural_ids: list[Any] = []  # partition id -> its natural id

    def _grouped(self) -> list[np.ndarray]:
        if self._groups is None:
            column = self.dataset.with_format("arrow", columns=[self.partition_by])[:][self.partition_by]
            ids = np.asarray(column)
            order = np.argsort(ids, kind="stable")
            values, starts = np.unique(ids[order], return_index=True)
            self._groups = np.split(order, starts[1:])
            self.natural_ids = values.tolist()
        return self._groups

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        return self.dataset.select(self._grouped()[partition_id])

    @property
    def num_partitions(self) -> int:
        return len(self._grouped())


def _natural(cfg: DataConfig, num_partitions: int, seed: int, num_rows: int) -> list[Partitioner]:
    return [GroupedNaturalIdPartitioner(partition_by=cfg.partition_column)]


def _natural_needs_a_column(cfg: DataConfig) -> None:
    if not cfg.partition_column:
        raise ConfigError(
            "config key 'data.partition-column' must name the column that identifies the clients "
            "when data.partitioner = 'natural'"
        )


#: ``data.partitioner`` name -> its :class:`PartitionerSpec` (one line per partitioner).
PARTITIONERS: dict[str, PartitionerSpec] = {
    "iid": PartitionerSpec(_iid),
    "dirichlet": PartitionerSpec(_dirichlet, "data.alpha"),
    "pathological": PartitionerSpec(_pathological, "data.classes-per-client"),
    "shard": PartitionerSpec(_shard, "data.shards-per-client"),
    "natural": PartitionerSpec(_natural, "data.partition-column", _natural_needs_a_column),
}


def register_partitioner(name: str, spec: PartitionerSpec) -> None:
    """Add a partitioner under ``name`` (refuses a name already taken)."""
    if name in PARTITIONERS:
        raise ValueError(f"partitioner {name!r} is already registered")
    PARTITIONERS[name] = spec


def _spec(cfg: DataConfig) -> PartitionerSpec:
    try:
        return PARTITIONERS[cfg.partitioner]
    except KeyError:
        raise unknown_choice("data.partitioner", cfg.partitioner, PARTITIONERS) from None


def make_partitioner(cfg: DataConfig, num_partitions: int, seed: int, num_rows: int = 0) -> Partitioner:
    """A fresh (dataset-less) flwr-datasets partitioner for ``cfg.partitioner``: its
    strictest candidate for a dataset of ``num_rows`` rows."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    return _spec(cfg).candidates(cfg, num_partitions, seed, num_rows)[0]


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


def cache_key(train: datasets.Dataset, cfg: DataConfig, num_partitions: int, seed: int) -> tuple[Any, ...]:
    """What a partitioning depends on: the data (``datasets``' content/transform hash, stable
    for the same source, seed and split), every data setting (the frozen section itself,
    so a partitioner's new setting is in the key without an edit), clients and seed."""
    return (train._fingerprint, train.num_rows, cfg, num_partitions, seed)


def _partitioner_for(train: datasets.Dataset, cfg: DataConfig, num_partitions: int, seed: int) -> Partitioner:
    """The cached partitioner of ``train``, with all partitions already computed."""
    key = cache_key(train, cfg, num_partitions, seed)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    if num_partitions > train.num_rows:
        raise ConfigError(
            f"cannot split {train.num_rows} training examples into {num_partitions} "
            "partitions; lower num-clients or raise data.max-examples"
        )
    spec = _spec(cfg)
    error: ValueError | None = None
    for partitioner in spec.candidates(cfg, num_partitions, seed, train.num_rows):
        partitioner.dataset = train
        if isinstance(partitioner, GroupedNaturalIdPartitioner):
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
        also = f" (check '{spec.setting}')" if spec.setting else ""
        raise ConfigError(
            f"config key 'data.partitioner': {cfg.partitioner!r} cannot split "
            f"{train.num_rows} examples into {num_partitions} partitions{also}: {error}"
        ) from error
    with _cache_lock:
        _cache[key] = partitioner
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return partitioner


def _check_natural(partitioner: GroupedNaturalIdPartitioner, cfg: DataConfig, num_partitions: int) -> None:
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
