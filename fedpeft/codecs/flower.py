"""Flower glue for the codec, in the two shapes Flower uses for DP: a client mod and a
strategy wrapper.

* :func:`codec_client_mod` sits in the ClientApp's train path.  Incoming, it turns the
  downlink (dense fp32, fp16, or a ComPEFT-coded global delta applied to the node's own
  copy) into the dense float32 global the app trains from.  Outgoing, it replaces the
  trained tensors with one packed ``uint8`` payload of the *update* (trained - global),
  with error feedback kept in ``Context.state``, and adds the codec's size figures to the
  reply's metrics.
* :class:`CompressedTransport` wraps any server strategy (Flower's, ours, a user's).  It
  rewrites the train messages the inner strategy configures, and decodes every reply into
  ordinary dense tensors before the inner strategy aggregates; a payload that does not
  decode is left out of the round and recorded in the :class:`RejectionLog`.

Order with DP: noise is added on the client before encoding, so compression is
post-processing and keeps the DP guarantee; server-side DP wrappers go *inside* this one,
so they clip decoded dense updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.codecs.bitstream import PayloadError, Template
from fedpeft.codecs.compeft import CompeftCodec, with_error_feedback
from fedpeft.config import CodecConfig
from fedpeft.rejections import RejectionLog
from fedpeft.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, from_record, to_record
from strategies.wrapper import StrategyWrapper

PAYLOAD_KEY = "fedpeft.payload"
PAYLOAD_STYPE = "fedpeft.compeft/1"
# Train-config keys the server uses to tell the mod what the downlink holds.
MODE_KEY, BASE_KEY, VERSION_KEY = "fedpeft.downlink", "fedpeft.base", "fedpeft.version"
# Per-node persistent state (Context.state).
RESIDUAL_STATE, GLOBAL_STATE, META_STATE = (
    "fedpeft.codec.residual",
    "fedpeft.codec.global",
    "fedpeft.codec.meta",
)

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def is_active(cfg: CodecConfig) -> bool:
    """Whether anything differs from the dense float32 path."""
    return cfg.name != "none" or cfg.downlink != "fp32"


def payload_record(payload: bytes) -> ArrayRecord:
    """One packed byte array: a single Array costs ~330 bytes of framing, so only one."""
    return ArrayRecord(
        {PAYLOAD_KEY: Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=payload)}
    )


def payload_of(record: ArrayRecord) -> bytes | None:
    """The payload bytes if ``record`` is an encoded payload, else None."""
    if list(record.keys()) != [PAYLOAD_KEY]:
        return None
    return bytes(record[PAYLOAD_KEY].data)


# ---------------------------------------------------------------------- client
def codec_client_mod(get_cfg: Callable[[Context], CodecConfig]) -> Mod:
    """A Flower client mod for train messages; ``get_cfg`` reads the run's codec settings."""

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        cfg = get_cfg(context)
        if not is_active(cfg) or msg.has_error():
            return call_next(msg, context)
        global_ = _receive(msg, context, cfg)
        msg.content[ARRAYS_KEY] = to_record(global_)
        reply = call_next(msg, context)
        if cfg.name == "none" or reply.has_error():
            return reply
        return _send(reply, context, cfg, global_)

    return mod


def _receive(msg: Message, context: Context, cfg: CodecConfig) -> dict[str, np.ndarray]:
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    mode = str(config.get(MODE_KEY, "fp32"))
    record = msg.content.array_records[ARRAYS_KEY]
    if mode == "delta":
        held = from_record(context.state.array_records[GLOBAL_STATE])
        have = int(context.state.config_records[META_STATE]["version"])  # type: ignore[arg-type]
        payload = payload_of(record)
        if payload is None:
            raise PayloadError("malformed", "downlink delta without a payload")
        delta = CompeftCodec(cfg).decode(payload, Template.of(held), base=have)
        global_ = {k: held[k] + delta[k] for k in held}
    else:
        global_ = {k: v.astype(np.float32) for k, v in from_record(record).items()}
    if mode in ("delta", "resync"):
        context.state[GLOBAL_STATE] = to_record(global_)
        context.state[META_STATE] = ConfigRecord({"version": int(config[VERSION_KEY])})  # type: ignore[arg-type]
    return global_


def _send(reply: Message, context: Context, cfg: CodecConfig, global_: dict[str, np.ndarray]) -> Message:
    trained = from_record(reply.content.array_records[ARRAYS_KEY])
    update = {k: trained[k] - global_[k] for k in global_}
    codec = CompeftCodec(cfg)
    if cfg.error_feedback:
        old = context.state.array_records.get(RESIDUAL_STATE)
        residual = from_record(old) if old is not None else None
        payload, stats, new_residual = with_error_feedback(codec, update, residual)
        context.state[RESIDUAL_STATE] = to_record(new_residual)
    else:
        payload, stats = codec.encode(update)
    reply.content[ARRAYS_KEY] = payload_record(payload)
    metrics = reply.content.metric_records.get(METRICS_KEY, MetricRecord())
    for key, value in stats.as_metrics("codec").items():
        metrics[key] = value
    reply.content[METRICS_KEY] = metrics
    return reply


