"""FLoRA's merged form on the model side, FFA-LoRA's frozen A, and per-client LoRA ranks."""

import numpy as np
import pytest
import torch

from fedpeft.config import RunConfig
from fedpeft.models import ExchangeError, build_model
from strategies.lora_exact import BASE_A, BASE_B

TOKENS = {"input_ids": torch.tensor([[101, 7592, 2088, 2003, 2307, 102]]), "attention_mask": torch.ones(1, 6)}


@pytest.fixture(scope="module")
def lora():
    return build_model(RunConfig(device="cpu", lora=RunConfig().lora.__class__(r=4)), num_labels=3)


def logits(model):
    model.module.eval()  # LoRA dropout would make the two forms differ
    with torch.no_grad():
        return model.module(**TOKENS).logits


def test_the_layout_finds_every_lora_module(lora):
    assert lora.lora is not None
    assert len(lora.lora.modules) == 12  # query and value of 6 layers
    assert all(name.endswith((".query", ".value")) for name in lora.lora.modules)


def test_merged_form_equals_the_same_update_as_factors(lora):
    rng = np.random.default_rng(0)
    scale = lora.module.peft_config["default"].lora_alpha / 4
    factors = dict(lora.initial_state)
    merged = {k: v for k, v in lora.initial_state.items() if k.startswith("classifier.")}
    for name in lora.lora.modules:
        a = rng.normal(0, 0.05, (4, 384)).astype(np.float32)
        b = rng.normal(0, 0.05, (384, 4)).astype(np.float32)
        factors[f"{name}.lora_A.weight"], factors[f"{name}.lora_B.weight"] = a, b
        merged[name + BASE_A], merged[name + BASE_B] = a, scale * b
    lora.load_exchange_state(factors)
    expected = logits(lora)
    lora.load_exchange_state(merged)
    # The adapter restarted from its seeded init (B = 0) and the update sits in the base weights.
    state = lora.exchange_state()
    assert all(np.array_equal(state[k], lora.initial_state[k]) for k in state if ".lora_" in k)
    assert torch.allclose(logits(lora), expected, atol=1e-5)
    # Loading ordinary factors again puts the pretrained weights back.
    lora.load_exchange_state(lora.initial_state)
    assert all(torch.equal(m.base_weight, m.pretrained) for m in lora.lora.modules.values())


def test_merged_form_is_strict(lora):
    merged = {k: v for k, v in lora.initial_state.items() if k.startswith("classifier.")}
    for name in lora.lora.modules:
        merged[name + BASE_A] = np.zeros((2, 384), np.float32)
        merged[name + BASE_B] = np.zeros((384, 2), np.float32)
    with pytest.raises(ExchangeError, match="missing"):
        lora.load_exchange_state({k: v for k, v in merged.items() if k != "classifier.bias"})
    with pytest.raises(ExchangeError, match="unexpected"):
        lora.load_exchange_state(merged | {"bert.pooler.dense.weight": np.zeros((384, 384), np.float32)})
    name = next(iter(lora.lora.modules))
    with pytest.raises(ExchangeError, match="does not give"):
        lora.load_exchange_state(merged | {name + BASE_B: np.zeros((384, 3), np.float32)})
    lora.load_exchange_state(lora.initial_state)


def test_ffa_lora_freezes_a_at_the_shared_seeded_init():
    cfg = RunConfig.from_run_config({"strategy.name": "ffa-lora", "device": "cpu", "lora.r": 2})
    assert cfg.lora.freeze_a
    model = build_model(cfg, num_labels=3)
    assert not any(".lora_A." in k for k in model.params)
    assert any(".lora_B." in k for k in model.params)
    a = {n: p.detach().clone() for n, p in model.module.named_parameters() if ".lora_A." in n}
    again = build_model(cfg, num_labels=3)  # another process builds the same A from the seed
    assert all(torch.equal(p, a[n]) for n, p in again.module.named_parameters() if ".lora_A." in n)


def test_each_client_builds_its_own_rank():
    cfg = RunConfig.from_run_config({"lora.ranks": "2,4,8", "num-clients": 4, "strategy.name": "flexlora"})
    assert [cfg.for_partition(p).lora.r for p in range(4)] == [2, 4, 8, 2]
    assert cfg.for_server().lora.r == 8 and cfg.lora.heterogeneous(cfg)
    drawn = RunConfig.from_run_config({"lora.ranks": "2:0.5,16:0.5", "num-clients": 40})
    ranks = drawn.lora.all_ranks(40, drawn.seed)
    assert set(ranks) == {2, 16} and ranks == drawn.lora.all_ranks(40, drawn.seed)
    assert ranks != RunConfig.from_run_config({"lora.ranks": "2:0.5,16:0.5", "seed": 1}).lora.all_ranks(40, 1)


def test_a_merged_model_saves_and_loads_its_update(lora, tmp_path):
    from fedpeft.models import load_saved

    rng = np.random.default_rng(1)
    merged = {k: v for k, v in lora.initial_state.items() if k.startswith("classifier.")}
    for i, name in enumerate(lora.lora.modules):  # one module dense, the rest factored
        if i == 0:
            merged[name + ".base_delta.W"] = rng.normal(0, 0.01, (384, 384)).astype(np.float32)
        else:
            merged[name + BASE_A] = rng.normal(0, 0.05, (3, 384)).astype(np.float32)
            merged[name + BASE_B] = rng.normal(0, 0.05, (384, 3)).astype(np.float32)
    lora.load_exchange_state(merged)
    expected = logits(lora)
    cfg = RunConfig(device="cpu", lora=RunConfig().lora.__class__(r=4))
    lora.save(tmp_path / "saved", ("a", "b", "c"), cfg=cfg)
    again = load_saved(tmp_path / "saved")
    assert torch.allclose(logits(again), expected, atol=1e-5)
    lora.load_exchange_state(lora.initial_state)
