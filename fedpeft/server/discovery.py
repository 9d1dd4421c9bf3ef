"""Round 0: wait for the nodes and ask each to describe itself.

Every node answers one ``query.describe`` message with its partition, and, where they
apply, its LoRA rank and the DP cost of one of its rounds.  Those go, explicitly, to the
layers of the strategy stack that need them (:meth:`ServerState.hand_discovery`).  The
messages are metered like any other, so their bytes count in round 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedpeft.config import RunConfig
from fedpeft.privacy import RoundPlan
from fedpeft.wire import METRICS_KEY

DISCOVERY_BATCH = 500  # nodes asked to describe themselves at once


class ClientDiscoveryError(RuntimeError):
    """The expected clients did not all announce themselves in time."""


@dataclass(frozen=True)
class Discovery:
    """What the nodes announced (node ids are this engine's)."""

    partition_of: dict[int, int]  # node id -> partition id
    ranks: dict[int, int]  # node id -> LoRA rank (nodes that announced one)
    plans: dict[int, RoundPlan]  # node id -> DP cost of one round (local DP only)

    @classmethod
    def of(cls, described: dict[int, dict[str, float]]) -> Discovery:
        return cls(
            partition_of={node: int(m["partition-id"]) for node, m in described.items()},
            ranks={n: int(m["lora-rank"]) for n, m in described.items() if "lora-rank" in m},
            plans={
                node: plan for node, m in described.items() if (plan := RoundPlan.from_metrics(m)) is not None
            },
        )


def discover_clients(grid: Grid, cfg: RunConfig) -> Discovery:
    """Wait for ``num-clients`` nodes and ask each to describe itself (partition, DP plan)."""
    return Discovery.of(describe_nodes(grid, cfg))


def describe_nodes(grid: Grid, cfg: RunConfig) -> dict[int, dict[str, float]]:
    """node id -> the scalar metrics of its ``query.describe`` reply."""
    deadline = time.monotonic() + cfg.connect_timeout
    while len(nodes := sorted(grid.get_node_ids())) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise ClientDiscoveryError(
                f"only {len(nodes)} of num-clients={cfg.num_clients} nodes connected within "
                f"connect-timeout={cfg.connect_timeout} s"
            )
        time.sleep(0.2)
    # In batches, each batch's replies reduced to their metrics before the next is asked, so
    # that at most one batch of messages is alive at a time (with 10,000 virtual nodes, all
    # queries in flight at once raised the driver's peak memory: benchmarks/scale.py).
    described: dict[int, dict[str, float]] = {}
    for start in range(0, len(nodes), DISCOVERY_BATCH):
        ask = [
            Message(RecordDict({"config": ConfigRecord()}), node, "query.describe")
            for node in nodes[start : start + DISCOVERY_BATCH]
        ]
        for reply in grid.send_and_receive(ask, timeout=max(deadline - time.monotonic(), 1.0)):
            described[reply.metadata.src_node_id] = _described(reply, cfg)
    if len(described) < cfg.num_clients:
        raise ClientDiscoveryError(f"only {len(described)} of {cfg.num_clients} nodes answered discovery")
    return described


def _described(reply: Message, cfg: RunConfig) -> dict[str, float]:
    """The scalar metrics of one node's ``query.describe`` reply, checked."""
    if reply.has_error():
        raise ClientDiscoveryError(f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
    metrics = reply.content.metric_records[METRICS_KEY]
    if _int(metrics, "num-partitions") != cfg.num_clients:
        raise ClientDiscoveryError(
            f"nodes were started with num-partitions={metrics['num-partitions']} but the run config "
            f"says num-clients={cfg.num_clients}; start as many SuperNodes as num-clients"
        )
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _int(metrics: MetricRecord, key: str) -> int:
    value = metrics[key]
    if not isinstance(value, (int, float)):
        raise ClientDiscoveryError(f"discovery reply has a non-scalar {key!r}: {value!r}")
    return int(value)
