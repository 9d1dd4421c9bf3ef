"""Keeps the metrics the strategy stack returns, so every round record carries them.

Flower's ``Strategy.start`` keeps what ``aggregate_train`` / ``aggregate_evaluate`` return
in the ``Result`` it hands back at the very end; a run that crashes, or a user who wants
to see their strategy's figure per round, gets nothing from that.  This wrapper sits
outermost and copies each round's returned metrics aside; the round recorder takes them
into ``rounds.jsonl`` / ``rounds.csv`` (``strategy_metrics``), and ``fedpeft report``
offers them.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper

Scalar = float | list[float]


class StrategyMetricsTap(StrategyWrapper):
    """Pass-through wrapper that records the stack's returned metrics per round."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.by_round: dict[int, dict[str, Scalar]] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        self._keep(server_round, "train", metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        self._keep(server_round, "evaluate", metrics)
        return metrics

    def take(self, server_round: int) -> dict[str, Scalar]:
        """``{"train.<key>": value, "evaluate.<key>": value}`` of ``server_round`` (once)."""
        return self.by_round.pop(server_round, {})

    def _keep(self, server_round: int, stage: str, metrics: MetricRecord | None) -> None:
        if not metrics:
            return
        kept = self.by_round.setdefault(server_round, {})
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                kept[f"{stage}.{key}"] = float(value)
            elif isinstance(value, list):
                kept[f"{stage}.{key}"] = [float(v) for v in value]
