"""``int8``: per-tensor uniform quantization to 8 bits, deterministic or stochastic rounding.

Each tensor is scaled by s = max|x| / 127 and every entry sent as round(x / s) in
[-127, 127] (QSGD, Alistarh et al. 2017, with s levels; FedPAQ, Reisizadeh et al. 2020,
uses it for federated updates).  Stochastic rounding rounds up with probability equal to
the fractional part, so the decoded update is unbiased; it is seeded from the update's
bytes and its base version, so a run stays reproducible.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from fedpeft.codecs.base import FlatCodec, Parts
from fedpeft.codecs.bitstream import Header, PayloadError, Template
from fedpeft.settings import choices

LEVELS = 127


@dataclass(frozen=True)
class Int8Settings:
    """``[codec.int8]``."""

    # "nearest": deterministic; "stochastic": unbiased (QSGD), seeded from the update.
    rounding: str = field(default="nearest", metadata=choices("nearest", "stochastic"))


def tensor_absmax(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """max |x| within each tensor (0 for an empty one)."""
    sizes = np.diff(offsets)
    out = np.zeros(len(sizes), dtype=np.float32)
    nz = sizes > 0
    if x.size:
        out[nz] = np.maximum.reduceat(np.abs(x), offsets[:-1][nz])
    return out


class Int8Codec(FlatCodec):
    """8 bits per entry plus one scale per tensor."""

    name = "int8"
    codec_id = 2
    payload_type = "fedpeft.int8/2"
    citation = "QSGD (Alistarh et al., 2017); FedPAQ (Reisizadeh et al., 2020)"
    settings: Int8Settings
    scales = "tensor"

    def parts(self, x: np.ndarray, template: Template) -> Parts:
        offsets = template.offsets
        scales = self.stored_scales(tensor_absmax(x, offsets) / LEVELS)
        per_entry = np.repeat(scales, np.diff(offsets))
        safe = np.where(per_entry > 0, per_entry, 1.0)
        y = x / safe
        if self.settings.rounding == "stochastic":
            rng = np.random.default_rng(zlib.crc32(x.data))  # the update itself, no copy
            q = np.floor(y + rng.random(y.size, dtype=np.float32))
        else:
            q = np.rint(y)
        q = np.clip(q, -LEVELS, LEVELS).astype(np.int8)  # fp16-rounded scales may fall short
        return Parts(x.size, scales, True, {"q": q})

    def body(self, parts: Parts, n: int) -> bytes:
        return parts.data["q"].tobytes()

    def read_body(self, body: bytes, header: Header, num_scales: int) -> Parts:
        if header.k != header.n or len(body) != header.n:
            raise PayloadError("truncated", f"body has {len(body)} bytes, expected {header.n}")
        q = np.frombuffer(body, dtype=np.int8)
        if np.any(q == -128):
            raise PayloadError("malformed", "int8 level -128 is never sent")
        return Parts(header.k, np.empty(0, np.float32), True, {"q": q})

    def reconstruct(self, template: Template, parts: Parts) -> np.ndarray:
        per_entry = np.repeat(parts.scales, template.sizes)
        return (parts.data["q"].astype(np.float32) * per_entry).astype(np.float32)

    def body_bound(self, template: Template) -> int:
        return template.size

    def bound_bits(self, n: int, k: int) -> float:
        return 8.0 * n
