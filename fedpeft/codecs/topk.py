"""``topk``: the k = density * n entries of largest magnitude, their values in fp16.

Sparsification without quantization (Aji & Heafield, 2017; Stich et al., 2018 for its
error-feedback analysis).  Positions are entropy coded as in ComPEFT
(:mod:`fedpeft.codecs.positions`), values take 16 bits each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedpeft.codecs.base import FlatCodec, Parts, positions_bound_bits, tensor_or_global, to_half
from fedpeft.codecs.bitstream import Header, PayloadError, Template
from fedpeft.codecs.sparse import pack_positions, positions_bound_bytes, select, unpack_positions
from fedpeft.settings import choices

_NO_SCALES = np.empty(0, np.float32)


@dataclass(frozen=True)
class TopkSettings:
    """``[codec.topk]``."""

    # Top-k within each tensor, or over all exchanged tensors at once.
    scope: str = tensor_or_global()
    # Entropy coder of the kept positions: "ans" (constriction) or "rice" (Golomb-Rice gaps).
    positions: str = field(default="ans", metadata=choices("ans", "rice"))


class TopkCodec(FlatCodec):
    """Sparse values: positions + k fp16 values."""

    name = "topk"
    codec_id = 3
    payload_type = "fedpeft.topk/2"
    sparse = True
    citation = "Aji & Heafield, 2017, Sparse Communication for Distributed Gradient Descent"
    settings: TopkSettings

    def parts(self, x: np.ndarray, template: Template) -> Parts:
        idx = select(x, template.offsets, self.density, self.settings.scope)
        return Parts(idx.size, _NO_SCALES, False, {"idx": idx, "values": to_half(x[idx])})

    def body(self, parts: Parts, n: int) -> bytes:
        return pack_positions(parts.data["idx"], n, self.settings.positions) + parts.data["values"].tobytes()

    def read_body(self, body: bytes, header: Header, num_scales: int) -> Parts:
        idx, rest = unpack_positions(body, header.k, header.n)
        if len(rest) != 2 * header.k:
            raise PayloadError("truncated", f"{len(rest)} value bytes, header implies {2 * header.k}")
        return Parts(header.k, _NO_SCALES, False, {"idx": idx, "values": np.frombuffer(rest, dtype="<f2")})

    def reconstruct(self, template: Template, parts: Parts) -> np.ndarray:
        out = np.zeros(template.size, dtype=np.float32)
        out[parts.data["idx"]] = parts.data["values"].astype(np.float32)
        return out

    def body_bound(self, template: Template) -> int:
        return positions_bound_bytes(template.size) + 2 * template.size

    def bound_bits(self, n: int, k: int) -> float:
        return positions_bound_bits(n, k) + 16.0 * k
