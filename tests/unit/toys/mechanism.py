"""A user-level DP mechanism: DP-FedAvg through Flower's own server-side wrapper alone.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips each update and adds Gaussian
noise to the mean over the clients that replied (no fixed denominator, unlike the built-in
``gaussian``).  The registry line is ``register_mechanism("toy-flower-dp", MECHANISM)``;
its rule asks the strategy registry for a trait, never for a name.
"""

from __future__ import annotations

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from fedpeft.config import RunConfig
from fedpeft.privacy.mechanisms import CentralMechanism
from fedpeft.settings import ConfigError
from strategies.registry import names_with, registered_traits


def build(inner: Strategy, cfg: RunConfig) -> Strategy:
    return DifferentialPrivacyServerSideFixedClipping(
        inner,
        noise_multiplier=cfg.dp.central_noise_multiplier,
        clipping_norm=cfg.dp.central_clipping_norm,
        num_sampled_clients=cfg.fixed_cohort(),
    )


def needs(cfg: RunConfig) -> None:
    traits = registered_traits(cfg.strategy.name)
    if traits is None or not traits.plain_mean:
        raise ConfigError(
            "config key 'dp.central-mechanism' = 'toy-flower-dp' noises a plain mean; use strategy.name = "
            f"{' or '.join(map(repr, names_with('plain_mean')))}, not {cfg.strategy.name!r}"
        )


MECHANISM = CentralMechanism(build, "DP-FedAvg through Flower's server-side wrapper", check=needs)
