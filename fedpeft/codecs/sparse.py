"""Top-k sparsification and ternarization of an update vector: pure, vectorized NumPy.

ComPEFT (Yadav et al., 2023): keep the k = round(density * n) entries of largest
magnitude of the update tau, replace each by sign(tau) * alpha * std(tau), zero the rest.
STC (Sattler et al., 2019) uses the mean magnitude of the kept entries as the scale.
"""

from __future__ import annotations

import itertools

import numpy as np

from fedpeft.codecs.bitstream import PayloadError, get_varint, put_varint
from fedpeft.codecs.positions import CODER_BY_ID, CODERS


def num_kept(n: int, density: float) -> int:
    """k = round(density * n), clipped to [0, n]; at least 1 of a non-empty tensor."""
    if n == 0:
        return 0
    return int(min(n, max(1, round(density * n))))


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k entries of largest |x|; ties go to the lower index.

    Exactly k indices (fewer only when x has fewer than k non-zero entries: a zero has no
    sign to send), deterministic, O(n): ``partition`` finds the threshold, one pass picks
    every entry at or above it (already in index order), and surplus ties at the
    threshold are dropped from the highest index down.
    """
    n = x.size
    if k <= 0 or n == 0:
        return np.empty(0, dtype=np.int64)
    if k >= n:
        return np.flatnonzero(x).astype(np.int64)
    mag = np.abs(x)
    threshold = np.partition(mag, n - k)[n - k]
    if threshold == 0:  # fewer than k non-zero entries: send them all
        return np.flatnonzero(mag).astype(np.int64)
    chosen = np.flatnonzero(mag >= threshold)
    if chosen.size > k:
        tie = mag[chosen] == threshold
        keep = ~tie | (np.cumsum(tie) <= k - (chosen.size - int(tie.sum())))
        chosen = chosen[keep]
    return chosen.astype(np.int64, copy=False)


def segment_topk(x: np.ndarray, offsets: np.ndarray, density: float) -> np.ndarray:
    """Top-k within each segment ``x[offsets[i]:offsets[i+1]]`` (per-tensor scope)."""
    parts = [
        topk_indices(x[lo:hi], num_kept(int(hi - lo), density)) + lo for lo, hi in itertools.pairwise(offsets)
    ]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def segment_of(indices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Which segment (tensor) each flat index falls into."""
    return np.searchsorted(offsets, indices, side="right") - 1


def scales_for(
    x: np.ndarray, indices: np.ndarray, offsets: np.ndarray, *, scale: str, alpha: float, per_tensor: bool
) -> np.ndarray:
    """One float32 scale per tensor (``per_tensor``) or a single one.

    ``std``: alpha * std of the dense update (ComPEFT); ``mean``: mean |x| of the kept
    entries (STC).  A segment with nothing kept gets scale 0.
    """
    seg = segment_of(indices, offsets)
    if not per_tensor:
        if scale == "std":
            # In float64, as per tensor: a float32 variance of tiny updates underflows to 0.
            value = alpha * float(np.std(x.astype(np.float64))) if x.size else 0.0
        else:
            value = float(np.mean(np.abs(x[indices]))) if indices.size else 0.0
        return np.asarray([value], dtype=np.float32)
    sizes = np.diff(offsets)
    if scale == "std":
        # reduceat over the starts of non-empty segments only (it mishandles empty ones)
        nz = sizes > 0
        x64 = x.astype(np.float64)
        sums, sq = np.zeros(len(sizes)), np.zeros(len(sizes))
        safe = np.maximum(sizes, 1)
        if x.size:
            # Two passes, as np.std: E[x^2] - E[x]^2 leaves round-off on a constant tensor.
            sums[nz] = np.add.reduceat(x64, offsets[:-1][nz])
            dev = x64 - np.repeat(sums / safe, sizes)
            sq[nz] = np.add.reduceat(dev * dev, offsets[:-1][nz])
        var = sq / safe
        out = alpha * np.sqrt(var)
        out[sizes == 0] = 0.0
        return out.astype(np.float32)
    counts = np.bincount(seg, minlength=len(sizes))
    total = np.bincount(seg, weights=np.abs(x[indices]).astype(np.float64), minlength=len(sizes))
    return np.where(counts > 0, total / np.maximum(counts, 1), 0.0).astype(np.float32)


# ---------------------------------------------------------------- positions on the wire
def select(x: np.ndarray, offsets: np.ndarray, density: float, scope: str) -> np.ndarray:
    """The sorted flat indices that survive top-k, per tensor or over the whole update."""
    if scope == "global":
        return topk_indices(x, num_kept(x.size, density))
    return segment_topk(x, offsets, density)


def pack_positions(indices: np.ndarray, n: int, coder: str) -> bytes:
    """coder id u8 | varint length | the entropy-coded positions (``fedpeft.codecs.positions``)."""
    coder_id, encode, _ = CODERS[coder]
    stream = encode(indices, n)
    return bytes([coder_id]) + put_varint(len(stream)) + stream


def unpack_positions(body: bytes, k: int, n: int) -> tuple[np.ndarray, bytes]:
    """(sorted indices, the rest of the body); PayloadError on anything malformed."""
    if not body:
        raise PayloadError("truncated", "no position stream")
    if body[0] not in CODER_BY_ID:
        raise PayloadError("malformed", f"unknown position coder id {body[0]}")
    length, pos = get_varint(body, 1)
    if pos + length > len(body):
        raise PayloadError("truncated", f"position stream of {length} bytes runs past the payload")
    _, _, decode = CODERS[CODER_BY_ID[body[0]]]
    return decode(body[pos : pos + length], k, n), body[pos + length :]


def positions_bound_bytes(n: int) -> int:
    """No position stream of n entries is longer: n bits (a plain mask) plus 1% and framing."""
    return n // 8 + n // 800 + 64