# ---------------------------------------------------------------------- server
class CompressedTransport(StrategyWrapper):
    """Wrap ``inner``: compress the downlink, decode uplink payloads before aggregation."""

    def __init__(self, inner: Strategy, cfg: CodecConfig, rejections: RejectionLog | None = None) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.rejections = rejections or RejectionLog()
        self.codec = CompeftCodec(cfg)
        self._reference: dict[int, dict[str, np.ndarray]] = {}  # round -> what clients start from
        self._held: dict[str, np.ndarray] | None = None  # the global clients hold (delta downlink)
        self._version = -1
        self._node_version: dict[int, int] = {}
        self._sent: dict[int, set[int]] = {}  # round -> nodes a train message went to

    def remap_nodes(self, mapping: dict[int, int]) -> None:
        """New node ids after a resume (``fedpeft.checkpoint``): which copy each node holds."""
        self._node_version = {mapping[n]: v for n, v in self._node_version.items() if n in mapping}
        self._sent = {r: {mapping[n] for n in nodes if n in mapping} for r, nodes in self._sent.items()}

    # -------------------------------------------------------------- downlink
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent[server_round] = {m.metadata.dst_node_id for m in messages}
        dense = from_record(arrays)
        down = self.cfg.downlink
        if down == "fp32":
            self._reference[server_round] = dense
            return messages
        if down == "fp16":
            half = {k: v.astype(np.float16) for k, v in dense.items()}
            self._reference[server_round] = {k: v.astype(np.float32) for k, v in half.items()}
            return [_with_arrays(m, to_record(half), {MODE_KEY: "fp16"}) for m in messages]
        return self._delta_downlink(server_round, dense, messages)

    def _delta_downlink(
        self, server_round: int, dense: dict[str, np.ndarray], messages: list[Message]
    ) -> list[Message]:
        base = self._version
        delta_payload = None
        if self._held is None:
            self._held = dense
        else:
            delta = {k: dense[k] - self._held[k] for k in dense}  # includes what earlier rounds lost
            delta_payload, _, decoded = self.codec.encode_reconstructed(delta, base=base)
            self._held = {k: self._held[k] + decoded[k] for k in dense}
        self._version = server_round
        self._reference[server_round] = self._held
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            tags = {BASE_KEY: base, VERSION_KEY: server_round}
            if delta_payload is not None and self._node_version.get(node) == base:
                out.append(_with_arrays(msg, payload_record(delta_payload), tags | {MODE_KEY: "delta"}))
            else:  # first contact or a stale copy: dense resynchronisation
                out.append(_with_arrays(msg, to_record(self._held), tags | {MODE_KEY: "resync"}))
            self._node_version[node] = server_round
        return out

    # ---------------------------------------------------------------- uplink
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        reference = self._reference.pop(server_round)
        template = Template.of(reference)
        replies = list(replies)
        for silent in self._sent.pop(server_round, set()) - {r.metadata.src_node_id for r in replies}:
            self._node_version.pop(silent, None)  # may not hold this round's global: resync
        accepted = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._node_version.pop(node, None)  # its copy is unknown now: resync next time
                accepted.append(reply)
                continue
            if self.cfg.name == "compeft":
                try:
                    reply.content[ARRAYS_KEY] = to_record(self._decode(reply, template, reference))
                except PayloadError as err:
                    self.rejections.reject(node, f"rejected payload ({err.reason}): {err.detail}")
                    continue
            accepted.append(reply)
        return self.inner.aggregate_train(server_round, accepted)

    def _decode(
        self, reply: Message, template: Template, reference: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        record = reply.content.array_records.get(ARRAYS_KEY)
        payload = payload_of(record) if record is not None else None
        if payload is None:
            raise PayloadError("malformed", "reply carries no encoded payload")
        delta = self.codec.decode(payload, template)
        return {k: reference[k] + delta[k] for k in template.names}


def _with_arrays(msg: Message, arrays: ArrayRecord, tags: dict[str, int | str]) -> Message:
    """``msg`` with its own content: new arrays, and the config plus ``tags``."""
    content = RecordDict(dict(msg.content.items()))
    config = ConfigRecord(dict(msg.content.config_records.get(CONFIG_KEY, ConfigRecord()).items()))
    for key, value in tags.items():
        config[key] = value
    content[ARRAYS_KEY] = arrays
    content[CONFIG_KEY] = config
    msg.content = content
    return msg
