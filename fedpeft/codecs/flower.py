"""Flower glue for the codecs on the client: a mod, the shape Flower uses for client-side
DP.  It asks the registry (:func:`~fedpeft.codecs.registry.transport_codec`) for each
direction's codec and never names one; the server half is
:class:`fedpeft.server.transport.CompressedTransport`.

* :func:`codec_client_mod` sits in the ClientApp's train path.  Incoming, it turns the
  downlink into the dense float32 global the app trains from: plain arrays, the seeded
  initial state every node builds from the run seed (round 1: nothing travels but a
  checksum), a dense resynchronisation, or a coded delta applied to the node's own copy.
  Outgoing, it replaces the trained tensors with one packed ``uint8`` payload of the
  *update* (trained - global), with error feedback kept in ``Context.state``, and adds the
  codec's size figures to the reply's metrics.

Noise is added on the client before encoding, so compression is post-processing and
keeps the DP guarantee.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedpeft.codecs.base import Codec, with_error_feedback
from fedpeft.codecs.bitstream import PayloadError, Template, arrays_crc
from fedpeft.codecs.registry import transport_codec
from fedpeft.wire import ARRAYS_KEY, CONFIG_KEY, from_record, to_record

if TYPE_CHECKING:  # the run config assembles the codecs' settings: no import at run time
    from fedpeft.codecs.settings import CodecConfig

PAYLOAD_KEY = "fedpeft.payload"
# Train-config keys the server uses to tell the mod what the downlink holds.
MODE_KEY, BASE_KEY, VERSION_KEY = "fedpeft.downlink", "fedpeft.base", "fedpeft.version"
INIT_CRC_KEY = "fedpeft.init-crc"
ROUND_KEY = "server-round"  # set by Flower's strategies in every train config
# Per-node persistent state (Context.state).
RESIDUAL_STATE, GLOBAL_STATE, META_STATE = (
    "fedpeft.codec.residual",
    "fedpeft.codec.global",
    "fedpeft.codec.meta",
)

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
InitialState = Callable[[Context], Mapping[str, np.ndarray]]


def payload_record(payload: bytes, payload_type: str) -> ArrayRecord:
    """One packed byte array: a single Array costs ~330 bytes of framing, so only one."""
    return ArrayRecord(
        {PAYLOAD_KEY: Array(dtype="uint8", shape=(len(payload),), stype=payload_type, data=payload)}
    )


def payload_of(record: ArrayRecord, codec: Codec) -> bytes:
    """The payload bytes of ``record``, which must be one payload of ``codec``'s type."""
    if list(record.keys()) != [PAYLOAD_KEY]:
        raise PayloadError("malformed", "the message carries no encoded payload")
    array = record[PAYLOAD_KEY]
    if array.stype != codec.payload_type:
        raise PayloadError("codec", f"payload type {array.stype!r}, expected {codec.payload_type!r}")
    return bytes(array.data)


def _round(config: ConfigRecord) -> int:
    value = config.get(ROUND_KEY, 1)
    return int(value) if isinstance(value, (int, float)) else 1


# ---------------------------------------------------------------------- client
def codec_client_mod(get_cfg: Callable[[Context], CodecConfig], initial_state: InitialState) -> Mod:
    """A Flower client mod for train messages; ``get_cfg`` reads the run's codec settings,
    ``initial_state`` gives the exchanged tensors as this node builds them from the seed."""

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        cfg = get_cfg(context)
        if not cfg.active() or msg.has_error():
            return call_next(msg, context)
        config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        global_ = _receive(msg, context, cfg, initial_state)
        msg.content[ARRAYS_KEY] = to_record(global_)
        reply = call_next(msg, context)
        up = transport_codec(cfg, "uplink", _round(config), Template.of(global_))
        if up.passthrough or reply.has_error():
            return reply
        return _send(reply, context, cfg, global_, up)

    return mod


def _receive(
    msg: Message, context: Context, cfg: CodecConfig, initial_state: InitialState
) -> dict[str, np.ndarray]:
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    mode = str(config.get(MODE_KEY, "dense"))
    record = msg.content.array_records.get(ARRAYS_KEY, ArrayRecord())
    if mode == "delta":
        held = from_record(context.state.array_records[GLOBAL_STATE])
        have = int(context.state.config_records[META_STATE]["version"])  # type: ignore[arg-type]
        template = Template.of(held)
        codec = transport_codec(cfg, "downlink", _round(config), template)
        delta = codec.decode(payload_of(record, codec), template, base=have)
        global_ = {k: held[k] + delta[k] for k in held}
    elif mode == "seeded":
        global_ = {k: np.array(v, dtype=np.float32) for k, v in initial_state(context).items()}
        if arrays_crc(global_) != int(config[INIT_CRC_KEY]):  # type: ignore[arg-type]
            raise PayloadError("seeded", "this node's seeded initial state differs from the server's")
    else:
        global_ = {k: v.astype(np.float32) for k, v in from_record(record).items()}
    if mode in ("delta", "resync", "seeded"):
        context.state[GLOBAL_STATE] = to_record(global_)
        context.state[META_STATE] = ConfigRecord({"version": int(config[VERSION_KEY])})  # type: ignore[arg-type]
    return global_


def _send(
    reply: Message, context: Context, cfg: CodecConfig, global_: dict[str, np.ndarray], codec: Codec
) -> Message:
    trained = from_record(reply.content.array_records[ARRAYS_KEY])
    update = {k: trained[k] - global_[k] for k in global_}
    if cfg.error_feedback:
        old = context.state.array_records.get(RESIDUAL_STATE)
        residual = from_record(old) if old is not None else None
        payload, _, new_residual = with_error_feedback(codec, update, residual)
        context.state[RESIDUAL_STATE] = to_record(new_residual)
    else:
        payload, _ = codec.encode(update)
    reply.content[ARRAYS_KEY] = payload_record(payload, codec.payload_type)
    return reply  # the server reads the codec's sizes off the payload: no metrics on the wire
