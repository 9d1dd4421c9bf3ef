"""What crossed the Fleet API between a SuperNode and the SuperLink, measured independently.

How a ``Message`` travels in Flower 1.41 (read from ``flwr.supernode.fleet_http_connection``
and ``flwr.supercore.inflatable``): the Fleet API is protobuf over HTTP(S), one POST per
RPC (``/flwr.proto.Fleet/<Method>``), not one protobuf per message.  A message is split
into an object tree (Message -> RecordDict -> ArrayRecord / MetricRecord / ConfigRecord ->
Array -> ArrayChunk), each object content-addressed by the SHA-256 of its bytes:

* downlink: ``PullMessages`` returns the message's metadata (no content) and its object
  tree; the node then fetches every object with one ``PullObject`` each and confirms with
  ``ConfirmMessageReceived``;
* uplink: ``PushMessages`` sends the reply's metadata and object tree; the SuperLink
  answers with the ids it still needs; the node sends each with one ``PushObject``.

``python -m fedpeft.running.deploy_probe --probe-log FILE <flower-supernode arguments>`` runs
Flower's own SuperNode with one extra client interceptor on its Fleet HTTP client.  It
writes one JSON line per RPC (method, bytes of the serialized request and response
bodies) and, once every object of a message has crossed, one line per message: the bytes
of its objects and the size that ``fedpeft.wire.message_size`` gives for the message
*rebuilt from those bytes*.  :func:`compare_traffic` relates that to the ServerApp's own
accounting (``bytes_down`` / ``bytes_up`` in ``rounds.jsonl``).  HTTP headers and TLS
framing are not counted: the figures are protobuf bodies, what Flower serializes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedpeft import flower_compat

FLEET = "/flwr.proto.Fleet/"
MESSAGE_RPCS = ("PullMessages", "PullObject", "ConfirmMessageReceived", "PushMessages", "PushObject")


def _tree_ids(tree: Any) -> Iterator[str]:
    """Every object id in an ``ObjectTree`` proto (the root first)."""
    yield tree.object_id
    for child in tree.children:
        yield from _tree_ids(child)


@dataclass
class _Pending:
    """A message whose objects are crossing: what has arrived so far."""

    direction: str  # "down" (pulled by the node) or "up" (pushed by the node)
    message_id: str
    message_type: str
    group_id: str
    root: str
    needed: set[str]  # object ids that must cross before the message is complete
    contents: dict[str, bytes] = field(default_factory=dict)


class FleetProbe:
    """A ``ProtobufClientInterceptor`` that logs every Fleet RPC and every message's objects."""

    def __init__(self, log_path: str | Path, partition_id: int) -> None:
        self.path = Path(log_path)
        self.partition_id = partition_id
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}  # message id -> pending
        self._fh = self.path.open("a", encoding="utf-8", buffering=1)

    # ------------------------------------------------------------ interceptor
    def intercept(self, context: Any, call_next: Callable[[Any], Any]) -> Any:
        response = call_next(context)
        method = context.rpc_method.removeprefix(FLEET)
        body = response.content if response.status_code == 200 else b""
        with self._lock:
            self._write(
                {
                    "kind": "rpc",
                    "method": method,
                    "request_bytes": len(context.request.content),
                    "response_bytes": len(response.content),
                    "status": response.status_code,
                }
            )
            if body or method == "PushObject":
                self._track(method, context.message, body)
        return response

    # ------------------------------------------------------------ messages
    def _track(self, method: str, request: Any, body: bytes) -> None:
        """Follow a message's objects across the RPCs that carry them."""
        if method == "PullMessages":
            pulled = flower_compat.decode_fleet_response(method, body)
            for proto, tree in zip(pulled.messages_list, pulled.message_object_trees, strict=True):
                self._open("down", proto.metadata, tree, set(_tree_ids(tree)))
        elif method == "PushMessages":
            pushed = flower_compat.decode_fleet_response(method, body)
            for proto, tree in zip(request.messages_list, request.message_object_trees, strict=True):
                self._open("up", proto.metadata, tree, set(pushed.objects_to_push) & set(_tree_ids(tree)))
        elif method == "PullObject":
            got = flower_compat.decode_fleet_response(method, body)
            if got.object_found and got.object_available:
                self._arrived(request.object_id, got.object_content)
        elif method == "PushObject":
            self._arrived(request.object_id, request.object_content)

    def _open(self, direction: str, metadata: Any, tree: Any, needed: set[str]) -> None:
        pending = _Pending(
            direction,
            metadata.message_id or tree.object_id,
            metadata.message_type,
            metadata.group_id,
            tree.object_id,
            needed,
        )
        self._pending[pending.message_id] = pending
        if not needed:
            self._finish(pending)

    def _arrived(self, object_id: str, content: bytes) -> None:
        for pending in list(self._pending.values()):
            if object_id in pending.needed and object_id not in pending.contents:
                pending.contents[object_id] = content
                if pending.needed <= pending.contents.keys():
                    self._finish(pending)

    def _finish(self, pending: _Pending) -> None:
        """One line per message: its objects' bytes and the size of the message they rebuild."""
        del self._pending[pending.message_id]
        record: dict[str, Any] = {
            "kind": "message",
            "direction": pending.direction,
            "message_id": pending.message_id,
            "message_type": pending.message_type,
            "group_id": pending.group_id,
            "partition_id": self.partition_id,
            "objects": len(pending.contents),
            "object_bytes": sum(len(c) for c in pending.contents.values()),
            "message_size": None,
            "payload_size": None,
        }
        if pending.root in pending.contents:  # every object crossed: rebuild the message
            msg = rebuild_message(pending.root, pending.contents, pending.message_id)
            from fedpeft.wire import message_size, payload_size

            record["message_size"] = message_size(msg)
            record["payload_size"] = payload_size(msg)
            record["group_id"] = msg.metadata.group_id or pending.group_id
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record | {"t": time.time()}) + "\n")


