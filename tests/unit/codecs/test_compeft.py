"""Round-trip properties of every registered codec against a straightforward reference."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedpeft.codecs import CODECS, Template, entropy_bound_bits, with_error_feedback
from fedpeft.codecs.sparse import num_kept
from fedpeft.config import CodecConfig

CONFIGS = [
    CodecConfig(
        name="compeft", density=d, scope=scope, values=values, scale=scale, scale_per=per, positions=pos
    )
    for d in (0.01, 0.1, 0.5)
    for scope in ("tensor", "global")
    for values, scale in (("ternary", "mean"), ("ternary", "std"), ("fp16", "mean"))
    for per in ("tensor", "global")
    for pos in ("ans", "rice")
]


def reference(update: dict, cfg: CodecConfig) -> dict:
    """The ComPEFT / STC result computed the obvious way: stable sort by -|x|, per element."""
    names = sorted(update)
    flat = [np.asarray(update[k], np.float32).ravel() for k in names]
    groups = [np.concatenate(flat)] if cfg.scope == "global" else flat
    kept = []
    for g in groups:
        order = np.argsort(-np.abs(g), kind="stable")
        mask = np.zeros(g.size, bool)
        mask[order[: min(num_kept(g.size, cfg.density), np.count_nonzero(g))]] = True
        kept.append(mask)
    mask_all = np.concatenate(kept)
    x = np.concatenate(flat)
    sizes = [f.size for f in flat]
    tensor_of = np.repeat(np.arange(len(flat)), sizes)
    out = np.zeros_like(x)
    if cfg.values == "fp16":
        out[mask_all] = x[mask_all].astype(np.float16).astype(np.float32)
    else:

        def scale_of(sel, values):
            if cfg.scale == "std":
                return np.float32(cfg.alpha * float(np.std(values.astype(np.float64))))
            return np.float32(np.mean(np.abs(x[sel]).astype(np.float64))) if sel.any() else np.float32(0)

        if cfg.scale_per == "global":
            scales = np.full(len(flat), scale_of(mask_all, x))
        else:
            scales = np.array(
                [scale_of(mask_all & (tensor_of == i), f) for i, f in enumerate(flat)], np.float32
            )
        s = scales[tensor_of]
        out[mask_all] = np.where(x[mask_all] < 0, -s[mask_all], s[mask_all])
    offsets = np.cumsum([0, *sizes])
    return {k: out[offsets[i] : offsets[i + 1]].reshape(np.shape(update[k])) for i, k in enumerate(names)}


updates = st.dictionaries(
    st.sampled_from(["a.lora_A.weight", "a.lora_B.weight", "classifier.bias", "classifier.weight"]),
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(-100, 100, width=32, allow_nan=False),
    ),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("codec_name", sorted(CODECS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(update=updates, cfg_index=st.integers(0, len(CONFIGS) - 1))
# Found by this test: a float32 std of tiny values underflowed to 0 (global std scale).
@example(
    update={
        "a.lora_A.weight": np.zeros(1, np.float32),
        "a.lora_B.weight": np.full(1, 1.9494224e-28, np.float32),
    },
    cfg_index=66,
)
def test_decode_encode_equals_the_reference(codec_name, update, cfg_index):
    cfg = CONFIGS[cfg_index]
    codec = CODECS[codec_name](cfg)
    payload, stats = codec.encode(update)
    decoded = codec.decode(payload, Template.of(update))
    expected = reference(update, cfg)
    assert list(decoded) == sorted(update)
    for k in update:
        np.testing.assert_allclose(decoded[k], expected[k], rtol=1e-6, atol=0)
    # exactly k kept (within each tensor for tensor scope), signs preserved
    total = sum(v.size for v in update.values())
    nnz = {k: int(np.count_nonzero(v)) for k, v in update.items()}
    if cfg.scope == "tensor":
        assert stats.k == sum(min(num_kept(v.size, cfg.density), nnz[k]) for k, v in update.items())
    else:
        assert stats.k == min(num_kept(total, cfg.density), sum(nnz.values()))
    flat_dec = np.concatenate([decoded[k].ravel() for k in sorted(update)])
    flat_x = np.concatenate([update[k].ravel() for k in sorted(update)])
    nonzero = flat_dec != 0
    assert nonzero.sum() <= stats.k
    assert np.all(np.sign(flat_dec[nonzero]) == np.sign(flat_x[nonzero]))
    assert stats.n == total and stats.encoded_bytes == len(payload)


@pytest.mark.parametrize("positions", ["ans", "rice"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2])
def test_size_is_within_3_percent_of_the_entropy_bound_plus_header(positions, density):
    rng = np.random.default_rng(1)
    update = {
        "w": rng.normal(size=(400_000,)).astype(np.float32),
        "b": rng.normal(size=(384, 8)).astype(np.float32),
    }
    codec = CODECS["compeft"](CodecConfig(name="compeft", density=density, positions=positions))
    payload, stats = codec.encode(update)
    body_bits = 8 * (len(payload) - stats.header_bytes)
    assert body_bits <= 1.03 * entropy_bound_bits(stats.n, stats.k) + 8  # + padding of the last byte
    assert stats.header_bytes <= 64


def test_size_bound_holds_for_a_real_lora_update():
    from fedpeft import task
    from fedpeft.config import RunConfig, TrainConfig
    from fedpeft.models import build_model
    from fedpeft.training import train_local
    from tests.conftest import TINY

    cfg = RunConfig.from_run_config(TINY)
    model = build_model(cfg, task.num_labels(cfg))
    before = model.exchange_state()
    train_local(model, task.client_train_set(cfg, 0, 3), TrainConfig(batch_size=8, max_steps=3), seed=0)
    update = {k: v - before[k] for k, v in model.exchange_state().items()}
    for positions in ("ans", "rice"):
        codec = CODECS["compeft"](CodecConfig(name="compeft", density=0.1, positions=positions))
        payload, stats = codec.encode(update)
        assert 8 * (len(payload) - stats.header_bytes) <= 1.03 * entropy_bound_bits(stats.n, stats.k) + 8
        assert stats.ratio > 40  # 32 bits -> ~0.58 bits per parameter at 10%


def test_error_feedback_residual_identity():
    rng = np.random.default_rng(2)
    codec = CODECS["compeft"](CodecConfig(name="compeft", density=0.05))
    residual = None
    sent = {"w": np.zeros((50, 20), np.float32)}
    total = {"w": np.zeros((50, 20), np.float32)}
    for _ in range(5):
        update = {"w": rng.normal(size=(50, 20)).astype(np.float32)}
        old = residual or {"w": np.zeros_like(update["w"])}
        payload, _, residual = with_error_feedback(codec, update, residual)
        decoded = codec.decode(payload, Template.of(update))
        # residual' = update + residual - decoded, exactly
        np.testing.assert_allclose(residual["w"], update["w"] + old["w"] - decoded["w"], atol=1e-6)
        sent["w"] += decoded["w"]
        total["w"] += update["w"]
    # nothing is lost for good: what was sent plus what is still owed is everything
    np.testing.assert_allclose(sent["w"] + residual["w"], total["w"], atol=1e-4)


def test_ties_are_broken_by_index_and_k_is_exact():
    codec = CODECS["compeft"](CodecConfig(name="compeft", density=0.3, scale="mean"))
    update = {"w": np.ones(10, np.float32)}
    decoded = codec.decode(codec.encode(update)[0], Template.of(update))["w"]
    assert decoded.tolist() == [1.0, 1.0, 1.0] + [0.0] * 7


def test_entropy_bound_figures_from_the_paper_notes():
    for d, bits in ((0.01, 0.091), (0.05, 0.336), (0.1, 0.569), (0.2, 0.922)):
        assert math.isclose(entropy_bound_bits(1_000_000, int(d * 1_000_000)) / 1_000_000, bits, abs_tol=1e-3)
