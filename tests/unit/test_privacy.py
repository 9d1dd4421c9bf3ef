"""Local DP-SGD (Opacus) on the cached model, the privacy ledger, and the budget cut-off."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from fedpeft import privacy
from fedpeft.apps import client_app as client_module
from fedpeft.apps.server_app import run_server
from fedpeft.config import ConfigError, DPConfig, RunConfig, TrainConfig
from fedpeft.models import build_model
from fedpeft.results import read_rounds
from fedpeft.tasks import get_task
from fedpeft.testing import DirectGrid
from tests.conftest import TINY

HISTORY = [(1.1, 0.05, 20), (0.8, 0.02, 35), (1.1, 0.05, 20), (2.0, 0.1, 7)]


@pytest.mark.parametrize(
    ("name", "cls", "history"),
    [
        ("rdp", RDPAccountant, HISTORY),
        ("prv", PRVAccountant, HISTORY),
        ("gdp", GaussianAccountant, [(1.1, 0.05, 20), (1.1, 0.05, 30)]),  # gdp needs constant noise and rate
    ],
)
def test_epsilon_equals_opacus_fed_step_by_step(name, cls, history):
    reference = cls()
    for noise, rate, steps in history:
        for _ in range(steps):
            reference.step(noise_multiplier=noise, sample_rate=rate)
    assert privacy.epsilon(history, 1e-5, name) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


def test_gdp_refuses_a_history_it_cannot_account():
    with pytest.raises(privacy.PrivacyError, match="gdp"):
        privacy.epsilon(HISTORY, 1e-5, "gdp")


def test_ledger_round_trips_through_a_config_record_and_composes():
    ledger = privacy.Ledger()
    for h in HISTORY:
        ledger.add(*h)
    again = privacy.Ledger.from_record(ledger.to_record())
    assert again.history == ledger.history
    plan = privacy.RoundPlan(1.0, 0.1, 10)
    assert again.projected(plan, 1e-5) == pytest.approx(privacy.epsilon([*HISTORY, (1.0, 0.1, 10)], 1e-5))
    assert privacy.Ledger().epsilon(1e-5) == 0.0


def test_target_epsilon_is_spent_by_exactly_the_planned_rounds():
    dp = DPConfig(mode="local", target_epsilon=3.0)
    plan = privacy.plan_round(dp, TrainConfig(batch_size=16), num_examples=180, num_rounds=5)
    assert plan.sample_rate == pytest.approx(16 / 180) and plan.steps == math.ceil(180 / 16)
    spent = privacy.epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)] * 5, dp.delta)
    assert spent == pytest.approx(3.0, abs=0.05)


@pytest.fixture(scope="module")
def lora():
    cfg = RunConfig.from_run_config(TINY | {"dp.mode": "local"})
    task = get_task(cfg)
    return cfg, build_model(cfg, task.num_outputs(cfg)), task.client_train_set(cfg, 0, 3)


def test_private_training_moves_the_adapter_and_can_repeat_on_the_cached_model(lora):
    cfg, model, data = lora
    plan = privacy.RoundPlan(1.0, 0.2, 3)
    names = [n for n, _ in model.module.named_parameters()]
    for seed in range(3):  # the same module is wrapped and unwrapped again: no "hooks twice"
        before = model.exchange_state()
        result = privacy.train_private(model, data, cfg.train, plan, cfg.dp, seed)
        after = model.exchange_state()
        assert result.steps == 3
        assert all(not np.array_equal(before[k], after[k]) for k in before)  # every exchanged tensor moved
    assert [n for n, _ in model.module.named_parameters()] == names  # no "_module." prefixes
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.module.parameters())


def test_fedprox_under_dp_pulls_towards_the_global_tensors(lora):
    cfg, model, data = lora
    init = model.exchange_state()
    plan = privacy.RoundPlan(0.5, 0.2, 4)

    def distance(mu: float) -> float:
        model.load_exchange_state(init)
        privacy.train_private(model, data, cfg.train, plan, cfg.dp, seed=3, proximal_mu=mu)
        after = model.exchange_state()
        return float(sum(np.sum((after[k] - init[k]) ** 2) for k in init))

    # Same seed, same batches and noise: only the proximal term differs.
    assert 0.0 < distance(1e4) < distance(0.0)
    model.load_exchange_state(init)


def test_guards_name_the_tensor(lora):
    _, model, _ = lora
    optimizer = torch.optim.SGD(list(model.params.values())[:-1], lr=0.1)
    with pytest.raises(privacy.PrivacyError, match="classifier.weight"):
        privacy._check_optimizer(model, optimizer)
    for p in model.params.values():
        p.grad_sample = torch.zeros((4, *p.shape))
    with pytest.raises(privacy.PrivacyError, match="batch 4, not 8"):
        privacy._check_grad_samples(model, 8)
    for p in model.params.values():
        p.grad_sample = None
    with pytest.raises(privacy.PrivacyError, match="no per-sample gradient"):
        privacy._check_grad_samples(model, 8)
    before = {k: p.detach().clone() for k, p in model.params.items()}
    with pytest.raises(privacy.PrivacyError, match="no trainable tensor changed"):
        privacy._check_moved(model, before)


def _run(tmp_path, **extra):
    cfg = RunConfig.from_run_config(TINY | extra | {"results-dir": str(tmp_path), "run-name": "dp"})
    grid = DirectGrid(client_module.app, 3, cfg.to_run_config())
    return read_rounds(run_server(grid, cfg)), grid


def test_budget_cut_off_sits_clients_out_and_records_it(tmp_path):
    # Each round of these clients costs eps ~3.7, then ~4.5 after two: a budget of 4.8
    # allows two rounds and refuses the third.
    rounds, grid = _run(tmp_path, **{"dp.mode": "local", "dp.epsilon-budget": 4.8, "num-rounds": 3})
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3, 0]
    third = rounds[3]["clients"]
    assert len(third) == 3 and all(c["error"].startswith("sat out: epsilon would reach") for c in third)
    assert all(c["bytes_down"] == 0 for c in third)
    assert rounds[3]["max_epsilon"] == rounds[2]["max_epsilon"] <= 4.8
    # the clients' own ledgers agree with the server's mirror
    for context in grid.contexts.values():
        ledger = privacy.Ledger.from_record(context.state.config_records["fedpeft.dp.ledger"])
        assert len(ledger.history) == 2
        eps = ledger.epsilon(1e-5)
        assert eps == pytest.approx(
            rounds[2]["epsilon_by_partition"][str(context.node_config["partition-id"])]
        )


def test_reported_epsilon_matches_an_independent_accountant(tmp_path):
    rounds, _ = _run(tmp_path, **{"dp.mode": "local"})
    c = rounds[2]["clients"][0]["metrics"]
    reference = RDPAccountant()
    for _ in range(2 * int(c["dp-steps"])):
        reference.step(noise_multiplier=c["dp-noise-multiplier"], sample_rate=c["dp-sample-rate"])
    assert c["dp-epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5))


@pytest.mark.parametrize(
    ("side", "clipping"), [("server", "fixed"), ("client", "fixed"), ("server", "adaptive")]
)
def test_central_dp_runs_and_accounts(tmp_path, side, clipping):
    extra = {
        "dp.mode": "central",
        "dp.central-side": side,
        "dp.central-clipping": clipping,
        "dp.central-noise-multiplier": 0.1 if clipping == "adaptive" else 1.0,
    }
    rounds, _ = _run(tmp_path, **extra)
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3]
    assert rounds[1]["central_epsilon"] < rounds[2]["central_epsilon"] and rounds[2]["max_epsilon"] is None
    assert all(math.isfinite(r["loss"]) for r in rounds)


def test_impossible_central_settings_fail_before_training():
    from fedpeft.launch import preflight

    cfg = RunConfig.from_run_config(TINY | {"dp.mode": "central", "dp.central-clipping": "adaptive"})
    with pytest.raises(ConfigError, match="dp.central"):
        preflight(cfg)


def test_full_fine_tuning_under_dp_gets_per_example_embedding_gradients():
    # BERT looks position / token-type embeddings up with a (1, L) buffer: without explicit
    # (B, L) ids Opacus would see a batch of 1 there, and the guard refuses to train.
    cfg = RunConfig.from_run_config(TINY | {"dp.mode": "local", "peft.method": "full"})
    task = get_task(cfg)
    model = build_model(cfg, task.num_outputs(cfg))
    data = task.client_train_set(cfg, 0, 3)
    inputs = privacy._per_example_inputs(
        data.input_ids[:4], data.attention_mask[:4], privacy._forward_params(model)
    )
    assert inputs["position_ids"].shape == inputs["input_ids"].shape
    model.module.eval()
    with torch.no_grad():
        plain = model.module(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        assert torch.equal(plain, model.module(**inputs).logits)  # the forward pass is unchanged
    result = privacy.train_private(model, data, cfg.train, privacy.RoundPlan(1.0, 0.2, 2), cfg.dp, 0)
    assert result.steps == 2
