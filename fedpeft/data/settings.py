"""The data section (``data.*``): the source, the server's held-out split, the partitioning.

Light: the run config imports it to know every key.  The partitioner's name is checked
against the partitioner registry (:data:`fedpeft.data.partition.PARTITIONERS`), which is
loaded the first time a data section is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpeft.settings import Section, value_range


def _partitioner_names() -> tuple[str, ...]:
    from fedpeft.data.partition import PARTITIONERS  # flwr-datasets: loaded when first checked

    return tuple(PARTITIONERS)


@dataclass(frozen=True)
class DataConfig(Section, section="data"):
    """Dataset source, server test split and the non-IID partitioning of the rest."""

    # "bbc-news", "wordnet-nouns", a local .csv/.jsonl/.json/.parquet file, or a hub name.
    dataset: str = "bbc-news"
    text_column: str = "text"
    label_column: str = "label"
    # Keep only the N most frequent classes (0 = all); WordNet has 26 supersenses.
    num_classes: int = field(default=0, metadata=value_range(0))
    # Seeded subsample of the whole dataset before splitting (0 = all); for tiny runs.
    max_examples: int = field(default=0, metadata=value_range(0))
    test_fraction: float = field(default=0.2, metadata=value_range(0.0, 0.9, lo_open=True))
    max_test_examples: int = field(default=0, metadata=value_range(0))
    # Examples cut from the server's held-out split as its validation set, for what the
    # server tunes (server.step-search); the test set is the rest.  0 = 20% of the held-out
    # split when the server tunes something, else none (every example is a test example).
    validation_examples: int = field(default=0, metadata=value_range(0))
    # A registered partitioner (fedpeft.data.partition.PARTITIONERS).
    partitioner: str = field(default="dirichlet", metadata={"registry": _partitioner_names})
    # Natural partitioning: the column whose values name the clients (one client per
    # distinct value; a local file's user id, say, or "label" for one class per client).
    partition_column: str = ""
    # Dirichlet concentration: small = more skewed label distributions.
    alpha: float = field(default=0.5, metadata=value_range(0.0, lo_open=True))
    # Pathological partitioning: classes held by each client.
    classes_per_client: int = field(default=2, metadata=value_range(1))
    # Shard partitioning: label-sorted shards per client.
    shards_per_client: int = field(default=2, metadata=value_range(1))

    def _check(self) -> None:
        from fedpeft.data.partition import PARTITIONERS

        spec = PARTITIONERS[self.partitioner]
        if spec.check is not None:  # what the chosen partitioner needs of this section
            spec.check(self)
