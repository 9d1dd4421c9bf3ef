"""The registry of user-level (central) DP mechanisms: ``dp.central-mechanism``.

Each entry says where its builder is (``"module:function"``, loaded when first built, as
the task registry does: the run config reads this registry for its choices without
loading Flower), what it needs of the rest of the run (``check``, phrased in the traits
the other features declare), and whether it picks each round's clients itself.

* ``gaussian`` -- DP-FedAvg (McMahan et al., 2018), :func:`fedpeft.server.user_dp.gaussian_mechanism`;
* ``tree`` -- DP-FTRL (Kairouz et al., 2021), :func:`fedpeft.server.user_dp.tree_mechanism`.

A new mechanism is one module with its builder and one :func:`register_mechanism` line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedpeft.settings import ConfigError, unknown_choice

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from fedpeft.config import RunConfig

Builder = Callable[["Strategy", "RunConfig"], "Strategy"]


def _no_check(run: RunConfig) -> None:
    """A mechanism that runs with any sampling, clipping and strategy."""


@dataclass(frozen=True)
class CentralMechanism:
    """A registered mechanism: its builder (``inner strategy, run config -> wrapped``)."""

    build: str | Builder  # "module:function", or the function itself
    description: str
    # It chooses each round's clients itself (the strategy then takes every node shown).
    picks_cohort: bool = False
    # Raises ConfigError naming the key when the run cannot use it.
    check: Callable[[RunConfig], None] = _no_check

    def builder(self) -> Builder:
        if callable(self.build):
            return self.build
        module, _, name = self.build.partition(":")
        found: Builder = getattr(importlib.import_module(module), name)
        return found


def _tree_needs(run: RunConfig) -> None:
    """DP-FTRL picks its cohorts (each client once per tree), clips on the server with a
    fixed norm, and sets the server update itself: the strategy must be a plain mean."""
    from strategies.registry import names_with, registered_traits  # Flower: loaded when checked

    dp = run.dp
    if run.client_sampling != "fixed":
        raise ConfigError(
            "config key 'dp.central-mechanism' = 'tree' (DP-FTRL) picks each round's clients itself "
            "(each at most once per tree); set client-sampling = 'fixed'"
        )
    if (dp.central_side, dp.central_clipping) != ("server", "fixed"):
        raise ConfigError(
            "config key 'dp.central-mechanism' = 'tree' clips on the server with a fixed norm; set "
            "dp.central-side = 'server' and dp.central-clipping = 'fixed'"
        )
    traits = registered_traits(run.strategy.name)
    if traits is None or not traits.plain_mean:
        plain = " or ".join(repr(name) for name in names_with("plain_mean"))
        raise ConfigError(
            "config key 'dp.central-mechanism' = 'tree' sets the server update itself (the noisy "
            f"prefix sum of the mean clipped updates); use strategy.name = {plain}, not {run.strategy.name!r}"
        )
    cohort = run.fixed_cohort()
    per_tree = dp.tree_restart_rounds or run.num_rounds
    if cohort * per_tree > run.num_clients:
        raise ConfigError(
            f"config key 'dp.tree-restart-rounds': a tree of {per_tree} rounds x {cohort} clients per round "
            f"needs {cohort * per_tree} distinct clients (each takes part once per tree), but num-clients is "
            f"{run.num_clients}; restart the tree every {max(1, run.num_clients // cohort)} rounds or fewer"
        )


#: ``dp.central-mechanism`` name -> its :class:`CentralMechanism`.
CENTRAL_MECHANISMS: dict[str, CentralMechanism] = {
    "gaussian": CentralMechanism(
        "fedpeft.server.user_dp:gaussian_mechanism",
        "DP-FedAvg: clipped updates, Gaussian noise on every round's aggregate (McMahan et al., 2018)",
    ),
    "tree": CentralMechanism(
        "fedpeft.server.user_dp:tree_mechanism",
        "DP-FTRL: noisy prefix sums by tree aggregation, no sampling needed (Kairouz et al., 2021)",
        picks_cohort=True,
        check=_tree_needs,
    ),
}


def register_mechanism(name: str, mechanism: CentralMechanism) -> None:
    """Add a mechanism under ``name`` (refuses a name already taken)."""
    if name in CENTRAL_MECHANISMS:
        raise ValueError(f"central DP mechanism {name!r} is already registered")
    CENTRAL_MECHANISMS[name] = mechanism


def mechanism_of(run: RunConfig) -> CentralMechanism | None:
    """The run's user-level DP mechanism (None without central DP)."""
    if not run.dp.user_level():
        return None
    try:
        return CENTRAL_MECHANISMS[run.dp.central_mechanism]
    except KeyError:
        raise unknown_choice("dp.central-mechanism", run.dp.central_mechanism, CENTRAL_MECHANISMS) from None


def central_dp(inner: Any, run: RunConfig) -> Any:
    """``inner`` wrapped in the run's user-level DP mechanism."""
    mechanism = mechanism_of(run)
    assert mechanism is not None, "central_dp needs dp.mode central or both"
    return mechanism.builder()(inner, run)
