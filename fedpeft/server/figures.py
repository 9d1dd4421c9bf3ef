"""Per-round fields of the round record that come from the strategy stack.

Each is a function ``round -> {field: value}`` (None when it does not apply); the
recorder merges them into the :class:`~fedpeft.results.records.RoundRecord` of every round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.server.budget import PrivacyBudget
from fedpeft.server.step import ServerStep
from fedpeft.server.tap import StrategyMetricsTap
from fedpeft.server.user_dp import central_epsilon

Figures = Callable[[int], dict[str, Any]]


def round_figures(*parts: Figures | None) -> Figures | None:
    """Several per-round figure functions as one (None when there are none)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    return lambda server_round: {k: v for p in present for k, v in p(server_round).items()}


def privacy_figures(
    cfg: RunConfig, budget: PrivacyBudget | None, partition_of: dict[int, int]
) -> Figures | None:
    """Per-round privacy fields (None when DP is off)."""
    if cfg.dp.mode == "off":
        return None
    central = central_epsilon(cfg) if cfg.dp.mode in ("central", "both") else None

    def figures(server_round: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if budget is not None:
            eps = {str(partition_of.get(n, n)): e for n, e in sorted(budget.epsilons().items())}
            out["epsilon_by_partition"] = eps
            out["max_epsilon"] = max(eps.values(), default=0.0)
        if central is not None:
            out["central_epsilon"] = central(server_round)
        return out

    return figures


def step_figures(step: ServerStep | None) -> Figures | None:
    """The step scale chosen on validation data in each round (None without server.step-search)."""
    if step is None or not step.searches:
        return None
    return lambda server_round: (
        {"step_scale": step.chosen[server_round]} if server_round in step.chosen else {}
    )


def strategy_figures(tap: StrategyMetricsTap) -> Figures:
    """What the strategy stack returned from aggregation this round (``strategy_metrics``)."""
    return lambda server_round: {"strategy_metrics": tap.take(server_round)}
