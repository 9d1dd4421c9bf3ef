"""The codec's server side: a strategy wrapper that compresses the downlink and decodes
the uplink, in the shape Flower uses for DP.  It asks the codec registry
(:func:`~fedpeft.codecs.registry.transport_codec`) for each direction's codec and never
names one; the client half is :func:`fedpeft.codecs.flower.codec_client_mod`.

:class:`CompressedTransport` wraps any server strategy (Flower's, ours, a user's).  It
rewrites the train messages the inner strategy configures, and decodes every reply into
ordinary dense tensors before the inner strategy aggregates; a payload that does not
decode is left out of the round and recorded in the :class:`RejectionLog`.

Order with DP: noise is added on the client before encoding, so compression is
post-processing and keeps the DP guarantee; server-side DP wrappers go *inside* this one,
so they clip decoded dense updates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.codecs.base import Codec, EncodeStats
from fedpeft.codecs.bitstream import PayloadError, Template, arrays_crc
from fedpeft.codecs.flower import (
    BASE_KEY,
    INIT_CRC_KEY,
    MODE_KEY,
    VERSION_KEY,
    payload_of,
    payload_record,
)
from fedpeft.codecs.registry import transport_codec
from fedpeft.codecs.settings import CodecConfig
from fedpeft.server.rejections import RejectionLog
from fedpeft.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, from_record, to_record
from strategies.wrapper import StrategyWrapper

WEIGHT_KEY = "num-examples"  # what FedAvg weighs replies by (its weighted_by_key default)


class CompressedTransport(StrategyWrapper):
    """Wrap ``inner``: compress the downlink, decode uplink payloads before aggregation.

    ``seeded``: the first global the inner strategy sends is the seeded initial state that
    every node builds for itself (a fresh run), so round 1 sends only its checksum.
    ``aggregate`` (``server.aggregate``): how a sparse codec's decoded updates are prepared
    for the inner strategy's mean (:func:`over_senders`); "all" leaves them as decoded.
    """

    def __init__(
        self,
        inner: Strategy,
        cfg: CodecConfig,
        rejections: RejectionLog | None = None,
        *,
        seeded: bool = True,
        aggregate: str = "bounded",
    ) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.aggregate = aggregate  # server.aggregate: "all", "senders" or "bounded"
        self.rejections = rejections or RejectionLog()
        self.seeded = seeded
        self._reference: dict[int, dict[str, np.ndarray]] = {}  # round -> the global replies apply to
        self._held: dict[str, np.ndarray] | None = None  # the global clients hold (delta downlink)
        self._intended: dict[str, np.ndarray] | None = None  # the last global (no downlink EF)
        self._version = -1
        self._node_version: dict[int, int] = {}
        self._sent: dict[int, set[int]] = {}  # round -> nodes a train message went to

    def remap_nodes(self, mapping: Mapping[int, int]) -> None:
        """New node ids after a resume (:func:`strategies.traits.remap_nodes`): which copy each node holds."""
        self._node_version = {mapping[n]: v for n, v in self._node_version.items() if n in mapping}
        self._sent = {r: {mapping[n] for n in nodes if n in mapping} for r, nodes in self._sent.items()}

    # -------------------------------------------------------------- downlink
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent[server_round] = {m.metadata.dst_node_id for m in messages}
        dense = from_record(arrays)
        codec = transport_codec(self.cfg, "downlink", server_round, Template.of(dense))
        if codec.passthrough:
            self._reference[server_round] = dense
            return messages
        return self._delta_downlink(server_round, dense, messages, codec)

    def _delta_downlink(
        self, server_round: int, dense: dict[str, np.ndarray], messages: list[Message], codec: Codec
    ) -> list[Message]:
        base = self._version
        delta_payload = None
        first = self._held is None
        if self._held is None:
            self._held = dense
        else:
            # With error feedback the delta includes what earlier rounds lost; without, only
            # this round's change goes out and what the codec drops is gone.
            start = self._held if self.cfg.downlink_error_feedback else (self._intended or self._held)
            delta = {k: dense[k] - start[k] for k in dense}
            delta_payload, _, decoded = codec.encode_reconstructed(delta, base=base)
            self._held = {k: self._held[k] + decoded[k] for k in dense}
        self._intended = dense
        self._version = server_round
        # Replies are decoded onto the server's exact global, not onto the coded copy the
        # clients trained from: global_t = global_{t-1} + mean(update).  Decoding onto the
        # copy instead would drop, every round, what the downlink has not delivered yet
        # (measured: 44.7% instead of ~NN% after 10 rounds), and central DP would clip that
        # difference as if it were part of the client's update.
        self._reference[server_round] = dense
        init_crc = arrays_crc(self._held) if first and self.seeded else None
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            tags: dict[str, int | str] = {BASE_KEY: base, VERSION_KEY: server_round}
            if init_crc is not None:  # every node builds this from the seed: send its checksum
                out.append(
                    _with_arrays(msg, ArrayRecord(), tags | {MODE_KEY: "seeded", INIT_CRC_KEY: init_crc})
                )
            elif delta_payload is not None and self._node_version.get(node) == base:
                record = payload_record(delta_payload, codec.payload_type)
                out.append(_with_arrays(msg, record, tags | {MODE_KEY: "delta"}))
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
        codec = transport_codec(self.cfg, "uplink", server_round, template)
        replies = list(replies)
        for silent in self._sent.pop(server_round, set()) - {r.metadata.src_node_id for r in replies}:
            self._node_version.pop(silent, None)  # may not hold this round's global: resync
        accepted, decoded = [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._node_version.pop(node, None)  # its copy is unknown now: resync next time
                accepted.append(reply)
                continue
            if not codec.passthrough:
                try:
                    decoded.append((reply, self._decode(reply, codec, template)))
                except PayloadError as err:
                    self.rejections.reject(node, f"rejected payload ({err.reason}): {err.detail}")
                    continue
            accepted.append(reply)
        if self.aggregate != "all" and getattr(codec, "sparse", False) and decoded:
            deltas = over_senders(
                [d for _, d in decoded], [_weight(r) for r, _ in decoded], bounded=self.aggregate == "bounded"
            )
            decoded = [(r, d) for (r, _), d in zip(decoded, deltas, strict=True)]
        for reply, delta in decoded:
            reply.content[ARRAYS_KEY] = to_record({k: reference[k] + delta[k] for k in template.names})
        return self.inner.aggregate_train(server_round, accepted)

    @staticmethod
    def _decode(reply: Message, codec: Codec, template: Template) -> dict[str, np.ndarray]:
        """The update a reply's payload carries (its size figures added to its metrics)."""
        record = reply.content.array_records.get(ARRAYS_KEY, ArrayRecord())
        payload = payload_of(record, codec)
        delta = codec.decode(payload, template)
        _add_size_metrics(reply, codec.stats_of(payload, template))
        return delta


