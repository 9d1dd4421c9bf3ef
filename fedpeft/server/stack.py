"""The strategy stack: the configured strategy inside this project's wrappers, and the
state the server checkpoints.

Order, innermost first (one function, :func:`strategy_stack`, decides it):

1. the strategy itself (registry name, ``module:Name``, functional);
   :class:`~fedpeft.server.sampling.PoissonSampling` around it (``client-sampling =
   "poisson"``) picks each round's cohort;
2. the user-level DP mechanism (``dp.mode`` central / both,
   :mod:`fedpeft.server.user_dp`): clips decoded dense updates, so it sits inside the codec;
3. :class:`~fedpeft.server.guard.UpdateGuard`: drops broken updates (NaN, wrong names or
   shapes, norms past the bound) before DP or the strategy sees them;
4. :class:`~fedpeft.server.step.ServerStep` (``[server]``: learning rate, momentum, a
   scale searched on validation data): the server's step, for coded and dense runs alike;
5. :class:`~fedpeft.server.transport.CompressedTransport` (a codec is set); it also
   averages sparse payloads over the clients that sent each coordinate, no longer than
   their mean update (``server.aggregate = "bounded"``), before the strategy sees them;
6. :class:`~fedpeft.server.budget.PrivacyBudget` (local DP): it sees every reply, also
   one the codec then rejects;
7. :class:`~fedpeft.server.tap.StrategyMetricsTap`: outermost, keeps what the stack
   returns from aggregation for the round record.

The byte meter is not a strategy wrapper: it wraps the Grid
(:class:`~fedpeft.server.meter.MeteredGrid`), outside everything, so it counts what
crosses the wire after the codec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flwr.serverapp.strategy import Strategy

from fedpeft.codecs.registry import build_codec
from fedpeft.config import RunConfig
from fedpeft.privacy import RoundPlan
from fedpeft.privacy.mechanisms import central_dp, mechanism_of
from fedpeft.server.budget import PrivacyBudget
from fedpeft.server.guard import UpdateGuard
from fedpeft.server.rejections import RejectionLog
from fedpeft.server.sampling import PoissonSampling
from fedpeft.server.step import ServerStep
from fedpeft.server.tap import StrategyMetricsTap
from fedpeft.server.transport import CompressedTransport
from fedpeft.settings import ConfigError
from strategies import build_strategy
from strategies.traits import hand_client_ranks, traits_of
from strategies.wrapper import wrapper_chain


@dataclass
class ServerState:
    """The strategy stack and the objects it shares with the app; checkpointed as one."""

    strategy: StrategyMetricsTap  # the outermost layer
    budget: PrivacyBudget | None
    rejections: RejectionLog

    @classmethod
    def fresh(cls, cfg: RunConfig) -> ServerState:
        rejections = RejectionLog()
        strategy, budget = strategy_stack(cfg, rejections)
        return cls(StrategyMetricsTap(strategy), budget, rejections)

    def hand_discovery(self, ranks: Mapping[int, int], plans: Mapping[int, RoundPlan]) -> None:
        """What the nodes announced at discovery, to the layers that need it (this engine's
        node ids: on a resume, after the restart)."""
        hand_client_ranks(self.strategy, ranks)
        if self.budget is not None:
            self.budget.set_plans(plans)

    def server_step(self) -> ServerStep | None:
        """The stack's server step (``[server]``), if any."""
        return next((s for s in wrapper_chain(self.strategy) if isinstance(s, ServerStep)), None)


def server_picks_cohort(cfg: RunConfig) -> bool:
    """Whether a wrapper, not the strategy, picks each round's clients (Poisson sampling,
    DP-FTRL's once-per-tree cohorts): the strategy then takes every node it is shown."""
    mechanism = mechanism_of(cfg)
    return cfg.client_sampling == "poisson" or (mechanism is not None and mechanism.picks_cohort)


def strategy_stack(cfg: RunConfig, rejections: RejectionLog) -> tuple[Strategy, PrivacyBudget | None]:
    """The configured strategy inside its wrappers (order: the module docstring, up to the
    budget; :class:`ServerState` adds the tap), and the privacy budget among them (None
    without local DP)."""
    picks = server_picks_cohort(cfg)
    strategy = build_strategy(
        cfg.strategy.name,
        user_kwargs=cfg.strategy.kwarg_dict(),
        fraction_train=1.0 if picks else cfg.fraction_train,
        min_train_nodes=1 if picks else cfg.min_train_clients,
        min_available_nodes=1 if picks else cfg.num_clients,
        fraction_evaluate=cfg.fraction_evaluate,
        min_evaluate_nodes=1,
        lora_alpha=cfg.lora.alpha,
    )
    check_compatible(cfg, strategy)
    if cfg.client_sampling == "poisson":
        strategy = PoissonSampling(strategy, cfg.fraction_train, cfg.seed)
    if cfg.dp.mode in ("central", "both"):
        strategy = central_dp(strategy, cfg)
    strategy = UpdateGuard(strategy, rejections, cfg.strategy.max_update_norm, cfg.min_replies)
    if not cfg.server.plain():
        server = cfg.server
        strategy = ServerStep(strategy, server.learning_rate, server.momentum, server.search_candidates())
    if cfg.codec.active():
        strategy = CompressedTransport(strategy, cfg.codec, rejections, aggregate=cfg.server.aggregate)
    budget = None
    if cfg.dp.mode in ("local", "both"):
        strategy = budget = PrivacyBudget(strategy, cfg.dp, rejections)
    return strategy, budget


def check_compatible(cfg: RunConfig, strategy: Strategy) -> None:
    """Refuse combinations the strategy cannot serve (by its declared traits), before
    anything starts."""
    name = cfg.strategy.name
    traits = traits_of(strategy)
    if cfg.lora.heterogeneous(cfg) and not traits.heterogeneous_ranks:
        raise ConfigError(
            f"config key 'lora.ranks' gives clients different ranks, which strategy {name!r} cannot "
            "aggregate (shapes differ); use strategy.name = 'flexlora' or 'flora'"
        )
    if cfg.dp.mode in ("central", "both") and cfg.server.aggregate != "all" and sparse_uplink(cfg):
        # Dividing a coordinate by the clients that sent it makes each client's weight depend
        # on the others' payloads: one client more or less changes every other contribution,
        # so the clipped sum's sensitivity is no longer the clipping norm.
        raise ConfigError(
            f"config key 'server.aggregate' = {cfg.server.aggregate!r} weighs each client by the others' payloads, "
            "which central DP's sensitivity bound does not allow; set server.aggregate = 'all'"
        )
    if traits.rewrites_arrays:
        # The codec and Flower's central-DP wrappers compute updates as reply - what was sent,
        # which needs the same tensors both ways; these strategies change the layout per node.
        if cfg.codec.active():
            raise ConfigError(
                f"strategy {name!r} sends per-node / merged LoRA layouts, which the codec does not "
                "handle yet; set codec.name = 'none' and codec.downlink = 'none'"
            )
        if cfg.dp.mode in ("central", "both"):
            raise ConfigError(
                f"strategy {name!r} changes the tensor layout between rounds, which Flower's central "
                "DP wrappers cannot clip; use dp.mode = 'local'"
            )


def sparse_uplink(cfg: RunConfig) -> bool:
    """Whether the uplink codec sends a subset of the coordinates (top-k, ComPEFT)."""
    codec = build_codec(cfg.codec.name, cfg.codec.density, cfg.codec.settings())
    return bool(getattr(codec, "sparse", False))
