"""A strategy that delegates everything to an inner one: the base of cross-cutting wrappers.

Flower adds DP as wrappers around a strategy; fedpeft adds its codec and privacy budget
the same way.  A wrapper subclasses :class:`StrategyWrapper` and overrides only the
calls it changes, so it composes with any strategy, Flower's or a user's.

:func:`inner_of` / :func:`wrapper_chain` find the strategy a wrapper wraps: this project's
:class:`StrategyWrapper` (``inner``) and Flower's DP wrappers (``strategy``), the only two
wrapper families there are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

__all__ = ["StrategyWrapper", "inner_of", "wrapper_chain"]

#: Flower's wrappers keep the wrapped strategy as ``.strategy``.
FLOWER_WRAPPERS = (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)


class StrategyWrapper(Strategy):
    """Pass every call through to ``inner``."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def inner_of(strategy: Strategy) -> Strategy | None:
    """The strategy ``strategy`` wraps, or None for a strategy that wraps nothing."""
    if isinstance(strategy, StrategyWrapper):
        return strategy.inner
    if isinstance(strategy, FLOWER_WRAPPERS):
        inner: Strategy = strategy.strategy
        return inner
    return None


def wrapper_chain(strategy: Strategy) -> Iterator[Strategy]:
    """``strategy``, then each strategy it wraps, outermost first."""
    seen: set[int] = set()
    current: Strategy | None = strategy
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = inner_of(current)
