"""Aggregation strategies for fedpeft: a registry over Flower's and our own.

Importable on its own: this package knows Flower's strategy API and NumPy, nothing of
fedpeft's apps.
"""

from strategies.registry import STRATEGIES, StrategyError, build_strategy, resolve_strategy

__all__ = ["STRATEGIES", "StrategyError", "build_strategy", "resolve_strategy"]