def over_senders(
    deltas: list[dict[str, np.ndarray]], weights: list[float], *, bounded: bool = False
) -> list[dict[str, np.ndarray]]:
    """Rescale sparse updates so that any weighted mean over *all* of them (FedAvg, or a
    user's strategy) becomes, per coordinate, the weighted mean over the clients that sent
    that coordinate: each client's entry is multiplied by W / W_j, the total weight over
    the weight of coordinate j's senders.

    Why: under top-k a coordinate comes from a few clients per round, and FedAvg's divide
    by all of them shrinks the aggregate by about the density (the zeros count as votes
    for "no change").  A coordinate nobody sent stays 0; a dense update is unchanged.

    ``bounded``: then, if that mean is longer (L2) than the clients' mean update length,
    scale it down to that length.  A mean of vectors is never longer than their mean
    length, so a dense mean is untouched; a coordinate sent by one client alone would
    otherwise count fully, and many such coordinates make a step longer than any client's.
    """
    total = float(sum(weights))
    out = [dict(d) for d in deltas]
    for name in deltas[0]:
        sent = sum(np.float32(w) * (d[name] != 0) for d, w in zip(deltas, weights, strict=True))
        factor = np.divide(np.float32(total), sent, out=np.zeros_like(sent, dtype=np.float32), where=sent > 0)
        for d in out:
            d[name] = (d[name] * factor).astype(np.float32)
    if bounded:
        mean_len = sum(w * _norm(d) for d, w in zip(deltas, weights, strict=True)) / total
        mean = {k: np.zeros_like(v) for k, v in out[0].items()}
        for d, w in zip(out, weights, strict=True):
            for k in mean:
                mean[k] += np.float32(w / total) * d[k]
        length = _norm(mean)
        if length > mean_len > 0:
            shrink = np.float32(mean_len / length)
            out = [{k: (v * shrink).astype(np.float32) for k, v in d.items()} for d in out]
    return out


def _norm(arrays: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values())))


def _weight(reply: Message) -> float:
    """A reply's weight in the mean: its ``num-examples`` (FedAvg's default key), else 1."""
    metrics = reply.content.metric_records.get(METRICS_KEY, MetricRecord())
    value = metrics.get(WEIGHT_KEY, 1)
    return float(value) if isinstance(value, (int, float)) and value > 0 else 1.0


def _add_size_metrics(reply: Message, stats: EncodeStats) -> None:
    """The codec's sizes of this reply (``codec-*`` metrics), computed on the server from the
    payload it decoded, so they never cost bytes on the wire."""
    metrics = reply.content.metric_records.get(METRICS_KEY, MetricRecord())
    for key, value in stats.as_metrics("codec").items():
        metrics[key] = value
    reply.content[METRICS_KEY] = metrics


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
