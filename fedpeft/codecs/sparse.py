"""Top-k sparsification and ternarization of an update vector: pure, vectorized NumPy.

ComPEFT (Yadav et al., 2023): keep the k = round(density * n) entries of largest
magnitude of the update tau, replace each by sign(tau) * alpha * std(tau), zero the rest.
STC (Sattler et al., 2019) uses the mean magnitude of the kept entries as the scale.
"""

from __future__ import annotations

import itertools

import numpy as np


def num_kept(n: int, density: float) -> int:
    """k = round(density * n), clipped to [0, n]; at least 1 of a non-empty tensor."""
    if n == 0:
        return 0
    return int(min(n, max(1, round(density * n))))


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k entries of largest |x|; ties go to the lower index.

    Exactly k indices (fewer only when x has fewer than k non-zero entries: a zero has no
    sign to send), deterministic, O(n): ``partition`` finds the threshold, then every
    entry strictly above it is kept and the ties at the threshold are filled in index order.
    """
    n = x.size
    k = min(k, int(np.count_nonzero(x)))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    mag = np.abs(x)
    threshold = np.partition(mag, n - k)[n - k]
    above = np.flatnonzero(mag > threshold)
    ties = np.flatnonzero(mag == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.int64)


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
            value = alpha * float(np.std(x, dtype=np.float64)) if x.size else 0.0
        else:
            value = float(np.mean(np.abs(x[indices]))) if indices.size else 0.0
        return np.asarray([value], dtype=np.float32)
    sizes = np.diff(offsets)
    if scale == "std":
        # reduceat over the starts of non-empty segments only (it mishandles empty ones)
        nz = sizes > 0
        x64 = x.astype(np.float64)
        sums, sq = np.zeros(len(sizes)), np.zeros(len(sizes))
        if x.size:
            sums[nz] = np.add.reduceat(x64, offsets[:-1][nz])
            sq[nz] = np.add.reduceat(x64 * x64, offsets[:-1][nz])
        safe = np.maximum(sizes, 1)
        var = np.maximum(sq / safe - (sums / safe) ** 2, 0.0)
        out = alpha * np.sqrt(var)
        out[sizes == 0] = 0.0
        return out.astype(np.float32)
    counts = np.bincount(seg, minlength=len(sizes))
    total = np.bincount(seg, weights=np.abs(x[indices]).astype(np.float64), minlength=len(sizes))
    return np.where(counts > 0, total / np.maximum(counts, 1), 0.0).astype(np.float32)
