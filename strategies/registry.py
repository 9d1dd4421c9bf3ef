"""Strategy registry: a short name or any importable ``module:name``.

Built-in names map to Flower's own strategies (``flwr.serverapp.strategy``) and to the
LoRA-aware ones of this package; a user plugs in their own with ``strategy.name =
"mypkg.mymod:MyStrategy"`` without touching this package.  ``module:name`` may also be a
factory returning a Strategy, a plain ``aggregate(updates, weights)`` function or an
object/class with ``init``/``apply`` (see :mod:`strategies.functional`).

:func:`build_strategy` takes two kinds of keyword arguments: the app's *settings*
(sampling, ``lora_alpha``), offered to every strategy and left out where its
constructor does not take them, so a user class only declares what it needs;
and the user's ``strategy.kwargs`` (``"name=value,..."``), which are strict: a name the constructor does not
accept is an error naming the config key.  What the nodes announce at discovery (their
LoRA ranks) reaches a strategy later, through :class:`strategies.traits.UsesClientRanks`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
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

from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.functional import functional_factory
from strategies.hints import did_you_mean
from strategies.traits import StrategyTraits, declared_traits

StrategyFactory = Callable[..., Strategy]

# name -> (factory, citation).
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
    "ffa-lora": (
        FFALoRA,
        "Sun et al., ICLR 2024, Improving LoRA in Privacy-preserving Federated Learning",
    ),
    "flexlora": (
        FlexLoRA,
        "Bai et al., 2024, Federated Fine-tuning of Large Language Models under Heterogeneous "
        "Tasks and Client Resources",
    ),
    "flora": (
        FLoRA,
        "Wang et al., NeurIPS 2024, FLoRA: Federated Fine-Tuning Large Language Models with "
        "Heterogeneous Low-Rank Adaptations",
    ),
}
KWARGS_KEY = "strategy.kwargs"


def registered_traits(name: str) -> StrategyTraits | None:
    """The traits a registered strategy declares (None for a ``module:name`` or unknown name)."""
    entry = STRATEGIES.get(name)
    return None if entry is None else declared_traits(entry[0])


def names_with(trait: str) -> list[str]:
    """The registered strategies that declare boolean trait ``trait`` (sorted)."""
    return sorted(
        name for name, (factory, _) in STRATEGIES.items() if getattr(declared_traits(factory), trait)
    )


class StrategyError(ValueError):
    """The configured strategy cannot be found or built."""


def resolve_strategy(name: str) -> StrategyFactory:
    """The factory for a registered ``name`` or an importable ``module:name``."""
    if name in STRATEGIES:
        return STRATEGIES[name][0]
    if ":" not in name:
        raise StrategyError(
            f"config key 'strategy.name': unknown value {name!r}{did_you_mean(name, list(STRATEGIES))} "
            f"(valid: {', '.join(sorted(STRATEGIES))}, or an importable 'module:Class')"
        )
    module_name, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise StrategyError(f"config key 'strategy.name': cannot import {name!r}: {err}") from err
    return as_factory(obj, name)


def as_factory(obj: Any, label: str | None = None) -> StrategyFactory:
    """``obj`` as a strategy factory: a Strategy class or factory as it is; an aggregate
    function or init/apply object wrapped in a :class:`~strategies.functional.FunctionalStrategy`."""
    label = label or getattr(obj, "__qualname__", repr(obj))
    if isinstance(obj, type) and issubclass(obj, Strategy):
        return obj
    wrapped = functional_factory(obj)
    if wrapped is not None:
        return wrapped
    if not callable(obj):
        raise StrategyError(
            f"config key 'strategy.name': {label!r} is not a class or factory, an "
            "aggregate(updates, weights) function, or an object with init/apply"
        )
    return obj


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def _inherited_names(factory: Callable[..., Any]) -> set[str]:
    """Keyword names the ``__init__`` of any class in ``factory``'s MRO declares."""
    names: set[str] = set()
    for cls in getattr(factory, "__mro__", ()):
        init = cls.__dict__.get("__init__")
        if init is None or cls is object:
            continue
        try:
            names |= set(inspect.signature(init).parameters) - {"self", "args", "kwargs"}
        except (TypeError, ValueError):
            continue
    return names


def build_strategy(
    name: str | Callable[..., Any],
    *,
    user_kwargs: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Strategy:
    """Build the strategy ``name`` (registered name, ``module:name``, or the object itself).

    ``settings`` are offered by the app and left out where the constructor does not take
    them; ``user_kwargs`` (from ``strategy.kwargs``, names already python identifiers)
    must all be accepted, else :class:`StrategyError` names the config key and lists
    the accepted ones.  A constructor that rejects its values raises StrategyError too.
    """
    label = name if isinstance(name, str) else getattr(name, "__qualname__", repr(name))
    factory = resolve_strategy(name) if isinstance(name, str) else as_factory(name, label)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError) as err:
        raise StrategyError(f"config key 'strategy.name': cannot inspect {label!r}: {err}") from err
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {k for k, p in params.items() if p.kind in by_name}
    # A class whose __init__ forwards **kwargs to its base (``class S(FedAvg): def
    # __init__(self, x, **kwargs)``) gets the settings some class in its MRO names.
    # A plain factory function with **kwargs is offered everything, as before.
    offered = named
    if takes_kwargs:
        offered = named | _inherited_names(factory) if isinstance(factory, type) else set(settings)
    accepted = {k: v for k, v in settings.items() if k in offered}
    user = dict(user_kwargs or {})
    settable = sorted(_dashed(k) for k in named - set(settings))
    for key in sorted(user):
        config_key = KWARGS_KEY
        if not takes_kwargs and key not in named:
            raise StrategyError(
                f"config key '{config_key}': strategy {label!r} takes no setting "
                f"{_dashed(key)!r}{did_you_mean(_dashed(key), settable)} "
                f"(accepted: {', '.join(settable) or 'none'})"
            )
        if key in accepted:
            raise StrategyError(
                f"config key '{config_key}': {key!r} is set by the run itself (from the run "
                "config), not through strategy.kwargs"
            )
    try:
        strategy = factory(**accepted, **user)
    except StrategyError:
        raise
    except (TypeError, ValueError) as err:
        given = f" with strategy.kwargs {sorted(_dashed(k) for k in user)}" if user else ""
        raise StrategyError(f"config key 'strategy.name': cannot build {label!r}{given}: {err}") from err
    if not isinstance(strategy, Strategy):
        raise StrategyError(
            f"config key 'strategy.name': {label!r} built a {type(strategy).__name__}, "
            "not a flwr.serverapp.strategy.Strategy"
        )
    return strategy
