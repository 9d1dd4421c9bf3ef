import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy

from strategies import STRATEGIES, StrategyError, build_strategy, resolve_strategy

SETTINGS = {
    "fraction_train": 0.5,
    "min_train_nodes": 2,
    "min_available_nodes": 4,
    "fraction_evaluate": 0.0,
    "min_evaluate_nodes": 1,
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_registered_strategy_builds_with_the_common_settings(name):
    strategy = build_strategy(name, **SETTINGS)
    assert isinstance(strategy, Strategy)


def test_settings_reach_the_strategy():
    s = build_strategy("fedavg", **SETTINGS)
    assert isinstance(s, FedAvg) and s.fraction_train == 0.5 and s.min_available_nodes == 4


def test_an_importable_path_is_a_strategy_too():
    assert resolve_strategy("flwr.serverapp.strategy:FedAdam") is FedAdam
    assert isinstance(build_strategy("tests.unit.test_strategies_registry:Tiny", **SETTINGS), Tiny)


class Tiny(FedAvg):
    """A user strategy that only declares one of the settings it is offered."""

    def __init__(self, min_available_nodes: int = 2):
        super().__init__(min_available_nodes=min_available_nodes)


def test_bad_names_are_clear():
    with pytest.raises(StrategyError, match="did you mean 'fedavg'"):
        resolve_strategy("fedavgg")
    with pytest.raises(StrategyError, match="cannot import"):
        resolve_strategy("nosuchmodule:Thing")
    with pytest.raises(StrategyError, match="not a flwr.serverapp.strategy.Strategy"):
        build_strategy("fedpeft.config:RunConfig")
