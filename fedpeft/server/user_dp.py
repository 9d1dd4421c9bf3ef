"""User-level (central) differential privacy on the server: the built-in mechanisms, and
what their accountant is told.

``dp.central-mechanism`` names an entry of :data:`fedpeft.privacy.mechanisms.CENTRAL_MECHANISMS`;
the built-in ones point here, each building a wrapper around the strategy that clips
every client's update and releases the noisy aggregate:

* ``gaussian`` -- DP-FedAvg (McMahan et al., 2018) through Flower's own wrappers (fixed or
  adaptive clipping, on the server or the client), with the fixed-denominator estimator
  (:class:`FixedDenominator`) that the sampled Gaussian mechanism's bound assumes;
* ``tree`` -- DP-FTRL (Kairouz et al., 2021): :class:`~fedpeft.server.ftrl.TreeAggregation`.

:func:`user_level` says which bound applies to the run (its sampling and mechanism, see
:class:`fedpeft.privacy.UserLevel`); :func:`central_noise` resolves
``dp.central-target-epsilon`` into a noise multiplier through that same accountant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedpeft.privacy.accounting import UserLevel
from fedpeft.server.ftrl import TreeAggregation
from fedpeft.settings import ConfigError
from strategies.wrapper import StrategyWrapper

if TYPE_CHECKING:
    from fedpeft.config import RunConfig


def cohort_size(cfg: RunConfig) -> float:
    """Clients per round: exact for fixed-size sampling, expected for Poisson."""
    if cfg.client_sampling == "poisson":
        return cfg.fraction_train * cfg.num_clients
    return float(cfg.fixed_cohort())


def denominator(cfg: RunConfig) -> int:
    """The fixed denominator of the private mean: the (expected) cohort, rounded.  Any
    fixed value keeps the guarantee (the noise is scaled by the same number); the expected
    cohort makes the estimate unbiased."""
    return max(1, round(cohort_size(cfg)))


def user_level(cfg: RunConfig) -> UserLevel:
    """The user-level bound that applies to this run's sampling and mechanism."""
    return UserLevel(
        mechanism=cfg.dp.central_mechanism,
        sampling=cfg.client_sampling,
        population=cfg.num_clients,
        cohort=cohort_size(cfg),
        restart_rounds=cfg.dp.tree_restart_rounds or cfg.num_rounds,
    )


def central_noise(cfg: RunConfig) -> float:
    """The central noise multiplier: ``dp.central-noise-multiplier``, or the one at which
    ``num-rounds`` releases spend ``dp.central-target-epsilon``."""
    dp = cfg.dp
    if dp.central_target_epsilon <= 0:
        return dp.central_noise_multiplier
    return user_level(cfg).noise_for(dp.central_target_epsilon, cfg.num_rounds, dp.delta, dp.accountant)


def central_epsilon(cfg: RunConfig) -> Callable[[int], float]:
    """rounds -> user-level epsilon after that many rounds of this run (every configured
    round counts, also one whose Poisson cohort was empty).  The noise (a bisection when
    ``dp.central-target-epsilon`` is set) is resolved once, here, not per round."""
    level, noise = user_level(cfg), central_noise(cfg)
    return lambda rounds: level.epsilon(noise, rounds, cfg.dp.delta, cfg.dp.accountant)


class FixedDenominator(StrategyWrapper):
    """Turn the strategy's mean over the replies into the sum of updates over a fixed
    denominator, with every client weighted equally.

    The sampled Gaussian mechanism bounds one user's influence on ``sum / D`` by ``C / D``
    (C the clipping norm), which holds only if ``D`` does not depend on who was sampled
    and no client weighs more than another; FedAvg's mean weighted by example counts over
    a Poisson cohort meets neither.  So each reply's weight (the strategy's
    ``weighted_by_key``, where it has one) is set to 1, and the strategy's mean update is
    rescaled by (replies / D).  Sits just inside Flower's DP wrapper, so it sees clipped
    updates and the wrapper adds its noise (scaled by the same ``D``) afterwards.
    """

    def __init__(self, inner: Strategy, denominator: int) -> None:
        super().__init__(inner)
        self.denominator = denominator
        self.sent = ArrayRecord()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        key = getattr(self.inner, "weighted_by_key", None)
        usable = 0
        for reply in replies:
            if reply.has_error():
                continue
            usable += 1
            if key is not None:
                for record in reply.content.metric_records.values():
                    if key in record:
                        record[key] = 1
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None or usable == self.denominator:
            return arrays, metrics
        scale = usable / self.denominator
        out = {}
        for name, array in arrays.items():
            before = self.sent[name].numpy()
            out[name] = Array(np.asarray(before + (array.numpy() - before) * scale, dtype=before.dtype))
        return ArrayRecord(out), metrics


def gaussian_mechanism(inner: Strategy, cfg: RunConfig) -> Strategy:
    """DP-FedAvg through Flower's wrapper for ``dp.central-side`` / ``dp.central-clipping``."""
    dp = cfg.dp
    side = {
        ("server", "fixed"): DifferentialPrivacyServerSideFixedClipping,
        ("client", "fixed"): DifferentialPrivacyClientSideFixedClipping,
        ("server", "adaptive"): DifferentialPrivacyServerSideAdaptiveClipping,
        ("client", "adaptive"): DifferentialPrivacyClientSideAdaptiveClipping,
    }[(dp.central_side, dp.central_clipping)]
    d = denominator(cfg)
    noise = central_noise(cfg)
    inner = FixedDenominator(inner, d)
    try:
        if dp.central_clipping == "fixed":
            return side(inner, noise, dp.central_clipping_norm, d)
        return side(inner, noise, d, initial_clipping_norm=dp.central_clipping_norm)
    except ValueError as err:  # Flower checks the noise against the cohort size
        raise ConfigError(
            f"config keys 'dp.central-*' ({dp.central_clipping} clipping, {d} clients per round): {err}"
        ) from err


def tree_mechanism(inner: Strategy, cfg: RunConfig) -> Strategy:
    """DP-FTRL: noisy prefix sums by tree aggregation (:class:`TreeAggregation`)."""
    return TreeAggregation(
        inner,
        noise_multiplier=central_noise(cfg),
        clipping_norm=cfg.dp.central_clipping_norm,
        cohort=denominator(cfg),
        restart_rounds=cfg.dp.tree_restart_rounds or cfg.num_rounds,
        seed=cfg.seed,
    )
