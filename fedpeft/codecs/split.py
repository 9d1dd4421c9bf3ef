"""Two codecs in one payload: small tensors (a classification head, biases) through one,
the rest through another.

A head of 384 x 5 entries is 2.5% of a LoRA update but learned from scratch, so what a
sparse codec delays there costs the most accuracy per byte (``benchmarks/frontier.py``,
ablation table).  ``codec.small-tensors = N`` sends every tensor of at most N entries
through ``codec.small-codec`` instead.

Layout: magic "FS" | varint length of the first payload | first payload (large tensors)
| second payload (small tensors); each inner payload is a complete, checksummed payload
of its own codec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from fedpeft.codecs.base import Codec, EncodeStats, Update
from fedpeft.codecs.bitstream import PayloadError, Template, get_varint, put_varint

MAGIC = b"FS"


def split_template(template: Template, limit: int) -> tuple[Template, Template]:
    """(tensors with more than ``limit`` entries, the others)."""
    sizes = dict(zip(template.names, template.sizes.tolist(), strict=True))
    shapes = dict(zip(template.names, template.shapes, strict=True))
    large = tuple(n for n in template.names if sizes[n] > limit)
    small = tuple(n for n in template.names if sizes[n] <= limit)
    return Template(large, tuple(shapes[n] for n in large)), Template(small, tuple(shapes[n] for n in small))


class SplitCodec:
    """``large`` for tensors of more than ``limit`` entries, ``small`` for the rest."""

    name: ClassVar[str] = "split"
    codec_id: ClassVar[int] = -1  # a container of two payloads, never one of its own
    payload_type: ClassVar[str] = "fedpeft.split/2"
    passthrough: ClassVar[bool] = False

    def __init__(self, large: Codec, small: Codec, limit: int) -> None:
        self.large, self.small, self.limit = large, small, limit

    @property
    def sparse(self) -> bool:
        """Sparse when the large tensors' codec is (the small ones are few and dense)."""
        return bool(getattr(self.large, "sparse", False))

    def _halves(self, update: Update) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        big, little = split_template(Template.of(update), self.limit)
        return {k: update[k] for k in big.names}, {k: update[k] for k in little.names}

    def encode(self, update: Update, *, base: int = 0) -> tuple[bytes, EncodeStats]:
        payload, stats, _ = self.encode_reconstructed(update, base=base)
        return payload, stats

    def encode_reconstructed(
        self, update: Update, *, base: int = 0
    ) -> tuple[bytes, EncodeStats, dict[str, np.ndarray]]:
        big, little = self._halves(update)
        p1, s1, d1 = self.large.encode_reconstructed(big, base=base)
        p2, s2, d2 = self.small.encode_reconstructed(little, base=base)
        head = MAGIC + put_varint(len(p1))
        payload = head + p1 + p2
        stats = EncodeStats(
            s1.n + s2.n,
            s1.k + s2.k,
            s1.raw_bytes + s2.raw_bytes,
            len(payload),
            s1.header_bytes + s2.header_bytes + len(head),
            s1.bound_bits + s2.bound_bits,
        )
        return payload, stats, d1 | d2

    def decode(self, payload: bytes, template: Template, *, base: int | None = None) -> dict[str, np.ndarray]:
        if len(payload) > self.size_bound(template):
            raise PayloadError("count", f"{len(payload)} bytes is more than this codec sends")
        if payload[:2] != MAGIC:
            raise PayloadError("malformed", f"bad magic {payload[:2]!r} of a split payload")
        length, pos = get_varint(payload, 2)
        if pos + length > len(payload):
            raise PayloadError("truncated", "first part runs past the payload")
        big, little = split_template(template, self.limit)
        out = self.large.decode(payload[pos : pos + length], big, base=base)
        return out | self.small.decode(payload[pos + length :], little, base=base)

    def stats_of(self, payload: bytes, template: Template) -> EncodeStats:
        length, pos = get_varint(payload, 2)
        big, little = split_template(template, self.limit)
        s1 = self.large.stats_of(payload[pos : pos + length], big)
        s2 = self.small.stats_of(payload[pos + length :], little)
        return EncodeStats(
            s1.n + s2.n,
            s1.k + s2.k,
            s1.raw_bytes + s2.raw_bytes,
            len(payload),
            s1.header_bytes + s2.header_bytes + pos,
            s1.bound_bits + s2.bound_bits,
        )

    def size_bound(self, template: Template) -> int:
        big, little = split_template(template, self.limit)
        return 2 + 10 + self.large.size_bound(big) + self.small.size_bound(little)


def codec_for_template(
    codec: Codec, small: Codec, limit: int, template: Mapping[str, np.ndarray] | Template
) -> Codec:
    """``codec``, or a :class:`SplitCodec` when ``limit`` puts some (not all) tensors apart."""
    t = template if isinstance(template, Template) else Template.of(template)
    if limit <= 0:
        return codec
    big, little = split_template(t, limit)
    if not big.names or not little.names:
        return small if not big.names else codec
    return SplitCodec(codec, small, limit)
