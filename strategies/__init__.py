"""Aggregation strategies for fedpeft: a registry over Flower's and our own.

Importable on its own: this package knows Flower's strategy API and NumPy, nothing of
fedpeft's apps.  ``python -m strategies.conformance module:Name`` checks a strategy
against the properties the built-in ones hold (see :mod:`strategies.conformance`).
"""

from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.functional import FunctionalStrategy
from strategies.registry import STRATEGIES, StrategyError, as_factory, build_strategy, resolve_strategy

__all__ = [
    "STRATEGIES",
    "FFALoRA",
    "FLoRA",
    "FlexLoRA",
    "FunctionalStrategy",
    "StrategyError",
    "as_factory",
    "build_strategy",
    "resolve_strategy",
]
