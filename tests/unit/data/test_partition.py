"""Seeded non-IID partitioning with flwr-datasets' partitioners."""

from __future__ import annotations

import warnings

import datasets
import numpy as np
import pytest

from fedpeft.config import ConfigError
from fedpeft.data.partition import (
    PARTITIONERS,
    clear_partition_cache,
    load_partition,
    make_partitioner,
    partition_stats,
)
from fedpeft.data.settings import DataConfig
from fedpeft.data.sources import make_text_dataset

K = 5
N = 1000
CLIENTS = 10


def _train(n: int = N, k: int = K, sorted_labels: bool = True) -> datasets.Dataset:
    """Synthetic label-sorted data: the worst case for a non-shuffling IID split."""
    labels = np.arange(n) % k
    if sorted_labels:
        labels = np.sort(labels)
    return make_text_dataset([f"doc {i}" for i in range(n)], labels, [f"c{c}" for c in range(k)]).dataset


TRAIN = _train()
# A natural id per row (10 "users", interleaved): what the natural partitioner splits by.
TRAIN_USERS = make_text_dataset(
    TRAIN["text"],
    TRAIN["label"],
    [f"c{c}" for c in range(K)],
    {"user": [f"u{i % CLIENTS}" for i in range(N)]},
).dataset
# Every partitioner but the natural one draws with the seed; natural ids are what they are.
SEEDED = sorted(set(PARTITIONERS) - {"natural"})


def _parts(cfg: DataConfig, seed: int = 0, train: datasets.Dataset = TRAIN, n: int = CLIENTS):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [load_partition(train, cfg, n, pid, seed) for pid in range(n)]


