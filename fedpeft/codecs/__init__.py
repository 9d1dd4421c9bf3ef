"""Codecs that compress updates in transit: a protocol, a registry and one module per codec.

``CODECS`` (:mod:`fedpeft.codecs.registry`) maps ``codec.name`` to a codec; the
conformance suite runs over every entry.  The Flower glue, :mod:`fedpeft.codecs.flower`
(client mod) and :mod:`fedpeft.server.transport` (server wrapper), asks the registry and
never names a codec.
"""

from fedpeft.codecs.base import Codec, EncodeStats, FlatCodec, entropy_bound_bits, with_error_feedback
from fedpeft.codecs.bitstream import PayloadError, Template
from fedpeft.codecs.registry import CODECS, CodecSpec, build_codec

__all__ = [
    "CODECS",
    "Codec",
    "CodecSpec",
    "EncodeStats",
    "FlatCodec",
    "PayloadError",
    "Template",
    "build_codec",
    "entropy_bound_bits",
    "with_error_feedback",
]
