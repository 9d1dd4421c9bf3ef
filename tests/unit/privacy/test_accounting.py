"""The privacy accounting: epsilon against Opacus' accountants, the ledger, the round plan."""

import math

import pytest
from flwr.app import ConfigRecord
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from fedpeft.privacy import accounting
from fedpeft.privacy.settings import DPConfig
from fedpeft.tasks.settings import TrainConfig

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
    assert accounting.epsilon(history, 1e-5, name) == pytest.approx(
        reference.get_epsilon(delta=1e-5), rel=1e-9
    )


def test_gdp_refuses_a_history_it_cannot_account():
    with pytest.raises(accounting.PrivacyError, match="gdp"):
        accounting.epsilon(HISTORY, 1e-5, "gdp")


def test_ledger_round_trips_through_a_config_record_and_composes():
    ledger = accounting.Ledger()
    for h in HISTORY:
        ledger.add(*h)
    again = accounting.Ledger.from_columns(ConfigRecord(ledger.to_columns()))
    assert again.history == ledger.history
    plan = accounting.RoundPlan(1.0, 0.1, 10)
    assert again.projected(plan, 1e-5) == pytest.approx(accounting.epsilon([*HISTORY, (1.0, 0.1, 10)], 1e-5))
    assert accounting.Ledger().epsilon(1e-5) == 0.0


def test_round_plan_round_trips_through_the_reported_metrics():
    plan = accounting.RoundPlan(1.1, 0.05, 20)
    assert accounting.RoundPlan.from_metrics(plan.to_metrics() | {accounting.DP_EPSILON: 2.0}) == plan
    assert accounting.RoundPlan.from_metrics({"num-examples": 10}) is None  # no local DP


def test_target_epsilon_is_spent_by_exactly_the_planned_rounds():
    dp = DPConfig(mode="local", target_epsilon=3.0)
    plan = accounting.plan_round(dp, TrainConfig(batch_size=16), num_examples=180, num_rounds=5)
    assert plan.sample_rate == pytest.approx(16 / 180) and plan.steps == math.ceil(180 / 16)
    spent = accounting.epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)] * 5, dp.delta)
    assert spent == pytest.approx(3.0, abs=0.05)
