"""ComPEFT's alpha, tuned on the server's validation data every round.

ComPEFT (Yadav et al., 2023) scales its ternary update by alpha * std and tunes alpha on
validation data.  In a federation the right scale also depends on how the clients'
sparse updates overlap: FedAvg divides each coordinate by the number of clients, while
with top-k only a few of them sent that coordinate, so the averaged update comes out
several times too small (measured in ``benchmarks/frontier.py``'s ablation).  Scaling the
aggregate by alpha is the same as scaling every client's update by it, so the server can
tune it where the data for it is: its validation split.  Each round it tries every
candidate on the aggregated update and keeps the one with the lowest validation loss;
1 among the candidates means it never does worse there than plain aggregation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.wire import from_record, to_record
from strategies.wrapper import StrategyWrapper

Score = Callable[[dict[str, np.ndarray]], float]  # arrays -> validation loss


class AlphaSearch(StrategyWrapper):
    """Scale the aggregated update by the candidate with the lowest validation loss."""

    def __init__(self, inner: Strategy, candidates: tuple[float, ...], score: Score | None = None) -> None:
        super().__init__(inner)
        self.candidates = candidates
        self.score = score
        self.chosen: dict[int, float] = {}  # round -> alpha
        self._start: dict[int, dict[str, np.ndarray]] = {}

    def bind(self, score: Score) -> None:
        """Attach the validation scorer (not checkpointed: it holds the model)."""
        self.score = score

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"score": None}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._start[server_round] = from_record(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        start = self._start.pop(server_round, None)
        if arrays is None or start is None:
            return arrays, metrics
        if self.score is None:
            raise RuntimeError("AlphaSearch has no validation scorer: call bind() before the run")
        new = from_record(arrays)
        delta = {k: new[k] - start[k] for k in new}
        losses = {
            a: self.score({k: start[k] + np.float32(a) * delta[k] for k in new}) for a in self.candidates
        }
        best = min(self.candidates, key=lambda a: (losses[a], abs(a - 1.0)))  # ties: the plainer step
        self.chosen[server_round] = best
        chosen = {k: start[k] + np.float32(best) * delta[k] for k in new}
        return to_record(chosen), metrics