def rebuild_message(root: str, contents: dict[str, bytes], message_id: str) -> Message:
    """The ``Message`` that a set of object contents encodes (as Flower inflates it)."""
    msg = flower_compat.inflate_message(root, contents)
    if not isinstance(msg, Message):
        raise TypeError(f"object {root} is a {type(msg).__name__}, not a Message")
    flower_compat.set_message_id(msg, message_id)  # deflate() leaves the id out
    return msg


def _partition_of(argv: Sequence[str]) -> int:
    """``partition-id`` from the ``--node-config`` argument (-1 when absent)."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "--node-config":
            for pair in argv[i + 1].split():
                key, _, value = pair.partition("=")
                if key == "partition-id":
                    return int(value)
    return -1


def main(argv: Sequence[str] | None = None) -> None:
    """``--probe-log FILE`` then Flower's ``flower-supernode`` arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--probe-log":
        raise SystemExit(
            "usage: python -m fedpeft.running.deploy_probe --probe-log FILE <flower-supernode args>"
        )
    log_path, rest = args[1], args[2:]
    # Flower's own SuperNode; every Fleet HTTP client it creates gets the probe as interceptor.
    flower_compat.run_supernode(rest, interceptor=FleetProbe(log_path, _partition_of(rest)))


# ---------------------------------------------------------------- comparison
@dataclass(frozen=True)
class TrafficReport:
    """Our accounting of a run next to what the probes saw cross the Fleet API."""

    accounted_bytes: int  # sum of bytes_down + bytes_up over every round and client (ours)
    rebuilt_bytes: int  # the same sum, of message_size of the messages rebuilt from the wire
    object_bytes: int  # bytes of the message objects that crossed (PullObject / PushObject)
    message_rpc_bytes: int  # request + response bodies of every RPC that moves messages
    fleet_rpc_bytes: int  # request + response bodies of every Fleet RPC (heartbeats included)
    messages: int  # messages seen on the wire
    mismatches: tuple[str, ...]  # (partition, direction) whose per-round sizes disagree

    @property
    def exact(self) -> bool:
        return not self.mismatches and self.accounted_bytes == self.rebuilt_bytes

    def summary(self) -> str:
        return (
            f"accounted {self.accounted_bytes:,} bytes (message_to_proto sizes) in {self.messages} messages; "
            f"rebuilt from the wire {self.rebuilt_bytes:,} ({'exact match' if self.exact else 'MISMATCH'}); "
            f"the Fleet API carried {self.message_rpc_bytes:,} bytes of message RPC bodies "
            f"({self.object_bytes:,} in objects), {self.fleet_rpc_bytes:,} with heartbeats and registration"
        )


