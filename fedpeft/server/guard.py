"""Refuse broken or hostile dense updates before any strategy aggregates them.

:class:`UpdateGuard` wraps a strategy (Flower's, ours or a user's) and checks every train
reply against what that node was sent: the same tensor names, the same shapes, floating
point, every value finite, and -- when ``strategy.max-update-norm`` is set -- an update
``reply - sent`` whose L2 norm stays within the bound.  A reply that fails is left out of
the round and recorded (node and reason) in the :class:`~fedpeft.server.rejections.RejectionLog`,
so the round goes on with the others and the round record says who was refused and why.
With fewer than ``min-replies`` usable replies the round leaves the global model as it was.

It sits inside the codec wrapper (it sees decoded dense tensors) and outside Flower's
central-DP wrappers (a NaN must never reach clipping, which would spread it).
Strategies that change the layout between what they send and what comes back (FLoRA's
merged form, FlexLoRA's per-rank tensors declare ``StrategyTraits.rewrites_arrays``) keep their own
layout checks; the guard then checks only that every value is finite.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.recovery.crash import crash_point
from fedpeft.server.rejections import RejectionLog
from fedpeft.wire import ARRAYS_KEY, from_record
from strategies.traits import traits_of
from strategies.wrapper import StrategyWrapper

log = logging.getLogger("fedpeft")


class UpdateGuard(StrategyWrapper):
    """Drop (and record) train replies whose tensors do not fit what the node was sent."""

    def __init__(
        self, inner: Strategy, rejections: RejectionLog, max_update_norm: float = 0.0, min_replies: int = 1
    ) -> None:
        super().__init__(inner)
        self.rejections = rejections
        self.max_update_norm = max_update_norm
        self.min_replies = min_replies
        self.layout_checks = not traits_of(inner).rewrites_arrays
        self._sent: dict[int, dict[str, np.ndarray]] = {}  # node -> tensors of its train message

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        decoded: dict[int, dict[str, np.ndarray]] = {}  # record identity -> tensors (shared records once)
        self._sent = {}
        for msg in messages:
            record = msg.content.array_records.get(ARRAYS_KEY)
            if record is None:
                continue
            if id(record) not in decoded:  # FedAvg sends one record to every node: decode it once
                decoded[id(record)] = from_record(record)
            self._sent[msg.metadata.dst_node_id] = decoded[id(record)]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        crash_point("aggregate")  # every strategy stack has a guard: the moment aggregation starts
        kept = []
        for reply in replies:
            reason = None if reply.has_error() else self.problem(reply)
            if reason is None:
                kept.append(reply)
            else:
                self.rejections.reject(reply.metadata.src_node_id, f"rejected update: {reason}")
        if len(kept) < self.min_replies:
            # Too few usable replies (failed, timed out or refused): keep the global model.
            log.warning(
                "round %d: %d usable replies < min-replies %d", server_round, len(kept), self.min_replies
            )
            return None, None
        return self.inner.aggregate_train(server_round, kept)

    def problem(self, reply: Message) -> str | None:
        """Why ``reply`` must not be aggregated, or None when it is fine."""
        record = reply.content.array_records.get(ARRAYS_KEY)
        if record is None:
            return "no tensors in the reply"
        try:
            got = from_record(record)
        except Exception as err:  # a record that does not even deserialize
            return f"unreadable tensors ({type(err).__name__}: {err})"
        sent = self._sent.get(reply.metadata.src_node_id)
        for name, value in got.items():
            if not np.issubdtype(value.dtype, np.floating):
                return f"tensor {name!r} has dtype {value.dtype}, not floating point"
            if not np.all(np.isfinite(value)):
                return f"tensor {name!r} holds NaN or Inf"
        if not self.layout_checks or sent is None:
            return None
        missing, unexpected = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
        if missing or unexpected:
            return f"wrong tensor names: missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})"
        for name, value in got.items():
            if value.shape != sent[name].shape:
                return f"tensor {name!r} has shape {value.shape}, sent {sent[name].shape}"
        if self.max_update_norm > 0:
            norm = float(np.sqrt(sum(np.sum((got[k].astype(np.float64) - sent[k]) ** 2) for k in got)))
            if norm > self.max_update_norm:
                return f"update norm {norm:.4g} exceeds strategy.max-update-norm = {self.max_update_norm:g}"
        return None
