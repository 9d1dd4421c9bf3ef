"""The strategies that forward **fedavg_kwargs still show (and check) FedAvg's settings by name."""

import inspect

import pytest
from flwr.serverapp.strategy import FedAvg

from strategies import FlexLoRA, FLoRA, FunctionalStrategy, StrategyError, build_strategy
from strategies.fedavg_kwargs import FedAvgKwargs, fedavg_parameters


def _fedavg_defaults():
    return {p.name: p.default for p in list(inspect.signature(FedAvg).parameters.values())}


def test_the_typed_settings_are_fedavgs():
    assert set(FedAvgKwargs.__annotations__) == set(_fedavg_defaults())


@pytest.mark.parametrize("cls", [FlexLoRA, FLoRA, FunctionalStrategy])
def test_the_signature_lists_fedavgs_settings_with_its_defaults(cls):
    params = inspect.signature(cls).parameters
    for name, default in _fedavg_defaults().items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == default
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert [p.name for p in fedavg_parameters()] == list(_fedavg_defaults())


def test_settings_reach_fedavg_and_unknown_kwargs_are_still_named():
    s = FlexLoRA(fraction_train=0.5, min_available_nodes=4, lora_alpha=8.0)
    assert s.fraction_train == 0.5 and s.min_available_nodes == 4 and s.min_train_nodes == 2
    with pytest.raises(StrategyError, match=r"'lora-alpah'.*did you mean 'lora-alpha'"):
        build_strategy("flora", user_kwargs={"lora_alpah": 2.0}, fraction_train=1.0)
