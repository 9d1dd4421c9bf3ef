"""Adding a strategy is one module and one registry line: the toy strategy gets the
conformance suite, its declared traits are honoured, the discovery protocol hands it the
ranks, and what it returns from aggregation lands in every round record."""

from __future__ import annotations

import pytest

from strategies import STRATEGIES
from strategies.conformance import Traits, run_conformance
from strategies.traits import UsesClientRanks, traits_of
from tests.unit.codecs.test_composition import small_run
from tests.unit.strategies.toy_strategy import RankedFedAvg


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(STRATEGIES, "toy-ranked", (RankedFedAvg, "fedpeft tests"))  # the registry line


def test_toy_strategy_passes_the_conformance_suite(toy_registered):
    outcomes = run_conformance("toy-ranked")
    assert outcomes and all(o.status in ("pass", "skip") for o in outcomes), outcomes
    assert {o.status for o in outcomes} >= {"pass"}


def test_toy_strategy_declares_its_traits_and_protocols(toy_registered):
    strategy = RankedFedAvg()
    assert isinstance(strategy, UsesClientRanks)
    assert not traits_of(strategy).heterogeneous_ranks
    assert Traits.of(strategy) == Traits(kind="mean", weighted=True)


def test_toy_strategy_runs_and_its_metrics_are_recorded(toy_registered, tmp_path):
    cfg, rounds = small_run(
        tmp_path, {"codec.name": "none", "codec.downlink": "same", "strategy.name": "toy-ranked"}
    )
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3]
    for r in rounds[1:]:
        assert r["strategy_metrics"]["train.toy-known-ranks"] == 3.0  # handed over at discovery
        assert r["strategy_metrics"]["train.toy-rank-sum"] == 3 * cfg.lora.r
    assert rounds[0]["strategy_metrics"] == {}
    csv_header = (tmp_path / "small" / "rounds.csv").read_text().splitlines()[0]
    assert csv_header.endswith("strategy_metrics")


def test_declared_traits_pickle_with_the_strategy(toy_registered):
    import pickle

    from strategies import build_strategy

    strategy = build_strategy("toy-ranked")
    assert traits_of(pickle.loads(pickle.dumps(strategy))) == traits_of(strategy)


def test_the_old_duck_typed_declarations_are_refused_with_the_new_form():
    from flwr.serverapp.strategy import FedAvg

    from strategies.traits import declared_traits

    class Old(FedAvg):
        supports_heterogeneous_ranks = True

    with pytest.raises(TypeError, match="StrategyTraits"):
        declared_traits(Old())
