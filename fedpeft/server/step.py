"""The server's step: a learning rate, momentum and an optional validation search over
the aggregate of any strategy, coded or dense.

Every strategy returns a new global; the step treats ``u_t = aggregate - global`` as the
update and applies, as pure functions over explicit state (FedJAX's aggregators):

    v_t = momentum * v_{t-1} + u_t          (server momentum, FedAvgM: Hsu et al. 2019)
    global_{t+1} = global_t + s_t * learning_rate * v_t

``s_t`` is 1, or, with ``server.step-search``, the candidate with the lowest loss on the
server's validation split (ComPEFT, Yadav et al. 2023, tunes its alpha on validation data
the same way; scaling the aggregate equals scaling every client's update).  The search
needs labelled data on the server, so it is off by default; it is a setting of the
aggregation, not of a codec, so a dense baseline can have exactly the same help.
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

Arrays = dict[str, np.ndarray]
Score = Callable[[Arrays], float]  # arrays -> validation loss


def momentum_update(velocity: Arrays | None, update: Arrays, momentum: float) -> Arrays:
    """``momentum * velocity + update`` (``update`` itself when there is no velocity yet)."""
    if velocity is None or momentum == 0.0:
        return {k: v.astype(np.float32, copy=True) for k, v in update.items()}
    return {k: np.float32(momentum) * velocity[k] + update[k] for k in update}


def step_to(start: Arrays, direction: Arrays, scale: float) -> Arrays:
    """``start + scale * direction``, in float32."""
    s = np.float32(scale)
    return {k: start[k] + s * direction[k] for k in start}


def best_scale(
    candidates: tuple[float, ...], loss_of: Callable[[float], float]
) -> tuple[float, dict[float, float]]:
    """The candidate with the lowest loss (ties: the one closest to 1, the plainer step)."""
    losses = {c: loss_of(c) for c in candidates}
    return min(candidates, key=lambda c: (losses[c], abs(c - 1.0))), losses


class ServerStep(StrategyWrapper):
    """Turn the inner strategy's aggregate into the server's step (module docstring)."""

    def __init__(
        self,
        inner: Strategy,
        learning_rate: float = 1.0,
        momentum: float = 0.0,
        candidates: tuple[float, ...] = (),
        score: Score | None = None,
    ) -> None:
        super().__init__(inner)
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.candidates = candidates
        self.score = score
        self.velocity: Arrays | None = None  # checkpointed with the stack: resumes bit-identical
        self.chosen: dict[int, float] = {}  # round -> scale chosen on validation data
        self._start: dict[int, Arrays] = {}

    @property
    def searches(self) -> bool:
        return bool(self.candidates)

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
        new = from_record(arrays)
        self.velocity = momentum_update(self.velocity, {k: new[k] - start[k] for k in new}, self.momentum)
        direction = {k: np.float32(self.learning_rate) * v for k, v in self.velocity.items()}
        scale = 1.0
        if self.candidates:
            score = self.score
            if score is None:
                raise RuntimeError("ServerStep has no validation scorer: call bind() before the run")
            scale, _ = best_scale(self.candidates, lambda c: score(step_to(start, direction, c)))
            self.chosen[server_round] = scale
        return to_record(step_to(start, direction, scale)), metrics
