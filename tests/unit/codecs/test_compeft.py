"""ComPEFT-specific properties: size against the entropy bound, exact k, ties, the figures."""

import math

import numpy as np
import pytest

from fedpeft.codecs import Template, build_codec, entropy_bound_bits
from fedpeft.codecs.compeft import CompeftSettings


def compeft(density, **settings):
    return build_codec("compeft", density, {"compeft": CompeftSettings(**settings)})


@pytest.mark.parametrize("positions", ["ans", "rice"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2])
def test_size_is_within_3_percent_of_the_entropy_bound_plus_header(positions, density):
    rng = np.random.default_rng(1)
    update = {
        "w": rng.normal(size=(400_000,)).astype(np.float32),
        "b": rng.normal(size=(384, 8)).astype(np.float32),
    }
    payload, stats = compeft(density, positions=positions).encode(update)
    body_bits = 8 * (len(payload) - stats.header_bytes)
    assert body_bits <= 1.03 * entropy_bound_bits(stats.n, stats.k) + 8 * 16  # + coder framing
    assert stats.header_bytes <= 32


def test_size_bound_holds_for_a_real_lora_update():
    from fedpeft.config import RunConfig
    from fedpeft.models import build_model
    from fedpeft.tasks import get_task
    from fedpeft.tasks.settings import TrainConfig
    from fedpeft.training import train_local
    from tests.conftest import TINY

    cfg = RunConfig.from_run_config(TINY)
    task = get_task(cfg)
    model = build_model(cfg, task.num_outputs(cfg))
    before = model.exchange_state()
    train_local(
        model, task.client_train_set(cfg, 0, 3), TrainConfig(batch_size=8, max_steps=3), seed=0, task=task
    )
    update = {k: v - before[k] for k, v in model.exchange_state().items()}
    for positions in ("ans", "rice"):
        payload, stats = compeft(0.1, positions=positions).encode(update)
        assert 8 * (len(payload) - stats.header_bytes) <= 1.03 * entropy_bound_bits(stats.n, stats.k) + 8 * 16
        assert stats.ratio > 45  # 32 bits -> ~0.6 bits per parameter at 10%


def test_small_payload_overhead_at_lora_size():
    """75,653 parameters (LoRA r=8 on MiniLM + a 5-class head) at 1%: the whole payload
    stays within 1.1x of the entropy bound (varint header, fp16 scales)."""
    rng = np.random.default_rng(3)
    shapes = {f"l{i}.{m}.lora_{ab}": (8, 384) for i in range(6) for m in ("q", "v") for ab in ("A", "B")}
    shapes |= {"classifier.weight": (5, 384), "classifier.bias": (5,)}
    update = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    assert sum(v.size for v in update.values()) == 75_653
    payload, stats = compeft(0.01).encode(update)
    assert len(payload) * 8 <= 1.1 * entropy_bound_bits(stats.n, stats.k)


def test_ties_are_broken_by_index_and_k_is_exact():
    codec = compeft(0.3, scale="mean")
    update = {"w": np.ones(10, np.float32)}
    decoded = codec.decode(codec.encode(update)[0], Template.of(update))["w"]
    assert decoded.tolist() == [1.0, 1.0, 1.0] + [0.0] * 7


def test_entropy_bound_figures_from_the_paper_notes():
    for d, bits in ((0.01, 0.091), (0.05, 0.336), (0.1, 0.569), (0.2, 0.922)):
        assert math.isclose(entropy_bound_bits(1_000_000, int(d * 1_000_000)) / 1_000_000, bits, abs_tol=1e-3)
