"""The payload container: one packed byte string per message, versioned and checksummed.

Layout (little-endian), format version 1::

    magic "FPCP" | version u8 | flags u8 | coder u8 | reserved u8
    fingerprint 8 bytes (names, shapes, dtypes of the tensors it encodes)
    n u64 (elements) | k u64 (kept) | tensors u32 | base u32 (which global a delta applies to)
    positions length u64
    scales: f32 x (tensors or 1) | positions stream | values (sign bits, or fp16 values)
    crc32 u32 of everything above

Every decoding failure is a :class:`PayloadError` with a short machine-readable
``reason`` ("truncated", "checksum", "version", "fingerprint", "count", "malformed",
"nonfinite") so the server can record why an update was rejected.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

MAGIC = b"FPCP"
VERSION = 1
HEADER = struct.Struct("<4sBBBB8sQQIIQ")
CRC = struct.Struct("<I")

FLAG_FP16_VALUES = 1  # kept values as fp16 magnitudes (sparsify only), else ternary signs
FLAG_TENSOR_SCALES = 2  # one scale per tensor, else one for all


class PayloadError(ValueError):
    """A payload that cannot be decoded; ``reason`` says why in one word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Template:
    """The layout a payload encodes: canonical names and shapes (all float32)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Template:
        names = tuple(sorted(arrays))
        return cls(names, tuple(tuple(int(d) for d in arrays[k].shape) for k in names))

    @property
    def sizes(self) -> np.ndarray:
        return np.asarray([int(np.prod(s, dtype=np.int64)) for s in self.shapes], dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def size(self) -> int:
        return int(self.sizes.sum())

    @property
    def fingerprint(self) -> bytes:
        text = ";".join(
            f"{n}:{'x'.join(map(str, s))}:float32" for n, s in zip(self.names, self.shapes, strict=True)
        )
        return hashlib.sha256(text.encode()).digest()[:8]

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        return (
            np.concatenate([np.asarray(arrays[k], dtype=np.float32).ravel() for k in self.names])
            if self.names
            else np.empty(0, np.float32)
        )

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        off = self.offsets
        return {k: flat[off[i] : off[i + 1]].reshape(self.shapes[i]) for i, k in enumerate(self.names)}


@dataclass(frozen=True)
class Header:
    flags: int
    coder: int
    fingerprint: bytes
    n: int
    k: int
    tensors: int
    base: int
    positions_len: int


def pack(header: Header, scales: np.ndarray, positions: bytes, values: bytes) -> bytes:
    head = HEADER.pack(
        MAGIC,
        VERSION,
        header.flags,
        header.coder,
        0,
        header.fingerprint,
        header.n,
        header.k,
        header.tensors,
        header.base,
        len(positions),
    )
    body = head + scales.astype("<f4").tobytes() + positions + values
    return body + CRC.pack(zlib.crc32(body))


def unpack(payload: bytes) -> tuple[Header, bytes]:
    """Check framing, version and checksum; return the header and the rest of the body."""
    if len(payload) < HEADER.size + CRC.size:
        raise PayloadError("truncated", f"{len(payload)} bytes is shorter than the header")
    body, (crc,) = payload[: -CRC.size], CRC.unpack(payload[-CRC.size :])
    magic, version, flags, coder, _, fingerprint, n, k, tensors, base, plen = HEADER.unpack_from(body)
    if magic != MAGIC:
        raise PayloadError("malformed", f"bad magic {magic!r}")
    if version != VERSION:
        raise PayloadError("version", f"format version {version}, this decoder reads {VERSION}")
    if zlib.crc32(body) != crc:
        raise PayloadError("checksum", "crc32 does not match the payload")
    return Header(flags, coder, fingerprint, n, k, tensors, base, plen), body[HEADER.size :]