def read_probe_logs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every record of the given probe logs (a truncated last line is skipped)."""
    out: list[dict[str, Any]] = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _accounted(rounds: Sequence[dict[str, Any]]) -> dict[tuple[int, str], list[int]]:
    """(partition, direction) -> bytes per round in round order, from the ServerApp's records."""
    out: dict[tuple[int, str], list[int]] = defaultdict(list)
    for r in sorted(rounds, key=lambda r: int(r["round"])):
        for direction in ("down", "up"):
            per_partition: dict[int, int] = defaultdict(int)
            for c in r["clients"]:
                per_partition[int(c["partition_id"])] += int(c[f"bytes_{direction}"])
            for pid, size in sorted(per_partition.items()):
                if size:
                    out[(pid, direction)].append(size)
    return out


def _rebuilt(messages: Sequence[dict[str, Any]]) -> dict[tuple[int, str], list[int]]:
    """(partition, direction) -> message_size of the rebuilt messages, one entry per round.

    Messages of one round share a ``group_id`` (Flower's strategies set the round there);
    a message without one (client discovery) is a round of its own.  In time order.
    """
    groups: dict[tuple[int, str], dict[str, int]] = defaultdict(dict)
    for i, m in enumerate(sorted(messages, key=lambda m: m["t"])):
        group = groups[(int(m["partition_id"]), m["direction"])]
        name = m["group_id"] or f"#{i}"
        group[name] = group.get(name, 0) + int(m["message_size"] or 0)
    return {key: [size for size in group.values() if size] for key, group in groups.items()}


def compare_traffic(run_dir: str | Path, probe_logs: Sequence[str | Path]) -> TrafficReport:
    """Relate ``rounds.jsonl`` of ``run_dir`` to the probes' logs, per client, direction and round.

    The relation checked is equality: for every partition and direction, the per-round
    sums of our ``bytes_down`` / ``bytes_up`` equal, round by round, the sums of
    ``message_size`` of the messages rebuilt from the objects that crossed the Fleet API.
    The wire figures themselves differ from ours and are reported next to them: each
    object carries a text header, each RPC its node, run and object ids, and objects are
    content-addressed, so identical arrays in one message (e.g. LoRA B matrices, all zero
    before the first round) cross once.
    """
    from fedpeft.results.records import read_rounds

    records = read_probe_logs(probe_logs)
    messages = [r for r in records if r["kind"] == "message"]
    rpcs = [r for r in records if r["kind"] == "rpc"]
    ours, wire = _accounted(read_rounds(run_dir)), _rebuilt(messages)
    mismatches = tuple(
        f"partition {k[0]} {k[1]}: ours {ours.get(k)} wire {wire.get(k)}"
        for k in sorted(ours.keys() | wire.keys())
        if ours.get(k) != wire.get(k)
    )
    return TrafficReport(
        accounted_bytes=sum(map(sum, ours.values())),
        rebuilt_bytes=sum(map(sum, wire.values())),
        object_bytes=sum(int(m["object_bytes"]) for m in messages),
        message_rpc_bytes=sum(
            r["request_bytes"] + r["response_bytes"] for r in rpcs if r["method"] in MESSAGE_RPCS
        ),
        fleet_rpc_bytes=sum(r["request_bytes"] + r["response_bytes"] for r in rpcs),
        messages=len(messages),
        mismatches=mismatches,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