def _entropy(counts: list[int]) -> float:
    p = np.asarray(counts, dtype=float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_disjoint_and_seeded(name: str) -> None:
    column = "user" if name == "natural" else ""
    cfg = DataConfig(
        partitioner=name, alpha=0.5, classes_per_client=2, shards_per_client=2, partition_column=column
    )
    train = TRAIN_USERS if name == "natural" else TRAIN
    parts = _parts(cfg, seed=0, train=train)
    texts = [set(p["text"]) for p in parts]
    assert all(texts), "no empty partition"
    assert sum(len(t) for t in texts) == len(set().union(*texts))  # disjoint
    if name == "shard":
        # floor(N / (clients * shards)) rows per shard: N=1000 divides evenly here
        assert sum(len(t) for t in texts) == N
    else:
        assert set().union(*texts) == set(TRAIN["text"])  # covers the training set
    clear_partition_cache()
    again = _parts(cfg, seed=0, train=train)
    assert [p["text"] for p in parts] == [p["text"] for p in again]


@pytest.mark.parametrize("name", SEEDED)
def test_other_seed_differs(name: str) -> None:
    cfg = DataConfig(partitioner=name)
    a = [p["text"] for p in _parts(cfg, seed=0)]
    b = [p["text"] for p in _parts(cfg, seed=1)]
    assert a != b


def test_iid_is_label_balanced_even_on_sorted_data() -> None:
    stats = partition_stats(TRAIN, DataConfig(partitioner="iid"), CLIENTS, seed=0)
    assert [s["size"] for s in stats] == [N // CLIENTS] * CLIENTS
    for s in stats:
        assert len(s["label_counts"]) == K
        assert min(s["label_counts"]) > 0


def test_pathological_classes_per_client() -> None:
    for c in (1, 2, 3):
        cfg = DataConfig(partitioner="pathological", classes_per_client=c)
        stats = partition_stats(TRAIN, cfg, CLIENTS, seed=0)
        assert all(sum(x > 0 for x in s["label_counts"]) <= c for s in stats)
        # first-deterministic: with clients >= classes every class is used
        assert all(sum(s["label_counts"][k] for s in stats) > 0 for k in range(K))


def test_pathological_too_many_classes() -> None:
    cfg = DataConfig(partitioner="pathological", classes_per_client=K + 1)
    with pytest.raises(ConfigError, match="classes-per-client"):
        load_partition(TRAIN, cfg, CLIENTS, 0, seed=0)


def test_dirichlet_small_alpha_more_skewed_than_iid() -> None:
    def mean_entropy(cfg: DataConfig) -> float:
        stats = partition_stats(TRAIN, cfg, CLIENTS, seed=0)
        return float(np.mean([_entropy(s["label_counts"]) for s in stats]))

    iid = mean_entropy(DataConfig(partitioner="iid"))
    skewed = mean_entropy(DataConfig(partitioner="dirichlet", alpha=0.1))
    mild = mean_entropy(DataConfig(partitioner="dirichlet", alpha=100.0))
    assert skewed < mild and skewed < iid - 0.3
    assert iid > 0.95 * np.log(K) and mild > 0.95 * np.log(K)


def test_dirichlet_tiny_data() -> None:
    tiny = _train(n=30, k=3)
    parts = _parts(DataConfig(partitioner="dirichlet", alpha=1.0), train=tiny, n=5)
    assert sum(len(p) for p in parts) == 30 and all(len(p) > 0 for p in parts)


def test_dirichlet_small_alpha_falls_back_to_nonempty_clients() -> None:
    # 5 classes, 10 clients, alpha=0.1: >= 10 rows per client is rarely reachable
    parts = _parts(DataConfig(partitioner="dirichlet", alpha=0.1))
    assert all(len(p) > 0 for p in parts)


def test_dirichlet_impossible_is_config_error_not_a_hang() -> None:
    tiny = _train(n=30, k=3)
    cfg = DataConfig(partitioner="dirichlet", alpha=0.01)
    with pytest.raises(ConfigError, match=r"data\.alpha"):
        load_partition(tiny, cfg, 10, 0, seed=0)


def test_shard_partitions_hold_few_labels() -> None:
    stats = partition_stats(TRAIN, DataConfig(partitioner="shard", shards_per_client=2), 10, 0)
    # 20 shards of 50 rows over 5 label-sorted classes of 200: each shard is one class
    assert all(sum(x > 0 for x in s["label_counts"]) <= 2 for s in stats)
    assert all(s["size"] == 100 for s in stats)


def test_stats_sum_to_sizes() -> None:
    stats = partition_stats(TRAIN, DataConfig(partitioner="dirichlet"), CLIENTS, seed=3)
    assert [s["partition_id"] for s in stats] == list(range(CLIENTS))
    assert all(sum(s["label_counts"]) == s["size"] for s in stats)
    assert sum(s["size"] for s in stats) == N


def test_unknown_partitioner() -> None:
    with pytest.raises(ConfigError, match="did you mean 'dirichlet'"):
        make_partitioner(DataConfig(partitioner="dirichlett"), CLIENTS, seed=0)
    with pytest.raises(ConfigError, match=r"data\.partitioner"):
        load_partition(TRAIN, DataConfig(partitioner="nope"), CLIENTS, 0, seed=0)


@pytest.mark.parametrize("pid", [-1, CLIENTS])
def test_partition_id_out_of_range(pid: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        load_partition(TRAIN, DataConfig(), CLIENTS, pid, seed=0)


def test_more_clients_than_rows() -> None:
    with pytest.raises(ConfigError, match="cannot split"):
        load_partition(_train(n=5), DataConfig(partitioner="iid"), 10, 0, seed=0)


def test_cache_reuses_partitioner() -> None:
    cfg = DataConfig(partitioner="dirichlet")
    a = load_partition(TRAIN, cfg, CLIENTS, 3, seed=0)
    b = load_partition(TRAIN, cfg, CLIENTS, 3, seed=0)
    assert a._fingerprint == b._fingerprint
    c = load_partition(TRAIN, DataConfig(partitioner="dirichlet", alpha=5.0), CLIENTS, 3, seed=0)
    assert c["text"] != a["text"]


def test_the_config_offers_exactly_the_registered_partitioners() -> None:
    """The run config's choice list is the registry, read when checked (a later entry counts)."""
    import dataclasses

    names = next(f.metadata["registry"] for f in dataclasses.fields(DataConfig) if f.name == "partitioner")
    assert set(names()) == set(PARTITIONERS) == {"iid", "dirichlet", "pathological", "shard", "natural"}


def test_the_cache_key_follows_every_data_setting() -> None:
    """A setting of the data section, any of them, gives a partitioning of its own."""
    from fedpeft.data.partition import cache_key

    base = cache_key(TRAIN, DataConfig(partitioner="dirichlet"), CLIENTS, 0)
    assert cache_key(TRAIN, DataConfig(partitioner="dirichlet"), CLIENTS, 0) == base
    assert cache_key(TRAIN, DataConfig(partitioner="dirichlet", alpha=0.3), CLIENTS, 0) != base
    assert cache_key(TRAIN, DataConfig(partitioner="dirichlet", shards_per_client=3), CLIENTS, 0) != base
    assert cache_key(TRAIN, DataConfig(partitioner="dirichlet"), CLIENTS, 1) != base
