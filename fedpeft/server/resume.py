"""Resuming the strategy stack: round numbers that continue, node ids that change.

A resumed run starts Flower's ``Strategy.start`` again from round 1; :class:`RoundOffset`
numbers the rounds from the checkpoint's round for everything inside it.  A new engine
gives the nodes new ids: :func:`remap_nodes` renames them in every layer of the stack
that keeps per-node state (declared by :class:`strategies.traits.RemapsNodes`).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.traits import remap_nodes
from strategies.wrapper import StrategyWrapper

__all__ = ["RoundOffset", "remap_nodes"]


class RoundOffset(StrategyWrapper):
    """Number the rounds of a resumed ``Strategy.start`` from ``offset + 1`` for the inner strategy."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        super().__init__(inner)
        self.offset = offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)
