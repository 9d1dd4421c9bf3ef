"""Who trains in a round, when the server decides it itself: Poisson client sampling, and a
grid that shows a strategy only the chosen cohort.

Flower's strategies draw a fixed number of clients per round (``fraction_train`` of the
connected nodes, without replacement).  Amplified user-level DP accounting (McMahan et al.,
2018) assumes instead that every client joins every round independently with probability
``q``, so the cohort size is random; :class:`PoissonSampling` does that draw and lets the
strategy it wraps build its messages for exactly those clients (the strategy is built to
take every node it is shown, see :func:`fedpeft.server.stack.strategy_stack`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.flower_compat import Run
from fedpeft.runtime import derive_seed
from strategies.grid import MessageGrid
from strategies.wrapper import StrategyWrapper


class CohortGrid(MessageGrid):
    """A read-only view of a grid whose ``get_node_ids`` lists only ``cohort``.

    A strategy's ``configure_train`` reads only the node ids; sending still goes through
    the real grid (the one ``Strategy.start`` holds), so metering is untouched.
    """

    def __init__(self, inner: Grid, cohort: Sequence[int]) -> None:
        self._inner = inner
        self._cohort = list(cohort)

    def set_run(self, run: Run) -> None:  # pragma: no cover - never sent through
        raise NotImplementedError("a cohort view only lists node ids")

    @property
    def run(self) -> Run:
        return self._inner.run

    def get_node_ids(self) -> Iterable[int]:
        return list(self._cohort)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("a cohort view only lists node ids")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("a cohort view only lists node ids")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("a cohort view only lists node ids")


def poisson_cohort(nodes: Sequence[int], rate: float, seed: int, server_round: int) -> list[int]:
    """Each of ``nodes`` (in the given, deterministic order) kept with probability ``rate``;
    the draw depends only on (seed, round), so a resumed run samples the same cohorts."""
    rng = random.Random(derive_seed(seed, "poisson-sampling", server_round))
    return [n for n in nodes if rng.random() < rate]


class PoissonSampling(StrategyWrapper):
    """Train each round on a Poisson sample of the clients (rate ``rate``); the innermost
    wrapper, so everything outside (central DP, codec, metering) sees the sampled cohort.

    An empty draw sends nothing: the round keeps the model (a DP wrapper outside still
    accounts the round, as the sampled Gaussian mechanism does).  ``cohorts`` keeps each
    round's size.
    """

    def __init__(self, inner: Strategy, rate: float, seed: int) -> None:
        super().__init__(inner)
        self.rate = rate
        self.seed = seed
        self.cohorts: dict[int, int] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        cohort = poisson_cohort(list(grid.get_node_ids()), self.rate, self.seed, server_round)
        self.cohorts[server_round] = len(cohort)
        if not cohort:
            return []
        return self.inner.configure_train(server_round, arrays, config, CohortGrid(grid, cohort))
