"""The exact LoRA algebra: products, stacking, balanced SVD factors, truncation."""

import numpy as np
import pytest

from strategies import lora_exact as lx


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_names_split_modules_from_ordinary_tensors():
    t = {
        "m.lora_A.weight": 0,
        "m.lora_B.weight": 0,
        "n.base_delta.A": 0,
        "n.base_delta.B": 0,
        "d.base_delta.W": 0,
        "classifier.bias": 0,
    }
    assert lx.lora_modules(t) == ["m"] and lx.merged_modules(t) == ["d", "n"]
    assert lx.ordinary_keys(t) == ["classifier.bias"]
    assert lx.is_lora_key("d.base_delta.W") and not lx.is_lora_key("d.base_delta.weight")
    with pytest.raises(lx.LoraLayoutError, match="'n' is in merged form twice"):
        lx.merged_modules(t | {"n.base_delta.W": 0})
    with pytest.raises(lx.LoraLayoutError, match=r"'x\.lora_A\.weight' has no matching 'x\.lora_B\.weight'"):
        lx.lora_modules({"x.lora_A.weight": 0})


def test_merged_of_reads_factors_or_a_dense_w_as_w_times_identity():
    rng = _rng(6)
    b, a, w = rng.normal(size=(6, 2)), rng.normal(size=(2, 5)), rng.normal(size=(6, 5)).astype(np.float32)
    t = {"n.base_delta.B": b, "n.base_delta.A": a, "d.base_delta.W": w}
    got_b, got_a = lx.merged_of(t, "n")
    assert np.array_equal(got_b, b) and np.array_equal(got_a, a)
    wb, wa = lx.merged_of(t, "d")
    assert np.array_equal(wb, w) and np.array_equal(wa, np.eye(5)) and wa.dtype == w.dtype
    np.testing.assert_array_equal(lx.product(wb, wa), w.astype(np.float64))
    with pytest.raises(lx.LoraLayoutError, match=r"not \[out, in\]"):
        lx.merged_of({"d.base_delta.W": np.ones(5)}, "d")
    with pytest.raises(lx.LoraLayoutError, match=r"are not \[out, r\] and \[r, in\]"):
        lx.merged_of({"n.base_delta.B": b, "n.base_delta.A": a.T}, "n")


def test_stacking_is_exact_for_mixed_ranks():
    rng = _rng()
    factors = [(rng.normal(size=(6, r)), rng.normal(size=(r, 5)), 16.0 / r) for r in (1, 3, 4)]
    weights = [0.2, 0.5, 0.3]
    b, a = lx.stack_factors(factors, weights)
    assert b.shape == (6, 8) and a.shape == (8, 5)
    dense = sum(w * s * bk @ ak for (bk, ak, s), w in zip(factors, weights, strict=True))
    np.testing.assert_allclose(b @ a, dense, rtol=1e-12)
    np.testing.assert_allclose(lx.weighted_product_sum(factors, weights), dense, rtol=1e-12)
    with pytest.raises(lx.LoraLayoutError, match="disagree"):
        lx.stack_factors([factors[0], (np.ones((7, 1)), np.ones((1, 5)), 1.0)], [0.5, 0.5])


def test_svd_of_a_product_without_forming_it():
    rng = _rng(1)
    b, a = rng.normal(size=(10, 3)), rng.normal(size=(3, 7))
    u, s, vt = lx.svd_of_product(b, a)
    np.testing.assert_allclose(u * s @ vt, b @ a, atol=1e-12)
    np.testing.assert_allclose(s, np.linalg.svd(b @ a, compute_uv=False)[:3], rtol=1e-10)
    assert lx.numerical_rank(s) == 3


def test_balanced_refactor_is_the_best_rank_r_approximation_with_scale():
    rng = _rng(2)
    m = rng.normal(size=(6, 9))
    scale = 16.0 / 4
    b, a = lx.svd_refactor(m, 4, scale)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    np.testing.assert_allclose(scale * b @ a, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-12)
    # balanced: column norms of B equal row norms of A
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1))


def test_refactor_at_numerical_rank_is_exact_and_small():
    rng = _rng(3)
    b = rng.normal(size=(12, 20))
    a = np.concatenate([rng.normal(size=(5, 9))] * 4)  # 20 stacked rows spanning rank 5
    b2, a2 = lx.refactor_factors(b, a)
    assert a2.shape == (5, 9) and b2.shape == (12, 5)
    np.testing.assert_allclose(b2 @ a2, b @ a, atol=1e-10)


def test_null_directions_are_trainable_and_do_not_change_the_product():
    rng = _rng(4)
    b, a = rng.normal(size=(6, 2)), rng.normal(size=(2, 8))  # rank 2, asked for 4
    b4, a4 = lx.refactor_factors(b, a, 4, 2.0, fill_null=True)
    np.testing.assert_allclose(2.0 * b4 @ a4, b @ a, atol=1e-12)
    assert not b4[:, 2:].any()
    np.testing.assert_allclose(np.linalg.norm(a4[2:], axis=1), lx.NULL_ROW_NORM)
    np.testing.assert_allclose(a4[2:] @ a4[:2].T, 0, atol=1e-12)  # orthogonal to the live rows
    _b0, a0 = lx.refactor_factors(b, a, 4, 2.0)
    assert not a0[2:].any()


def test_truncation_rescales_for_the_smaller_rank():
    rng = _rng(5)
    alpha, big, small = 16.0, 8, 2
    m = rng.normal(size=(7, 5)) @ rng.normal(size=(5, 9))
    b, a = lx.svd_refactor(m, big, alpha / big)
    br, ar = lx.truncate_factors(b, a, small, alpha / big, alpha / small)
    np.testing.assert_allclose(
        (alpha / small) * br @ ar, (lx.svd_refactor(m, small)[0] @ lx.svd_refactor(m, small)[1]), atol=1e-10
    )
    with pytest.raises(lx.LoraLayoutError):
        lx.truncate_factors(b, a, big + 1, 1.0, 1.0)


def test_zero_components_drop_exactly_but_one_stays():
    b = np.array([[1.0, 0.0, 2.0]])
    a = np.array([[1.0, 1.0], [3.0, 3.0], [0.0, 0.0]])
    b2, a2 = lx.drop_zero_components(b, a)
    assert b2.shape == (1, 1) and np.array_equal(b2 @ a2, b @ a)
    bz, az = lx.drop_zero_components(np.zeros((2, 3)), np.ones((3, 4)))
    assert bz.shape == (2, 1) and az.shape == (1, 4)


def test_weighted_mean_keeps_dtype_and_rejects_zero_total():
    x = [np.ones(3, np.float32), 3 * np.ones(3, np.float32)]
    got = lx.weighted_mean(x, [1, 3])
    assert got.dtype == np.float32 and np.allclose(got, 2.5)
    with pytest.raises(ValueError):
        lx.weighted_mean(x, [0, 0])
