"""Exact LoRA algebra on ``name -> array`` dicts, in pure NumPy.

Names follow HF peft: a LoRA module ``M`` exchanges ``M.lora_A.weight`` [r, in] and
``M.lora_B.weight`` [out, r], and its update of the frozen weight is ``s * B @ A`` with
``s = lora_alpha / r`` (peft's default scaling; ``r`` is that client's rank, read from
``A.shape[0]``).  FLoRA's *merged form* carries ``M.base_delta.A`` [R, in] and
``M.base_delta.B`` [out, R] whose plain product ``B @ A`` is the accumulated update of
``M``'s base weight (scale folded in), or that product itself as ``M.base_delta.W``
[out, in] once it is the smaller.  Every other tensor is *ordinary* (averaged as is).

The maths never forms a dense ``out x in`` matrix it does not need: the SVD of a
product ``B @ A`` is taken through QR factorisations of its (thin) factors, so its cost
grows with the rank, not with ``in * out``.  Everything is computed in float64; callers
cast what travels to float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
BASE_A, BASE_B, BASE_W = ".base_delta.A", ".base_delta.B", ".base_delta.W"

# Singular values below this fraction of the largest count as zero (numerical rank).
NUMERICAL_RTOL = 1e-7
# Row norm of an A row that fills a direction the product does not use (B's column is 0
# there): the expected row norm of peft's default Kaiming-uniform init of lora_A, so the
# direction can still train (an all-zero pair would get zero gradients forever).
NULL_ROW_NORM = 3.0**-0.5
_NULL_SEED = 0x10A4

Factors = tuple[np.ndarray, np.ndarray]  # (B [out, r], A [r, in])


class LoraLayoutError(ValueError):
    """Tensors that do not form the LoRA layout an operation needs."""


# ---------------------------------------------------------------------- names
def lora_a_key(module: str) -> str:
    return module + LORA_A


def lora_b_key(module: str) -> str:
    return module + LORA_B


def base_a_key(module: str) -> str:
    return module + BASE_A


def base_b_key(module: str) -> str:
    return module + BASE_B


def base_w_key(module: str) -> str:
    return module + BASE_W


def _paired(tensors: Mapping[str, object], a_suffix: str, b_suffix: str) -> list[str]:
    a_mods = {k[: -len(a_suffix)] for k in tensors if k.endswith(a_suffix)}
    b_mods = {k[: -len(b_suffix)] for k in tensors if k.endswith(b_suffix)}
    unpaired = sorted(a_mods ^ b_mods)
    if unpaired:
        m = unpaired[0]
        have, lack = (a_suffix, b_suffix) if m in a_mods else (b_suffix, a_suffix)
        raise LoraLayoutError(f"'{m}{have}' has no matching '{m}{lack}'")
    return sorted(a_mods)


def lora_modules(tensors: Mapping[str, object]) -> list[str]:
    """The LoRA modules (``lora_A``/``lora_B`` pairs) in ``tensors``, sorted; an unpaired factor raises."""
    return _paired(tensors, LORA_A, LORA_B)


def merged_modules(tensors: Mapping[str, object]) -> list[str]:
    """The modules in merged form (``base_delta.A``/``.B`` pairs or a dense ``base_delta.W``), sorted."""
    factored = _paired(tensors, BASE_A, BASE_B)
    dense = {k[: -len(BASE_W)] for k in tensors if k.endswith(BASE_W)}
    both = sorted(dense.intersection(factored))
    if both:
        raise LoraLayoutError(f"'{both[0]}' is in merged form twice (base_delta.W and base_delta.A/B)")
    return sorted(dense.union(factored))


def is_lora_key(key: str) -> bool:
    """Whether ``key`` is a LoRA factor or a merged-form tensor (not an ordinary tensor)."""
    return key.endswith((LORA_A, LORA_B, BASE_A, BASE_B, BASE_W))


def ordinary_keys(tensors: Mapping[str, object]) -> list[str]:
    """The keys that are not LoRA or merged-form factors, sorted."""
    return sorted(k for k in tensors if not is_lora_key(k))


def factors_of(tensors: Mapping[str, np.ndarray], module: str) -> Factors:
    """``(B, A)`` of ``module`` in factor form, shapes checked."""
    b, a = np.asarray(tensors[lora_b_key(module)]), np.asarray(tensors[lora_a_key(module)])
    _check_pair(module, b, a)
    return b, a


def merged_of(tensors: Mapping[str, np.ndarray], module: str) -> Factors:
    """``(B, A)`` of ``module`` in merged form, shapes checked; a dense ``W`` reads as ``(W, I)``."""
    if base_w_key(module) in tensors:
        w = np.asarray(tensors[base_w_key(module)])
        if w.ndim != 2:
            raise LoraLayoutError(f"LoRA module '{module}': base_delta.W {w.shape} is not [out, in]")
        return w, np.eye(w.shape[1], dtype=w.dtype)
    b, a = np.asarray(tensors[base_b_key(module)]), np.asarray(tensors[base_a_key(module)])
    _check_pair(module, b, a)
    return b, a


def _check_pair(module: str, b: np.ndarray, a: np.ndarray) -> None:
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise LoraLayoutError(
            f"LoRA module '{module}': B {b.shape} and A {a.shape} are not [out, r] and [r, in]"
        )


# ---------------------------------------------------------------------- products
def scaling(lora_alpha: float, rank: int) -> float:
    """peft's default LoRA scaling ``alpha / r``."""
    return float(lora_alpha) / int(rank)


