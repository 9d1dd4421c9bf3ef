"""Codecs that compress updates in transit; ComPEFT (Yadav et al., 2023) is the first.

``CODECS`` maps a name to a codec class taking a :class:`~fedpeft.config.CodecConfig`;
the conformance tests run over every entry.  The Flower glue (client mod and server
wrapper) lives in :mod:`fedpeft.codecs.flower`.
"""

from fedpeft.codecs.bitstream import PayloadError, Template
from fedpeft.codecs.compeft import CompeftCodec, EncodeStats, entropy_bound_bits, with_error_feedback

CODECS: dict[str, type[CompeftCodec]] = {"compeft": CompeftCodec}

__all__ = [
    "CODECS",
    "CompeftCodec",
    "EncodeStats",
    "PayloadError",
    "Template",
    "entropy_bound_bits",
    "with_error_feedback",
]
