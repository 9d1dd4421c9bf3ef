"""Turns each finished round into a :class:`~fedpeft.results.records.RoundRecord`.

Flower's ``Strategy.start`` owns the round loop and calls ``evaluate_fn(round, arrays)``
once before round 1 and once at the very end of every round (after aggregation and any
client-side evaluation).  The recorder is that ``evaluate_fn``: it evaluates the global
model on the server's test split, collects what the metered grid saw during the round,
writes the record, prints one line, and seeds client sampling for the next round from
(seed, round) so sampling does not depend on anything else that used ``random``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from fedpeft.results.records import (
    ClientRecord,
    ResultsWriter,
    RoundRecord,
    format_round_line,
    mean_train_loss,
)
from fedpeft.runtime import derive_seed
from fedpeft.server.meter import Exchange, MeteredGrid
from fedpeft.server.rejections import RejectionLog
from fedpeft.tasks.base import Evaluation

# (arrays, whole test split?) -> the task's loss and metrics, and how many examples they cover
EvaluateFn = Callable[[ArrayRecord, bool], tuple[Evaluation, int]]


@dataclass(frozen=True)
class EvaluationSchedule:
    """Which rounds the server evaluates (``evaluate-every``), and on what (``evaluate-examples``).

    Round 0 and the last round always; between them every ``every``-th.  Only the last
    round is sure to use the whole test split: earlier ones may use a fixed subsample.
    """

    num_rounds: int
    every: int = 1

    def evaluates(self, server_round: int) -> bool:
        return server_round == 0 or server_round % self.every == 0 or self.whole(server_round)

    def whole(self, server_round: int) -> bool:
        return server_round >= self.num_rounds


class RoundRecorder:
    """The ``evaluate_fn`` of a run: global evaluation + one record per round."""

    def __init__(
        self,
        grid: MeteredGrid,
        writer: ResultsWriter,
        evaluate: EvaluateFn,
        *,
        seed: int,
        num_rounds: int,
        partition_of: dict[int, int],
        every: int = 1,
        rejections: RejectionLog | None = None,
        figures: Callable[[int], dict[str, Any]] | None = None,
        echo: Callable[[str], None] = print,
        after_round: Callable[[int, ArrayRecord], None] | None = None,
        offset: int = 0,
        resumed: bool = False,
    ) -> None:
        self.grid = grid
        self.writer = writer
        self.evaluate = evaluate
        self.seed = seed
        self.num_rounds = num_rounds
        self.schedule = EvaluationSchedule(num_rounds, every)
        self.partition_of = partition_of
        self.echo = echo
        self.rejections = rejections or RejectionLog()
        self.figures = figures  # round -> more fields of its record (privacy, alpha, strategy)
        # Called with each finished round's global tensors (the checkpoint is written there).
        self.after_round = after_round
        # A resumed run: Flower's Strategy.start counts from 1 again; rounds are offset + n.
        # Its round 0 (offset 0 too, when the crash came before round 1 was checkpointed)
        # is already recorded.
        self.offset = offset
        self.resumed = resumed
        self._t_round = time.perf_counter()

    def start_clock(self) -> None:
        """Start timing round 0 (discovery of clients + initial evaluation)."""
        self._t_round = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if self.resumed and server_round == 0:
            # Resumed: round ``offset`` is already recorded. What the grid carried since
            # (the discovery query of the restart) was counted in round 0 the first time.
            self.grid.drain()
            self.grid.drain_waited()
            self.rejections.drain()
            self._t_round = time.perf_counter()
            return None
        server_round += self.offset
        t_eval = time.perf_counter()
        result, evaluated_on = Evaluation(math.nan, {"accuracy": math.nan}), 0
        if self.schedule.evaluates(server_round):
            result, evaluated_on = self.evaluate(arrays, self.schedule.whole(server_round))
        seconds_eval = time.perf_counter() - t_eval
        loss, accuracy = result.loss, result.metrics["accuracy"]
        rejected = self.rejections.drain()
        exchanges = self.grid.drain()
        clients = [self._client_record(ex, rejected.pop(ex.node_id, None)) for ex in exchanges]
        # Clients held back before any message was sent (e.g. an exhausted privacy budget).
        # In partition order: node ids are random on Flower's engines.
        held = sorted(rejected.items(), key=lambda item: (self.partition_of.get(item[0], -1), item[0]))
        clients += [self._held_back(node, reason) for node, reason in held]
        now = time.perf_counter()
        wall = now - self._t_round
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            train_loss=mean_train_loss(clients) if server_round > 0 else None,
            clients=clients,
            wall_seconds=wall,
            time_split=time_split(wall, seconds_eval, self.grid.drain_waited()),
            metrics={k: float(v) for k, v in result.metrics.items() if k != "accuracy"},
            evaluated_on=evaluated_on,
            **(self.figures(server_round) if self.figures else {}),
        )
        self.writer.add_round(record)
        self.echo(format_round_line(record, self.num_rounds))
        # Sampling of the next round depends only on (seed, round).
        random.seed(derive_seed(self.seed, "sampling", server_round + 1))
        if self.after_round is not None:
            self.after_round(server_round, arrays)
        self._t_round = time.perf_counter()
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def _held_back(self, node: int, reason: str) -> ClientRecord:
        return ClientRecord(
            node, self.partition_of.get(node, -1), 0, 0, 0, 0, 0, None, ok=False, error=reason
        )

    def _client_record(self, ex: Exchange, rejected: str | None) -> ClientRecord:
        loss = ex.metrics.get("train_loss")
        ok = ex.ok and rejected is None
        return ClientRecord(
            node_id=ex.node_id,
            partition_id=self.partition_of.get(ex.node_id, -1),
            bytes_down=ex.bytes_down,
            bytes_up=ex.bytes_up,
            payload_down=ex.payload_down,
            payload_up=ex.payload_up,
            num_examples=int(ex.metrics.get("num-examples", 0)) if ok else 0,
            train_loss=loss if ok and loss is not None and math.isfinite(loss) else None,
            ok=ok,
            error=rejected or ex.error,
            metrics={k: v for k, v in ex.metrics.items() if k not in ("num-examples", "train_loss")},
        )


# Flower's message types, as the time split names them.
_WAIT_NAMES = {"train": "clients-train", "evaluate": "clients-evaluate"}


def time_split(wall: float, server_evaluate: float, waited: dict[str, float]) -> dict[str, float]:
    """Where a round's ``wall`` seconds went (:attr:`RoundRecord.time_split`): waiting for
    each kind of client reply, the server's evaluation, and the server's own work (the rest:
    discovery in round 0 counts as waiting on "query" messages)."""
    parts = {_WAIT_NAMES.get(kind, f"clients-{kind}"): sec for kind, sec in sorted(waited.items())}
    parts["server-evaluate"] = server_evaluate
    parts["server"] = max(wall - sum(parts.values()), 0.0)
    return {k: round(v, 4) for k, v in parts.items()}
