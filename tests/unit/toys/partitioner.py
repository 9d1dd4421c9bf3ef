"""A partitioner: contiguous blocks of the label-sorted rows, one per client.

Each client gets a run of neighbouring labels (label skew without randomness), built on
flwr-datasets' own ``Partitioner`` base.  Its setting is an existing key, so it needs no
section; the registry line is ``register_partitioner("toy-blocks", SPEC)``.
"""

from __future__ import annotations

import datasets
import numpy as np
from flwr_datasets.partitioner import Partitioner

from fedpeft.data.partition import LABEL, PartitionerSpec
from fedpeft.data.settings import DataConfig


class SortedBlocks(Partitioner):
    def __init__(self, num_partitions: int) -> None:
        super().__init__()
        self._count = num_partitions

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        order = np.argsort(np.asarray(self.dataset[LABEL]), kind="stable")
        return self.dataset.select(np.array_split(order, self._count)[partition_id])

    @property
    def num_partitions(self) -> int:
        return self._count


def candidates(cfg: DataConfig, num_partitions: int, seed: int, num_rows: int) -> list[Partitioner]:
    return [SortedBlocks(num_partitions)]


SPEC = PartitionerSpec(candidates)