def product(b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``scale * B @ A`` in float64."""
    return float(scale) * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))


def weighted_product_sum(
    factors: Sequence[tuple[np.ndarray, np.ndarray, float]], weights: Sequence[float]
) -> np.ndarray:
    """``sum_k w_k * s_k * B_k @ A_k`` (dense, float64) for ``factors = [(B_k, A_k, s_k)]``."""
    if not factors or len(factors) != len(weights):
        raise ValueError("weighted_product_sum needs one weight per (B, A, scale) triple")
    b_stack, a_stack = stack_factors(factors, weights)
    return b_stack @ a_stack


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_k w_k x_k / sum_k w_k`` accumulated in float64, in the dtype of ``arrays[0]``."""
    total = float(sum(weights))
    if not arrays or len(arrays) != len(weights) or total <= 0:
        raise ValueError("weighted_mean needs one non-negative weight per array and a positive total")
    acc = np.zeros(np.shape(arrays[0]), np.float64)
    for x, w in zip(arrays, weights, strict=True):
        acc += (float(w) / total) * np.asarray(x, np.float64)
    return acc.astype(np.asarray(arrays[0]).dtype, copy=False)


def stack_factors(
    factors: Sequence[tuple[np.ndarray, np.ndarray, float]], weights: Sequence[float]
) -> Factors:
    """``B_stack = [w_1 s_1 B_1, ..., w_K s_K B_K]``, ``A_stack = [A_1; ...; A_K]`` (float64).

    ``B_stack @ A_stack == sum_k w_k s_k B_k @ A_k`` exactly; the ranks may differ.
    """
    if not factors or len(factors) != len(weights):
        raise ValueError("stack_factors needs one weight per (B, A, scale) triple")
    for b, a, _ in factors:
        _check_pair("stacked", np.asarray(b), np.asarray(a))
    if len({np.shape(b)[0] for b, _, _ in factors}) != 1 or len({np.shape(a)[1] for _, a, _ in factors}) != 1:
        raise LoraLayoutError("stacked factors disagree on the module's [out, in] shape")
    b_stack = np.concatenate(
        [
            float(w) * float(s) * np.asarray(b, np.float64)
            for (b, _, s), w in zip(factors, weights, strict=True)
        ],
        axis=1,
    )
    a_stack = np.concatenate([np.asarray(a, np.float64) for _, a, _ in factors], axis=0)
    return b_stack, a_stack


def drop_zero_components(b: np.ndarray, a: np.ndarray) -> Factors:
    """Leave out rank components whose B column or A row is exactly zero (exact; keeps >= 1)."""
    keep = np.any(b != 0, axis=0) & np.any(a != 0, axis=1)
    if not keep.any():
        keep[0] = True
    return (b, a) if keep.all() else (b[:, keep], a[keep])


# ---------------------------------------------------------------------- SVD
def svd_of_product(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``U, S, Vt`` of ``B @ A`` without forming it (QR of both factors, SVD of the core)."""
    b64, a64 = np.asarray(b, np.float64), np.asarray(a, np.float64)
    _check_pair("product", b64, a64)
    qb, rb = np.linalg.qr(b64)
    qa, ra = np.linalg.qr(a64.T)
    u_core, s, vt_core = np.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u_core, s, vt_core @ qa.T


def numerical_rank(s: np.ndarray, rtol: float = NUMERICAL_RTOL) -> int:
    """How many singular values exceed ``rtol`` times the largest (``s`` sorted descending)."""
    if s.size == 0 or s[0] <= 0:
        return 0
    return int(np.count_nonzero(s > rtol * s[0]))


def _null_rows(vt_live: np.ndarray, count: int, dim: int) -> np.ndarray:
    """``count`` orthonormal rows orthogonal to ``vt_live`` (seeded, so deterministic)."""
    count = min(count, dim - vt_live.shape[0])
    if count <= 0:
        return np.zeros((0, dim))
    g = np.random.default_rng(_NULL_SEED).standard_normal((count, dim))
    for _ in range(2):  # twice is enough for orthogonality to rounding error
        g -= (g @ vt_live.T) @ vt_live
        q, _ = np.linalg.qr(g.T)
        g = q.T
    return g


def balanced_factors(
    u: np.ndarray,
    s: np.ndarray,
    vt: np.ndarray,
    rank: int,
    scale: float = 1.0,
    *,
    fill_null: bool = False,
    rtol: float = NUMERICAL_RTOL,
) -> Factors:
    """Rank-``rank`` balanced factors of ``U diag(S) Vt``, SVD-ordered.

    ``B = U sqrt(S) / sqrt(scale)`` and ``A = sqrt(S) Vt / sqrt(scale)``, so
    ``scale * B @ A`` is the best rank-``rank`` approximation.  Components beyond the
    numerical rank get ``B = 0``; their A rows are zero, or with ``fill_null``
    orthonormal directions unused by the product, scaled to :data:`NULL_ROW_NORM`.
    """
    live = min(rank, numerical_rank(s, rtol))
    root = np.sqrt(s[:live] / float(scale))
    out_dim, in_dim = u.shape[0], vt.shape[1]
    b = np.zeros((out_dim, rank))
    a = np.zeros((rank, in_dim))
    b[:, :live] = u[:, :live] * root
    a[:live] = root[:, None] * vt[:live]
    if fill_null and live < rank:
        rows = _null_rows(vt[:live], rank - live, in_dim)
        a[live : live + rows.shape[0]] = NULL_ROW_NORM * rows
    return b, a


def svd_refactor(matrix: np.ndarray, rank: int, scale: float = 1.0, *, fill_null: bool = False) -> Factors:
    """Balanced rank-``rank`` factors ``(B, A)`` with ``scale * B @ A`` = truncated SVD of ``matrix``."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    return balanced_factors(u, s, vt, rank, scale, fill_null=fill_null)


def refactor_factors(
    b: np.ndarray,
    a: np.ndarray,
    rank: int | None = None,
    scale: float = 1.0,
    *,
    fill_null: bool = False,
    rtol: float = NUMERICAL_RTOL,
) -> Factors:
    """Balanced SVD-ordered factors of ``B @ A``: ``scale * B' @ A'`` is its best rank-``rank`` approximation.

    ``rank=None`` keeps the numerical rank (at least 1), which is exact up to ``rtol``.
    """
    u, s, vt = svd_of_product(b, a)
    if rank is None:
        rank = max(numerical_rank(s, rtol), 1)
    return balanced_factors(u, s, vt, rank, scale, fill_null=fill_null, rtol=rtol)


def truncate_factors(b: np.ndarray, a: np.ndarray, rank: int, scale_from: float, scale_to: float) -> Factors:
    """The leading ``rank`` components of SVD-ordered factors, rescaled for a new LoRA scale.

    Both factors are multiplied by ``sqrt(scale_from / scale_to)`` so that
    ``scale_to * B_r @ A_r == scale_from * B[:, :r] @ A[:r]``: for balanced SVD-ordered
    input this is the best rank-``rank`` approximation of ``scale_from * B @ A``.
    """
    if not 1 <= rank <= a.shape[0]:
        raise LoraLayoutError(f"cannot truncate rank-{a.shape[0]} factors to rank {rank}")
    c = np.sqrt(float(scale_from) / float(scale_to))
    return b[:, :rank] * c, a[:rank] * c
