"""The server's sections: its step (``server.*``) and the aggregation strategy (``strategy.*``).

Light (no Flower): the run config imports it to know every key.  What a strategy entails
for the other sections (FFA-LoRA freezes LoRA's A) is a trait the strategy declares
(:class:`strategies.traits.StrategyTraits`), read here when the section is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedpeft.settings import ConfigError, ConfigValue, Section, choices, toml_value, value_range


@dataclass(frozen=True)
class ServerConfig(Section, section="server"):
    """The server's step, for every run, coded or dense (:mod:`fedpeft.server.step`).

    The aggregate the strategy returns becomes the update ``u_t = aggregate - global``;
    the server then steps ``global += scale_t * learning-rate * v_t`` with
    ``v_t = momentum * v_{t-1} + u_t`` (server momentum: FedAvgM, Hsu et al. 2019).  These
    are settings of the aggregation, not of a codec, so dense LoRA gets the same help as a
    compressed run (the frontier compares them at equal footing).
    """

    # How a sparse update's coordinates are averaged (fedpeft.server.transport.over_senders):
    # "senders" divides each coordinate by the (example-weighted) clients whose payload
    # carried it; "bounded" (the default, data-free) does the same, then shortens the mean to
    # the clients' mean update length when it is longer; "all" divides by every client, as
    # FedAvg does with the zeros a top-k codec leaves.  All three are the same for a dense
    # codec (every client sends every coordinate, and a dense mean is never longer than the
    # mean length), so a dense run gets the same server setting by construction.  Chosen on
    # BBC News (benchmarks/results/frontier_ablation_bbc-news.md).
    aggregate: str = field(default="bounded", metadata=choices("bounded", "senders", "all"))
    learning_rate: float = field(default=1.0, metadata=value_range(0.0, lo_open=True))
    momentum: float = field(default=0.0, metadata=value_range(0.0, 0.999))
    # Scales of the step tried each round on the server's validation split (needs labelled
    # data on the server: data.validation-examples); the lowest validation loss wins and is
    # recorded as step_scale.  "" = no search (scale 1): the default, which needs no data.
    step_search: tuple[str, ...] = ()

    def _check(self) -> None:
        self.search_candidates()  # raises on a malformed list

    def search_candidates(self) -> tuple[float, ...]:
        """The step scales of server.step-search, as numbers (empty: no search)."""
        try:
            values = tuple(float(v) for v in self.step_search)
        except ValueError:
            raise ConfigError(
                f"config key 'server.step-search': cannot read {','.join(self.step_search)!r}; "
                "give positive numbers, comma-separated ('1,2,4,8')"
            ) from None
        if any(not (v > 0 and math.isfinite(v)) for v in values):
            raise ConfigError("config key 'server.step-search': every candidate must be a positive number")
        return values

    def tunes(self) -> bool:
        """Whether the server tunes anything on a validation split (server.step-search)."""
        return bool(self.step_search)

    def plain(self) -> bool:
        """Whether the step is the aggregate itself (no scaling, momentum or search)."""
        return self.learning_rate == 1.0 and self.momentum == 0.0 and not self.step_search


@dataclass(frozen=True)
class StrategyConfig(Section, section="strategy"):
    """Server aggregation: a registered name or an importable ``module:Class``.

    ``kwargs`` holds the strategy's own settings as ``name=value`` pairs, comma-separated
    (``strategy.kwargs = "proximal-mu=0.01"`` reaches the constructor as
    ``proximal_mu=0.01``); values are read as TOML scalars (numbers, true/false, else
    text).  One string key, because Flower refuses run-config keys that ``pyproject.toml``
    does not declare.  Which names a strategy accepts is checked when it is built, before
    the run starts.
    """

    name: str = "fedavg"
    kwargs: tuple[str, ...] = ()
    # > 0: a client update (reply - what it was sent) with a larger L2 norm is rejected
    # before aggregation and recorded; NaN / Inf, wrong names or shapes always are.
    max_update_norm: float = field(default=0.0, metadata=value_range(0.0))

    def _check(self) -> None:
        parse_kwargs(self.kwargs)  # raises on a malformed pair

    def implies(self) -> dict[str, dict[str, Any]]:
        # What the chosen strategy declares it entails (FFA-LoRA: A frozen).  A false that
        # the pyproject defaults wrote cannot be told apart from one a user wrote, so a
        # strategy's implication is applied over it rather than vetoed by it.
        from strategies.registry import registered_traits  # Flower: loaded when read

        traits = registered_traits(self.name)
        return {} if traits is None else {k: dict(v) for k, v in traits.implies.items()}

    def kwarg_dict(self) -> dict[str, ConfigValue]:
        """The settings as constructor keyword arguments (dashes become underscores)."""
        return parse_kwargs(self.kwargs)


def parse_kwargs(items: tuple[str, ...]) -> dict[str, ConfigValue]:
    """``("proximal-mu=0.01", "name=x")`` -> ``{"proximal_mu": 0.01, "name": "x"}``."""
    out: dict[str, ConfigValue] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.replace("-", "_").isidentifier():
            raise ConfigError(
                f"config key 'strategy.kwargs': cannot read {item!r}; give name=value pairs, "
                "comma-separated (e.g. 'proximal-mu=0.01,server-learning-rate=0.5')"
            )
        out[key.replace("-", "_")] = _scalar(raw.strip())
    return out


def _scalar(raw: str) -> ConfigValue:
    value = toml_value(raw)
    return value if isinstance(value, (bool, int, float, str)) else raw
