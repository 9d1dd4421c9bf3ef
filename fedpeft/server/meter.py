"""Byte metering and deterministic ordering, as a wrapper around Flower's ``Grid``.

Every message the ServerApp sends and every reply it receives passes through
``Grid.send_and_receive`` / ``push_messages`` / ``pull_messages``, whatever strategy is
running, Flower's or a user's.  Wrapping the grid (rather than one strategy) therefore
meters exactly what crosses the wire, after every codec and DP wrapper has done its work,
and sees message ids as they are actually sent.

The wrapper also removes two sources of nondeterminism: ``get_node_ids`` lists nodes in
partition order (simulation node ids are random), and replies are returned sorted by
partition, so float sums in aggregation happen in the same order in every run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft.flower_compat import Run
from fedpeft.wire import message_sizes, payload_size
from strategies.grid import MessageGrid


@dataclass
class Exchange:
    """One message sent to one node and what (if anything) came back."""

    node_id: int
    message_type: str
    bytes_down: int
    payload_down: int
    bytes_up: int = 0
    payload_up: int = 0
    replied: bool = False
    error: str = ""  # Flower error reason, or "no reply" when nothing came back
    metrics: dict[str, float] = field(default_factory=dict)
    # The reply until the round is drained: wrappers may add server-side figures to its
    # metrics (the codec's sizes, read from the payload), which cost nothing on the wire.
    reply: Message | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.replied and not self.error


class MeteredGrid(MessageGrid):
    """A ``Grid`` that records the serialized size of every message in both directions."""

    def __init__(self, inner: Grid, node_order: Callable[[int], int] | None = None) -> None:
        self._inner = inner
        self.node_order: Callable[[int], int] = node_order or (lambda node_id: node_id)
        self._open: dict[str, Exchange] = {}  # message id -> exchange awaiting a reply
        self._done: list[Exchange] = []
        self._waited: dict[str, float] = {}  # message type -> seconds in send_and_receive

    # ---------------------------------------------------------------- delegation
    def set_run(self, run: Run) -> None:  # pragma: no cover - the inner grid is already set
        self._inner.set_run(run)

    @property
    def run(self) -> Run:
        return self._inner.run

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self._inner.get_node_ids(), key=self.node_order)

    # ---------------------------------------------------------------- metering
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        ids = list(self._inner.push_messages(batch))  # assigns message ids in place
        sent = {m.metadata.message_id: m for m in batch}
        for msg_id in ids:
            msg = sent.get(msg_id)
            if msg is None:  # pragma: no cover - deployment grids may return other ids
                continue
            self._open[msg_id] = Exchange(
                msg.metadata.dst_node_id, msg.metadata.message_type, 0, payload_size(msg)
            )
        for msg_id, size in zip(sent, message_sizes(list(sent.values())), strict=True):
            if msg_id in self._open:
                self._open[msg_id].bytes_down = size
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._inner.pull_messages(message_ids))
        for reply, size in zip(replies, message_sizes(replies), strict=True):
            ex = self._open.pop(reply.metadata.reply_to_message_id, None)
            if ex is None:
                continue
            ex.replied, ex.bytes_up, ex.payload_up = True, size, payload_size(reply)
            if reply.has_error():
                ex.error = describe_error(reply.error.code, reply.error.reason or "")
            else:
                ex.reply = reply
            self._done.append(ex)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every reply is in or ``timeout`` passes; sorted by node order."""
        t0 = time.perf_counter()
        batch = list(messages)
        replies = self._send_and_receive(batch, timeout)
        if batch:  # a strategy may configure no messages (fraction-evaluate = 0)
            kind = batch[0].metadata.message_type
            self._waited[kind] = self._waited.get(kind, 0.0) + time.perf_counter() - t0
        return replies

    def _send_and_receive(self, messages: list[Message], timeout: float | None) -> list[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            if getattr(self._inner, "answers_at_once", False):  # the in-process grid: no more will come
                break
            time.sleep(0.02 if got else 0.05)
        for msg_id in pending:  # never answered: a failed client, recorded as such
            ex = self._open.pop(msg_id, None)
            if ex is not None:
                ex.error = "no reply before the round timeout"
                self._done.append(ex)
        return sorted(replies, key=lambda m: self.node_order(m.metadata.src_node_id))

    def drain_waited(self) -> dict[str, float]:
        """Seconds spent waiting on replies since the last call, by message type."""
        waited, self._waited = self._waited, {}
        return waited

    def drain(self) -> list[Exchange]:
        """All finished exchanges since the last call, in node order."""
        done, self._done = self._done, []
        for ex in done:
            if ex.reply is not None:
                ex.metrics, ex.reply = _scalar_metrics(ex.reply), None
        return sorted(done, key=lambda ex: self.node_order(ex.node_id))


_FLOWER_REASON = re.compile(r"^<class '(?P<cls>[^']+)'>:<'(?P<text>.*)'>$", re.S)
# Ray wraps the ClientApp's exception in its own; the original is the line before this.
_CAUSE = re.compile(r"\n(?P<cls>[\w.]+): (?P<text>[^\n]*)\n\nThe above exception was the direct cause")


def describe_error(code: int, reason: str) -> str:
    """``error CODE: Class: message`` for a Flower error reply, the same on every engine.

    Flower writes a ClientApp's exception as ``<class '...'>:<'...'>``; on Ray the text is
    Ray's own exception with a traceback, a process id and an actor id, which change from
    run to run.  The record keeps the ClientApp's exception class and message only.
    """
    match = _FLOWER_REASON.match(reason.strip())
    if match:
        cause = _CAUSE.search(match["text"])
        cls, text = (cause["cls"], cause["text"]) if cause else (match["cls"], match["text"])
        reason = f"{cls.rsplit('.', 1)[-1]}: {text}"
    return f"error {code}: {reason}"


def _scalar_metrics(reply: Message) -> dict[str, float]:
    out: dict[str, float] = {}
    for record in reply.content.metric_records.values():
        for key, value in record.items():
            if isinstance(value, (int, float)):
                out[key] = float(value)
    return out
