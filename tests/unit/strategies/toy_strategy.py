"""A strategy written the way a user adds one: this module plus one registry line
(``STRATEGIES["toy-ranked"] = (RankedFedAvg, "...")``, done by the test that uses it).

It declares its traits in one typed object, takes the ranks the nodes announce at
discovery through the :class:`~strategies.traits.UsesClientRanks` protocol, and returns a
metric of its own from aggregation, which the run records per round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from strategies.traits import StrategyTraits


class RankedFedAvg(FedAvg):
    """FedAvg that knows every node's LoRA rank and reports how many it knows."""

    traits = StrategyTraits(conformance={"kind": "mean", "weighted": True})

    def __init__(self, **fedavg: object) -> None:
        super().__init__(**fedavg)  # type: ignore[arg-type]
        self.ranks: dict[int, int] = {}

    def set_client_ranks(self, ranks: Mapping[int, int]) -> None:
        self.ranks = dict(ranks)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["toy-known-ranks"] = len(self.ranks)
        metrics["toy-rank-sum"] = sum(self.ranks.get(r.metadata.src_node_id, 0) for r in replies)
        return arrays, metrics
