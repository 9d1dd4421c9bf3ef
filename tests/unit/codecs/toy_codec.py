"""A codec written the way a user adds one: this module plus one registry line
(``CODECS["toy-bf16"] = CodecSpec(Bf16Codec, None)``, done by the test that uses it).

bfloat16: the top 16 bits of every float32 (8 exponent bits, 7 mantissa bits).
"""

from __future__ import annotations

import numpy as np

from fedpeft.codecs.base import FlatCodec, Parts
from fedpeft.codecs.bitstream import Header, PayloadError, Template

_NO_SCALES = np.empty(0, np.float32)


class Bf16Codec(FlatCodec):
    """Dense bfloat16 by truncation: 2x smaller than float32, the exponent range kept."""

    name, codec_id, payload_type = "toy-bf16", 201, "fedpeft-tests.bf16/1"

    def parts(self, x: np.ndarray, template: Template) -> Parts:
        return Parts(x.size, _NO_SCALES, False, {"hi": (x.view(np.uint32) >> 16).astype("<u2")})

    def body(self, parts: Parts, n: int) -> bytes:
        return bytes(parts.data["hi"].tobytes())

    def read_body(self, body: bytes, header: Header, num_scales: int) -> Parts:
        if header.k != header.n or len(body) != 2 * header.n:
            raise PayloadError("truncated", f"{len(body)} bytes for {header.n} values")
        return Parts(header.k, _NO_SCALES, False, {"hi": np.frombuffer(body, "<u2")})

    def reconstruct(self, template: Template, parts: Parts) -> np.ndarray:
        out: np.ndarray = (parts.data["hi"].astype(np.uint32) << 16).view(np.float32)
        return out

    def body_bound(self, template: Template) -> int:
        return 2 * template.size

    def bound_bits(self, n: int, k: int) -> float:
        return 16.0 * n


def bf16_reference(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rule in plain NumPy: zero the low 16 bits of each float32."""
    return {
        k: (v.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in update.items()
    }
