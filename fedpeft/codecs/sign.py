"""``sign``: one bit per entry plus a scale; biased, so it needs error feedback.

EF-SignSGD (Karimireddy et al., 2019, "Error Feedback Fixes SignSGD and other Gradient
Compression Schemes"): send sign(x) * ||x||_1 / n, i.e. the mean magnitude, per tensor
(or one for the whole update) and carry what was lost to the next round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpeft.codecs.base import FlatCodec, Parts, tensor_or_global
from fedpeft.codecs.bitstream import Header, PayloadError, Template


@dataclass(frozen=True)
class SignSettings:
    """``[codec.sign]``."""

    # One scale (mean |x|) per tensor, or one for the whole update.
    scale_per: str = tensor_or_global()


def tensor_mean_abs(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """mean |x| within each tensor, in float64 (0 for an empty one)."""
    sizes = np.diff(offsets)
    sums = np.zeros(len(sizes))
    nz = sizes > 0
    if x.size:
        sums[nz] = np.add.reduceat(np.abs(x).astype(np.float64), offsets[:-1][nz])
    return sums / np.maximum(sizes, 1)


class SignCodec(FlatCodec):
    """n sign bits (1 = negative) and the mean magnitude as scale."""

    name = "sign"
    codec_id = 4
    payload_type = "fedpeft.sign/2"
    citation = "EF-SignSGD (Karimireddy et al., 2019)"
    settings: SignSettings
    scales = "tensor-or-global"

    def parts(self, x: np.ndarray, template: Template) -> Parts:
        per_tensor = self.settings.scale_per == "tensor"
        raw = (
            tensor_mean_abs(x, template.offsets)
            if per_tensor
            else np.asarray([np.mean(np.abs(x), dtype=np.float64) if x.size else 0.0])
        )
        return Parts(x.size, self.stored_scales(raw.astype(np.float32)), per_tensor, {"negative": x < 0})

    def body(self, parts: Parts, n: int) -> bytes:
        return np.packbits(parts.data["negative"]).tobytes()

    def read_body(self, body: bytes, header: Header, num_scales: int) -> Parts:
        if header.k != header.n or len(body) != (header.n + 7) // 8:
            raise PayloadError("truncated", f"body has {len(body)} bytes, expected {(header.n + 7) // 8}")
        negative = np.unpackbits(np.frombuffer(body, dtype=np.uint8), count=header.n).astype(bool)
        return Parts(header.k, np.empty(0, np.float32), False, {"negative": negative})

    def reconstruct(self, template: Template, parts: Parts) -> np.ndarray:
        scale = np.repeat(parts.scales, template.sizes) if parts.per_tensor else parts.scales[0]
        return np.where(parts.data["negative"], -scale, scale).astype(np.float32)

    def body_bound(self, template: Template) -> int:
        return (template.size + 7) // 8

    def bound_bits(self, n: int, k: int) -> float:
        return float(n)
