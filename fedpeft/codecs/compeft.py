"""``compeft``: top-k + ternary values + entropy-coded positions, as bytes.

ComPEFT (Yadav et al., 2023, "ComPEFT: Compression for Communicating Parameter Efficient
Updates via Sparsification and Quantization") sparsifies a PEFT update to its top-k
entries by magnitude and ternarizes them to sign * alpha * std(update).  STC (Sattler et
al., 2019, "Robust and Communication-Efficient Federated Learning from Non-IID Data")
uses the mean magnitude of the kept entries instead (``scale = "mean"``, no tuning).  The
reference code keeps a dense float tensor, so the saving never reaches a wire; here it is
a real bit stream within a few percent of the entropy bound n * (H(d) + d) bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedpeft.codecs.base import FlatCodec, Parts, entropy_bound_bits, tensor_or_global
from fedpeft.codecs.bitstream import Header, PayloadError, Template
from fedpeft.codecs.sparse import (
    pack_positions,
    positions_bound_bytes,
    scales_for,
    segment_of,
    select,
    unpack_positions,
)
from fedpeft.codecs.topk import TopkSettings
from fedpeft.settings import choices, value_range


@dataclass(frozen=True)
class CompeftSettings(TopkSettings):
    """``[codec.compeft]``: top-k as ``[codec.topk]`` (scope, positions), plus the scale."""

    # "mean": mean |kept| (STC, needs no tuning); "std": alpha * std(update) (ComPEFT).
    scale: str = field(default="mean", metadata=choices("mean", "std"))
    alpha: float = field(default=1.0, metadata=value_range(0.0, lo_open=True))
    # One scale per tensor, or one for the whole update.
    scale_per: str = tensor_or_global()


class CompeftCodec(FlatCodec):
    """Positions + one sign bit per kept entry + one scale per tensor (or one in all)."""

    name = "compeft"
    codec_id = 5
    payload_type = "fedpeft.compeft/2"
    sparse = True
    citation = "ComPEFT (Yadav et al., 2023); STC (Sattler et al., 2019)"
    settings: CompeftSettings
    scales = "tensor-or-global"

    def parts(self, x: np.ndarray, template: Template) -> Parts:
        s = self.settings
        idx = select(x, template.offsets, self.density, s.scope)
        per_tensor = s.scale_per == "tensor"
        raw = scales_for(x, idx, template.offsets, scale=s.scale, alpha=s.alpha, per_tensor=per_tensor)
        return Parts(idx.size, self.stored_scales(raw), per_tensor, {"idx": idx, "negative": x[idx] < 0})

    def body(self, parts: Parts, n: int) -> bytes:
        signs = np.packbits(parts.data["negative"]).tobytes()
        return pack_positions(parts.data["idx"], n, self.settings.positions) + signs

    def read_body(self, body: bytes, header: Header, num_scales: int) -> Parts:
        idx, rest = unpack_positions(body, header.k, header.n)
        if len(rest) != (header.k + 7) // 8:
            raise PayloadError("truncated", f"{len(rest)} sign bytes, header implies {(header.k + 7) // 8}")
        negative = np.unpackbits(np.frombuffer(rest, dtype=np.uint8), count=header.k).astype(bool)
        return Parts(header.k, np.empty(0, np.float32), False, {"idx": idx, "negative": negative})

    def reconstruct(self, template: Template, parts: Parts) -> np.ndarray:
        out = np.zeros(template.size, dtype=np.float32)
        idx = parts.data["idx"]
        if idx.size == 0:
            return out
        scales = parts.scales
        scale = scales[segment_of(idx, template.offsets)] if parts.per_tensor else scales[0]
        out[idx] = np.where(parts.data["negative"], -scale, scale)
        return out

    def body_bound(self, template: Template) -> int:
        return positions_bound_bytes(template.size) + (template.size + 7) // 8

    def bound_bits(self, n: int, k: int) -> float:
        return entropy_bound_bits(n, k)
