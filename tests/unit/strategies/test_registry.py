import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy

from strategies import STRATEGIES, StrategyError, build_strategy, resolve_strategy
from strategies.traits import hand_client_ranks

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
    assert isinstance(build_strategy("tests.unit.strategies.test_registry:Tiny", **SETTINGS), Tiny)


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


def test_lora_strategies_are_registered_with_citations():
    for name in ("ffa-lora", "flexlora", "flora"):
        _factory, citation = STRATEGIES[name]
        assert isinstance(build_strategy(name, **SETTINGS), Strategy) and "20" in citation


def test_app_settings_reach_only_the_strategies_that_take_them():
    ranks = {5: 2}
    flex = build_strategy("flexlora", **SETTINGS, lora_alpha=8.0)
    hand_client_ranks(flex, ranks)  # what the server wing does after discovery
    assert flex.lora_alpha == 8.0 and flex.client_ranks == ranks
    assert isinstance(build_strategy("fedavg", **SETTINGS, lora_alpha=8.0), FedAvg)


def test_user_kwargs_reach_the_constructor():
    s = build_strategy("fedadam", user_kwargs={"eta": 0.5, "beta_1": 0.8}, **SETTINGS)
    assert s.eta == 0.5 and s.beta_1 == 0.8


def test_unknown_user_kwarg_names_the_config_key_and_suggests():
    with pytest.raises(StrategyError) as err:
        build_strategy("fedprox", user_kwargs={"proximal_nu": 0.1}, **SETTINGS)
    msg = str(err.value)
    assert "'strategy.kwargs'" in msg and "'proximal-nu'" in msg and "did you mean 'proximal-mu'" in msg
    assert "accepted:" in msg and "weighted-by-key" in msg and "fraction-train" not in msg


def test_user_kwarg_cannot_override_what_the_run_sets():
    with pytest.raises(StrategyError, match=r"strategy\.kwargs.*'fraction_train' is set by the run"):
        build_strategy("fedavg", user_kwargs={"fraction_train": 0.1}, **SETTINGS)


def test_bad_user_values_become_strategy_errors():
    with pytest.raises(StrategyError, match=r"cannot build 'fedtrimmedavg' with strategy.kwargs \['beta'\]"):
        build_strategy("fedtrimmedavg", user_kwargs={"beta": 0.7}, **SETTINGS)
    with pytest.raises(StrategyError, match="lora_alpha must be > 0"):
        build_strategy("flora", **SETTINGS, lora_alpha=0.0)


def test_a_class_taking_var_kwargs_accepts_any_user_kwarg():
    class Loose(FedAvg):
        def __init__(self, **kwargs):
            self.extra = kwargs.pop("extra", None)
            super().__init__(**kwargs)

    assert build_strategy(Loose, user_kwargs={"extra": 3}, min_available_nodes=2).extra == 3


class ForwardsKwargs(FedAvg):
    """A user class that forwards **kwargs to FedAvg: it gets FedAvg's settings, not lora_alpha."""

    def __init__(self, max_norm: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.max_norm = max_norm


def test_a_class_forwarding_kwargs_gets_only_what_its_bases_take():
    s = build_strategy(
        ForwardsKwargs, user_kwargs={"max_norm": 0.5}, lora_alpha=16.0, client_ranks={}, **SETTINGS
    )
    assert isinstance(s, ForwardsKwargs) and s.max_norm == 0.5 and s.fraction_train == 0.5
