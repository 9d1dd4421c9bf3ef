"""What a codec is: a small protocol, the sizes it reports, and a base class that does the
shared work (flattening, the container, validation) so that a codec writes only its rule.

A codec turns an update (tensor name -> float32 array) into one byte string and back.
The Flower glue (:mod:`fedpeft.codecs.flower`) only ever talks to this protocol, through
the registry (:mod:`fedpeft.codecs.registry`); error feedback
(:func:`with_error_feedback`) works for any codec because every codec can say what the
receiver will reconstruct without parsing its own payload.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np

from fedpeft.codecs.bitstream import (
    CRC,
    FIXED,
    FLAG_TENSOR_SCALES,
    Header,
    PayloadError,
    Template,
    pack,
    scale_bytes,
    unpack,
)
from fedpeft.settings import choices

Update = Mapping[str, np.ndarray]
HEADER_BOUND = FIXED.size + 5 * 10 + CRC.size  # fixed part, five varints of at most 10 bytes, crc


def tensor_or_global() -> Any:
    """A codec settings field choosing per tensor (``"tensor"``, the default) or over the
    whole update at once (``"global"``): where top-k selects, how many scales travel."""
    return field(default="tensor", metadata=choices("tensor", "global"))


def to_half(x: np.ndarray) -> np.ndarray:
    """``x`` as little-endian fp16, clipped to the largest half instead of overflowing to Inf."""
    big = float(np.finfo(np.float16).max)
    return np.clip(x, -big, big).astype("<f2")


def entropy_bound_bits(n: int, k: int) -> float:
    """n * (H(d) + d) bits for k kept of n: positions plus one sign bit each."""
    return positions_bound_bits(n, k) + k


def positions_bound_bits(n: int, k: int) -> float:
    """n * H(k/n) bits: the information in which k of n entries were kept."""
    if n == 0 or k in (0, n):
        return 0.0
    d = k / n
    return -n * (d * math.log2(d) + (1 - d) * math.log2(1 - d))


@dataclass(frozen=True)
class EncodeStats:
    """Sizes of one encoded update, for the results and the benchmarks."""

    n: int
    k: int  # entries the codec kept (n for a dense codec)
    raw_bytes: int  # the dense float32 update
    encoded_bytes: int  # the whole payload, header and checksum included
    header_bytes: int  # container overhead: header, scales, checksum
    bound_bits: float  # the information bound of what this codec sends (codec.bound_bits)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.encoded_bytes / max(self.n, 1)

    @property
    def bound_bits_per_param(self) -> float:
        return self.bound_bits / max(self.n, 1)

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(self.encoded_bytes, 1)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}-raw-bytes": float(self.raw_bytes),
            f"{prefix}-encoded-bytes": float(self.encoded_bytes),
            f"{prefix}-ratio": self.ratio,
            f"{prefix}-bits-per-param": self.bits_per_param,
            f"{prefix}-bound-bits-per-param": self.bound_bits_per_param,
        }


@runtime_checkable
class Codec(Protocol):
    """The protocol the Flower glue, error feedback and the conformance suite rely on."""

    name: ClassVar[str]
    codec_id: ClassVar[int]  # in the payload header; unique in the registry
    payload_type: ClassVar[str]  # the Flower Array ``stype`` of its payloads
    passthrough: ClassVar[bool]  # True: the glue sends plain float32 arrays, no payload

    def encode(self, update: Update, *, base: int = 0) -> tuple[bytes, EncodeStats]: ...

    def encode_reconstructed(
        self, update: Update, *, base: int = 0
    ) -> tuple[bytes, EncodeStats, dict[str, np.ndarray]]:
        """As ``encode``, plus exactly what ``decode`` of the payload will return."""
        ...

    def decode(self, payload: bytes, template: Template, *, base: int | None = None) -> dict[str, np.ndarray]:
        """Dense float32 arrays; :class:`PayloadError` (with a reason) on any bad input."""
        ...

    def size_bound(self, template: Template) -> int:
        """No payload of this codec for ``template`` is longer (the decoder refuses longer)."""
        ...

    def stats_of(self, payload: bytes, template: Template) -> EncodeStats:
        """The sizes of a payload that decodes (the receiver's view, for the records)."""
        ...


@dataclass(frozen=True)
class Parts:
    """What a codec's rule produced, before it is laid out as bytes."""

    k: int
    scales: np.ndarray  # float32; what the receiver multiplies by (empty if none)
    per_tensor: bool
    data: dict[str, Any]  # the codec's own pieces (indices, signs, values, ...)


class FlatCodec:
    """Shared work of every codec: flatten, check, frame, unframe, verify.

    A subclass implements four pure functions of the flat update ``x``:
    :meth:`parts` (the rule), :meth:`body` (its bytes), :meth:`read_body` (the bytes back
    to parts, validated) and :meth:`reconstruct` (parts to the dense update).  Encoder and
    decoder both reconstruct through :meth:`reconstruct`, from the scales as stored
    (fp16-rounded where fp16 suffices), so error feedback is exact.
    """

    name: ClassVar[str] = ""
    codec_id: ClassVar[int] = -1
    payload_type: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    # True: the glue sends plain Flower arrays instead of a payload (dense float32).
    passthrough: ClassVar[bool] = False
    # True: a payload carries a subset of the coordinates (top-k); the others decode to 0.
    # The server then averages each coordinate over its senders (``server.aggregate``).
    sparse: ClassVar[bool] = False
    # The scales a payload carries: "none"; "tensor", one per tensor; "tensor-or-global", one
    # per tensor when the payload is flagged FLAG_TENSOR_SCALES, else one for the whole update.
    scales: ClassVar[Literal["none", "tensor", "tensor-or-global"]] = "none"

    def __init__(self, density: float = 1.0, settings: Any = None) -> None:
        self.density = density
        self.settings = settings

    # --------------------------------------------------------- what a codec writes
    def parts(self, x: np.ndarray, template: Template) -> Parts:
        raise NotImplementedError

    def body(self, parts: Parts, n: int) -> bytes:
        raise NotImplementedError

    def read_body(self, body: bytes, header: Header, num_scales: int) -> Parts:
        raise NotImplementedError

    def reconstruct(self, template: Template, parts: Parts) -> np.ndarray:
        raise NotImplementedError

    def body_bound(self, template: Template) -> int:
        raise NotImplementedError

    def bound_bits(self, n: int, k: int) -> float:
        """Information bound of what this codec transmits, in bits (for the figures)."""
        raise NotImplementedError

    def flags(self) -> int:
        return 0

    # --------------------------------------------------------- the protocol
    def encode(self, update: Update, *, base: int = 0) -> tuple[bytes, EncodeStats]:
        payload, stats, _ = self._encode(update, base, reconstruct=False)
        return payload, stats

    def encode_reconstructed(
        self, update: Update, *, base: int = 0
    ) -> tuple[bytes, EncodeStats, dict[str, np.ndarray]]:
        payload, stats, decoded = self._encode(update, base, reconstruct=True)
        assert decoded is not None
        return payload, stats, decoded

    def size_bound(self, template: Template) -> int:
        return HEADER_BOUND + 4 * (len(template.names) + 1) + self.body_bound(template)

    def stats_of(self, payload: bytes, template: Template) -> EncodeStats:
        header, _, body, _ = unpack(payload)
        n = header.n
        return EncodeStats(
            n, header.k, 4 * n, len(payload), len(payload) - len(body), self.bound_bits(n, header.k)
        )

    def _encode(
        self, update: Update, base: int, *, reconstruct: bool
    ) -> tuple[bytes, EncodeStats, dict[str, np.ndarray] | None]:
        template = Template.of(update)
        x = template.flatten(update)
        if not np.all(np.isfinite(x)):
            raise ValueError("cannot encode an update with NaN or Inf entries")
        parts = self.parts(x, template)
        body = self.body(parts, x.size)
        flags = self.flags() | (FLAG_TENSOR_SCALES if parts.per_tensor else 0)
        header = Header(
            self.codec_id, flags, template.fingerprint, x.size, parts.k, len(template.names), base
        )
        payload, seen = pack(header, parts.scales, body)
        parts = Parts(parts.k, seen, parts.per_tensor, parts.data)  # reconstruct as the receiver will
        stats = EncodeStats(
            x.size,
            parts.k,
            4 * x.size,
            len(payload),
            len(payload) - len(body),
            self.bound_bits(x.size, parts.k),
        )
        decoded = template.unflatten(self.reconstruct(template, parts)) if reconstruct else None
        return payload, stats, decoded

    def decode(self, payload: bytes, template: Template, *, base: int | None = None) -> dict[str, np.ndarray]:
        if len(payload) > self.size_bound(template):
            raise PayloadError(
                "count", f"{len(payload)} bytes is more than this codec sends for the template"
            )
        header, scales, body, _ = unpack(payload)
        if header.codec != self.codec_id:
            raise PayloadError("codec", f"payload of codec id {header.codec}, this is {self.name!r}")
        if header.fingerprint != template.fingerprint:
            raise PayloadError("fingerprint", "payload was encoded for other tensor names, shapes or dtypes")
        n = template.size
        if header.n != n or header.tensors != len(template.names) or header.k > n:
            raise PayloadError(
                "count", f"header n={header.n} k={header.k} tensors={header.tensors}, expected n={n}"
            )
        per_tensor = bool(header.flags & FLAG_TENSOR_SCALES)
        expected_scales = self.num_scales(template, per_tensor)
        if scales.size != expected_scales:
            raise PayloadError("count", f"{scales.size} scales, this codec uses {expected_scales}")
        if base is not None and header.base != base:
            raise PayloadError("version", f"delta applies to global {header.base}, receiver holds {base}")
        if not np.all(np.isfinite(scales)):
            raise PayloadError("nonfinite", "payload carries a NaN or Inf scale")
        parts = self.read_body(body, header, scales.size)
        parts = Parts(parts.k, scales, per_tensor, parts.data)
        out = self.reconstruct(template, parts)
        if not np.all(np.isfinite(out)):
            raise PayloadError("nonfinite", "payload decodes to NaN or Inf")
        return template.unflatten(out)

    def num_scales(self, template: Template, per_tensor: bool) -> int:
        """How many scales a payload of this codec carries (see :attr:`scales`)."""
        if self.scales == "none":
            return 0
        return len(template.names) if per_tensor or self.scales == "tensor" else 1

    @staticmethod
    def stored_scales(scales: np.ndarray) -> np.ndarray:
        """The scales as the receiver will read them (fp16-rounded where fp16 suffices)."""
        return scale_bytes(np.asarray(scales, dtype=np.float32))[2]


def with_error_feedback(
    codec: Codec,
    update: Update,
    residual: Update | None,
    *,
    base: int = 0,
) -> tuple[bytes, EncodeStats, dict[str, np.ndarray]]:
    """Encode ``update + residual``; the new residual is what the encoding lost.

    residual' = (update + residual) - decode(encode(update + residual))
    (error feedback, Seide et al. 2014; Karimireddy et al. 2019).
    """
    corrected = {k: update[k] + residual[k] for k in update} if residual else dict(update)
    payload, stats, decoded = codec.encode_reconstructed(corrected, base=base)
    return payload, stats, {k: corrected[k] - decoded[k] for k in corrected}
