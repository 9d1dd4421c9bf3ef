"""What every codec must do, as one function a user can call on their own codec.

``tests/unit/codecs/test_conformance.py`` runs this (and hypothesis-driven versions of
it, plus a NumPy reference of each rule) over every registered codec;
``notebooks/03_communication_budget`` calls it on a codec written in the notebook.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping

import numpy as np

from fedpeft.codecs.base import Codec, with_error_feedback
from fedpeft.codecs.bitstream import CRC, REASONS, PayloadError, Template

Reference = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class ConformanceError(AssertionError):
    """A codec broke the contract; the message says which part."""


def sample_update(seed: int = 0) -> dict[str, np.ndarray]:
    """A small LoRA-like update: two factors and a head, one of them with ties and zeros."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(64, 8)).astype(np.float32)
    b[:4] = 0.0
    b[4:8] = 0.5
    return {
        "layer.lora_A.weight": rng.normal(size=(8, 64)).astype(np.float32),
        "layer.lora_B.weight": b,
        "classifier.bias": rng.normal(size=(5,)).astype(np.float32),
    }


def check_codec(
    codec: Codec, reference: Reference | None = None, *, seed: int = 0, mutations: int = 200
) -> None:
    """Raise :class:`ConformanceError` unless ``codec`` keeps the codec contract:

    * ``decode(encode(u))`` equals ``encode_reconstructed(u)``'s view, bit for bit, as
      float32 arrays of the right names and shapes (and ``reference(u)`` if given);
    * error feedback: the residual is exactly (update + old residual) - decoded;
    * no payload is longer than ``size_bound``;
    * damaged, truncated, foreign and random payloads raise PayloadError with a known reason.
    """
    update = sample_update(seed)
    template = Template.of(update)
    payload, stats, seen = codec.encode_reconstructed(update)
    decoded = codec.decode(payload, template)
    _expect(sorted(decoded) == sorted(update), "decode returns other tensor names")
    for k, v in update.items():
        _expect(decoded[k].dtype == np.float32 and decoded[k].shape == v.shape, f"{k}: wrong dtype or shape")
        _expect(np.array_equal(decoded[k], seen[k]), f"{k}: decode differs from encode_reconstructed")
    if reference is not None:
        want = reference(update)
        for k in update:
            _expect(np.allclose(decoded[k], want[k], rtol=1e-6, atol=0), f"{k}: differs from the reference")
    _expect(stats.encoded_bytes == len(payload), "stats.encoded_bytes is not the payload length")
    _expect(len(payload) <= codec.size_bound(template), "payload longer than size_bound")
    residual = None
    for step in range(3):
        nxt = sample_update(seed + 1 + step)
        old = residual or {k: np.zeros_like(v) for k, v in nxt.items()}
        blob, _, residual = with_error_feedback(codec, nxt, residual)
        got = codec.decode(blob, template)
        for k in nxt:
            _expect(
                np.array_equal(residual[k], (nxt[k] + old[k]) - got[k]), f"{k}: residual is not what was lost"
            )
    rng = np.random.default_rng(seed)
    for i in range(mutations):
        data = bytearray(payload)
        if i % 4 == 0:
            data = data[: rng.integers(0, len(data))]
        else:
            for _ in range(1 + i % 3):
                pos = int(rng.integers(0, len(data)))
                data[pos] ^= 1 << int(rng.integers(0, 8))
            if i % 2:  # a valid checksum over damaged content reaches the codec's own checks
                data = data[: -CRC.size] + bytearray(CRC.pack(zlib.crc32(bytes(data[: -CRC.size]))))
        _refused_or_finite(codec, bytes(data), template)
    _refused_or_finite(codec, rng.bytes(64), template)
    _refused_or_finite(codec, payload + bytes(codec.size_bound(template)), template)


def _refused_or_finite(codec: Codec, data: bytes, template: Template) -> None:
    try:
        out = codec.decode(data, template)
    except PayloadError as err:
        _expect(err.reason in REASONS, f"unknown rejection reason {err.reason!r}")
        return
    except Exception as err:  # anything but a PayloadError is a bug of the codec
        raise ConformanceError(f"damaged payload raised {type(err).__name__}: {err}") from err
    _expect(all(np.isfinite(v).all() for v in out.values()), "a damaged payload decoded to NaN or Inf")


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ConformanceError(what)
