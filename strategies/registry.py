"""Strategy registry: a short name or any importable ``module:Class``.

Built-in names map to Flower's own strategies (``flwr.serverapp.strategy``); a user plugs
in their own with ``strategy.name = "mypkg.mymod:MyStrategy"`` without touching this
package.  Every strategy is built with the same sampling settings; keyword arguments a
class does not accept are left out, so a user class only declares what it needs.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

StrategyFactory = Callable[..., Strategy]

# name -> (factory, citation).  Later issues add the LoRA-aware strategies here.
STRATEGIES: dict[str, tuple[StrategyFactory, str]] = {
    "fedavg": (FedAvg, "McMahan et al., 2017, Communication-Efficient Learning of Deep Networks"),
    "fedavgm": (
        FedAvgM,
        "Hsu et al., 2019, Measuring the Effects of Non-Identical Data Distribution",
    ),
    "fedprox": (FedProx, "Li et al., 2020, Federated Optimization in Heterogeneous Networks"),
    "fedadam": (FedAdam, "Reddi et al., 2021, Adaptive Federated Optimization"),
    "fedyogi": (FedYogi, "Reddi et al., 2021, Adaptive Federated Optimization"),
    "fedadagrad": (FedAdagrad, "Reddi et al., 2021, Adaptive Federated Optimization"),
    "fedmedian": (FedMedian, "Yin et al., 2018, Byzantine-Robust Distributed Learning"),
    "fedtrimmedavg": (FedTrimmedAvg, "Yin et al., 2018, Byzantine-Robust Distributed Learning"),
    "krum": (Krum, "Blanchard et al., 2017, Machine Learning with Adversaries"),
}


class StrategyError(ValueError):
    """The configured strategy cannot be found or built."""


def resolve_strategy(name: str) -> StrategyFactory:
    """The factory for a registered ``name`` or an importable ``module:Class``."""
    if name in STRATEGIES:
        return STRATEGIES[name][0]
    if ":" not in name:
        import difflib

        close = difflib.get_close_matches(name, list(STRATEGIES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise StrategyError(
            f"config key 'strategy.name': unknown value {name!r}{hint} "
            f"(valid: {', '.join(sorted(STRATEGIES))}, or an importable 'module:Class')"
        )
    module_name, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise StrategyError(f"config key 'strategy.name': cannot import {name!r}: {err}") from err
    if not callable(obj):
        raise StrategyError(f"config key 'strategy.name': {name!r} is not a class or factory")
    return obj


def build_strategy(name: str, **settings: Any) -> Strategy:
    """Build the strategy ``name`` with the ``settings`` its constructor accepts."""
    factory = resolve_strategy(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError) as err:
        raise StrategyError(f"config key 'strategy.name': cannot inspect {name!r}: {err}") from err
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {k: v for k, v in settings.items() if takes_kwargs or k in params}
    strategy = factory(**accepted)
    if not isinstance(strategy, Strategy):
        raise StrategyError(
            f"config key 'strategy.name': {name!r} built a {type(strategy).__name__}, "
            "not a flwr.serverapp.strategy.Strategy"
        )
    return strategy
