"""The payload container every codec shares: one packed byte string per message,
versioned, typed and checksummed.

Layout, format version 2 (integers are LEB128 varints, so a LoRA-sized payload pays a
few bytes for its counts, not 8 each)::

    magic "FP" | version u8 | codec id u8 | flags u8 | fingerprint 4 bytes
    varint n (elements) | varint k (entries the codec kept) | varint tensors
    varint base (which global a delta applies to) | varint scales
    scales: f16 or f32 (flag) x scales | body (the codec's own bytes)
    crc32 u32 of everything above

Every decoding failure is a :class:`PayloadError` with a short machine-readable
``reason`` ("truncated", "checksum", "version", "fingerprint", "count", "malformed",
"nonfinite", "codec") so the server can record why an update was rejected.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

MAGIC = b"FP"
VERSION = 2
FIXED = struct.Struct("<2sBBB4s")
CRC = struct.Struct("<I")

FLAG_FP16_SCALES = 1  # scales stored as float16 (when every one is a normal fp16 number)
FLAG_TENSOR_SCALES = 2  # one scale per tensor, else one for all

REASONS = (
    "truncated",
    "checksum",
    "version",
    "fingerprint",
    "count",
    "malformed",
    "nonfinite",
    "codec",
    "seeded",
)


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
        return hashlib.sha256(text.encode()).digest()[:4]

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        return (
            np.concatenate([np.asarray(arrays[k], dtype=np.float32).ravel() for k in self.names])
            if self.names
            else np.empty(0, np.float32)
        )

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        off = self.offsets
        return {k: flat[off[i] : off[i + 1]].reshape(self.shapes[i]) for i, k in enumerate(self.names)}


def arrays_crc(arrays: Mapping[str, np.ndarray]) -> int:
    """crc32 of the float32 bytes of ``arrays`` in template order: "do we hold the same?"."""
    template = Template.of(arrays)
    return zlib.crc32(np.ascontiguousarray(template.flatten(arrays)).tobytes())


@dataclass(frozen=True)
class Header:
    codec: int
    flags: int
    fingerprint: bytes
    n: int
    k: int
    tensors: int
    base: int


# ------------------------------------------------------------------- varints
def put_varint(value: int) -> bytes:
    """LEB128: 7 bits per byte, low first; 1 byte below 128, 3 bytes for a LoRA-sized n."""
    if value < 0:
        raise ValueError(f"varint of a negative number {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def get_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, next position); at most 10 bytes (64 bits), else a PayloadError."""
    value = shift = 0
    for i in range(10):
        if pos + i >= len(data):
            raise PayloadError("truncated", "payload ends inside a varint")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise PayloadError("malformed", "varint longer than 64 bits")


# ------------------------------------------------------------------- scales
def scale_bytes(scales: np.ndarray) -> tuple[int, bytes, np.ndarray]:
    """(flag, bytes, the scales as the receiver reads them): fp16 where every scale is a
    normal fp16 number (ternary and sign codes lose nothing that matters at 11 bits), else
    fp32.  The sender reconstructs from the returned scales, so error feedback stays exact."""
    s32 = np.asarray(scales, dtype=np.float32)
    s16 = s32.astype(np.float16)
    tiny = np.finfo(np.float16).tiny
    if s32.size and np.all(np.isfinite(s16)) and np.all((s32 == 0) | (np.abs(s16) >= tiny)):
        return FLAG_FP16_SCALES, s16.astype("<f2").tobytes(), s16.astype(np.float32)
    return 0, s32.astype("<f4").tobytes(), s32


def pack(
    header: Header, scales: np.ndarray, body: bytes, *, fp16_scales: bool = True
) -> tuple[bytes, np.ndarray]:
    """The payload and the scales as decoded (fp16-rounded when they were stored as fp16)."""
    flag, raw, seen = scale_bytes(scales) if fp16_scales else (0, np.asarray(scales, "<f4").tobytes(), scales)
    head = FIXED.pack(MAGIC, VERSION, header.codec, header.flags | flag, header.fingerprint) + b"".join(
        put_varint(v) for v in (header.n, header.k, header.tensors, header.base, int(np.size(scales)))
    )
    out = head + raw + body
    return out + CRC.pack(zlib.crc32(out)), np.asarray(seen, dtype=np.float32)


def unpack(payload: bytes) -> tuple[Header, np.ndarray, bytes, int]:
    """Check framing, version and checksum: (header, scales, codec body, overhead bytes)."""
    if len(payload) < FIXED.size + 5 + CRC.size:
        raise PayloadError("truncated", f"{len(payload)} bytes is shorter than the header")
    body, (crc,) = payload[: -CRC.size], CRC.unpack(payload[-CRC.size :])
    magic, version, codec, flags, fingerprint = FIXED.unpack_from(body)
    if magic != MAGIC:
        raise PayloadError("malformed", f"bad magic {magic!r}")
    if version != VERSION:
        raise PayloadError("version", f"format version {version}, this decoder reads {VERSION}")
    if zlib.crc32(body) != crc:
        raise PayloadError("checksum", "crc32 does not match the payload")
    pos = FIXED.size
    fields = []
    for _ in range(5):
        value, pos = get_varint(body, pos)
        fields.append(value)
    n, k, tensors, base, num_scales = fields
    width = 2 if flags & FLAG_FP16_SCALES else 4
    if num_scales > tensors + 1 or pos + width * num_scales > len(body):
        raise PayloadError("count", f"{num_scales} scales for {tensors} tensors in {len(body)} bytes")
    scales = np.frombuffer(body, dtype="<f2" if width == 2 else "<f4", count=num_scales, offset=pos)
    pos += width * num_scales
    header = Header(codec, flags & ~FLAG_FP16_SCALES, fingerprint, n, k, tensors, base)
    return header, scales.astype(np.float32), body[pos:], pos + CRC.size
