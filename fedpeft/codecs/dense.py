"""Dense codecs: every entry travels.  ``none`` (float32, the reference every other codec
is measured against) and ``fp16`` (half precision: 2x smaller, 11 significant bits)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedpeft.codecs.base import FlatCodec, Parts, to_half
from fedpeft.codecs.bitstream import Header, PayloadError, Template

_NO_SCALES = np.empty(0, np.float32)


class _Dense(FlatCodec):
    dtype: ClassVar[str] = "<f4"

    def parts(self, x: np.ndarray, template: Template) -> Parts:
        return Parts(x.size, _NO_SCALES, False, {"values": x.astype(self.dtype)})

    def body(self, parts: Parts, n: int) -> bytes:
        return parts.data["values"].tobytes()

    def read_body(self, body: bytes, header: Header, num_scales: int) -> Parts:
        width = np.dtype(self.dtype).itemsize
        if header.k != header.n or len(body) != width * header.n:
            raise PayloadError("truncated", f"body has {len(body)} bytes, expected {width * header.n}")
        return Parts(header.k, _NO_SCALES, False, {"values": np.frombuffer(body, dtype=self.dtype)})

    def reconstruct(self, template: Template, parts: Parts) -> np.ndarray:
        return parts.data["values"].astype(np.float32)

    def body_bound(self, template: Template) -> int:
        return np.dtype(self.dtype).itemsize * template.size

    def bound_bits(self, n: int, k: int) -> float:
        return 8.0 * np.dtype(self.dtype).itemsize * n


class Fp32Codec(_Dense):
    """No compression: float32.  On the wire the glue sends plain Flower arrays for it
    (``passthrough``), the reference every other codec is measured against; the payload
    form exists so that the conformance suite and the benchmarks treat it like the rest."""

    name = "none"
    passthrough = True
    codec_id = 0
    payload_type = "fedpeft.fp32/2"
    citation = "no compression"


class Fp16Codec(_Dense):
    """Every entry as an IEEE half: 16 bits per parameter, relative error below 2**-11."""

    name = "fp16"
    codec_id = 1
    payload_type = "fedpeft.fp16/2"
    citation = "half precision (Micikevicius et al., 2018, Mixed Precision Training)"
    dtype = "<f2"

    def parts(self, x: np.ndarray, template: Template) -> Parts:
        return Parts(x.size, _NO_SCALES, False, {"values": to_half(x)})
