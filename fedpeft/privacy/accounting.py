"""Privacy accounting: what a private round costs, and the epsilon a history of rounds spent.

Pure maths over (noise multiplier, sample rate, steps) triples, through Opacus'
accountants (RDP, PRV, GDP): no model, no training loop, no Flower.  The client keeps its
:class:`Ledger` in ``Context.state`` (as :meth:`Ledger.to_columns`), the server mirrors it
from the DP figures in the replies (:meth:`RoundPlan.from_metrics`), and both compute
epsilon the same way, from the history alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from fedpeft.privacy.settings import DPConfig
from fedpeft.tasks.settings import TrainConfig

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps) per round

# The DP figures a client reports (at discovery and after each private round).
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_STEPS = "dp-steps"
DP_EPSILON = "dp-epsilon"  # epsilon spent by the client so far


class PrivacyError(RuntimeError):
    """DP-SGD would not protect (or not train) what it claims to; the message says which tensor."""


@dataclass(frozen=True)
class RoundPlan:
    """What one private round of a client costs: the inputs of the accountant."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def to_metrics(self) -> dict[str, float | int]:
        """The plan as the metrics a client reports, so the server can keep the budget."""
        return {
            DP_NOISE_MULTIPLIER: self.noise_multiplier,
            DP_SAMPLE_RATE: self.sample_rate,
            DP_STEPS: self.steps,
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> RoundPlan | None:
        """The plan a client reported in ``metrics``; None where it reported none (no local DP)."""
        if DP_STEPS not in metrics:
            return None
        noise, rate, steps = (metrics[k] for k in (DP_NOISE_MULTIPLIER, DP_SAMPLE_RATE, DP_STEPS))
        if not all(isinstance(v, (int, float)) for v in (noise, rate, steps)):
            return None
        return cls(float(noise), float(rate), int(steps))


def _accountant(name: str) -> Any:
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


def epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by ``history`` under ``accountant`` (0 for an empty history)."""
    if not history:
        return 0.0
    if accountant == "gdp" and len({(s, q) for s, q, _ in history}) > 1:
        raise PrivacyError(
            "the gdp accountant needs one noise multiplier and sample rate for all rounds; use rdp or prv"
        )
    # Rounds with the same noise and rate compose as one run of their summed steps (how
    # Opacus' accountants record steps; the gdp accountant reads only that form).
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(n)
    acc = _accountant(accountant)
    acc.history = [(s, q, n) for (s, q), n in merged.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@dataclass
class Ledger:
    """One client's privacy history, saved in its ``Context.state`` between rounds.

    A thin stateful wrapper over the accountant maths (like Opacus' accountants): the
    history is the whole state, so epsilon is recomputed from it, never carried.
    """

    history: History = field(default_factory=list)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        return epsilon(self.history, delta, accountant)

    def projected(self, plan: RoundPlan, delta: float, accountant: str = "rdp") -> float:
        """Epsilon after one more round costing ``plan``."""
        return epsilon(
            [*self.history, (plan.noise_multiplier, plan.sample_rate, plan.steps)], delta, accountant
        )

    def to_columns(self) -> dict[str, list[float] | list[int]]:
        """The history as three columns (the content of a ``ConfigRecord``)."""
        return {
            "noise": [h[0] for h in self.history],
            "rate": [h[1] for h in self.history],
            "steps": [h[2] for h in self.history],
        }

    @classmethod
    def from_columns(cls, columns: Mapping[str, Any] | None) -> Ledger:
        """The ledger saved by :meth:`to_columns` (a ``ConfigRecord`` is such a mapping); None: empty."""
        if columns is None:
            return cls()
        values = [columns[k] for k in ("noise", "rate", "steps")]
        if not all(isinstance(c, list) for c in values):
            raise PrivacyError("the privacy ledger in this client's state is damaged")
        noise, rate, steps = (cast(list[float], c) for c in values)
        return cls([(float(a), float(b), int(c)) for a, b, c in zip(noise, rate, steps, strict=True)])


def plan_round(cfg: DPConfig, train: TrainConfig, num_examples: int, num_rounds: int) -> RoundPlan:
    """Noise, Poisson sample rate and step count of one local round of this client.

    With ``target-epsilon`` the noise is chosen (Opacus' ``get_noise_multiplier``) so that
    taking part in all ``num_rounds`` rounds spends exactly that budget.
    """
    n = max(num_examples, 1)
    q = min(1.0, train.batch_size / n)
    steps = train.local_epochs * max(1, math.ceil(1 / q))
    if train.max_steps:
        steps = min(steps, train.max_steps)
    noise = cfg.noise_multiplier
    if cfg.target_epsilon > 0:
        from opacus.accountants.utils import get_noise_multiplier

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            noise = float(
                get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon,
                    target_delta=cfg.delta,
                    sample_rate=q,
                    steps=steps * num_rounds,
                    accountant=cfg.accountant,
                )
            )
    return RoundPlan(noise, q, steps)


# ----------------------------------------------------------------------- user-level (central) DP
@dataclass(frozen=True)
class UserLevel:
    """What the user-level accountant needs besides the noise: how clients are sampled and
    how the noise is released.

    Which bound applies (the README's table):

    * ``mechanism="gaussian"``, ``sampling="poisson"``: each client joins a round with
      probability ``cohort / population``; the sampled Gaussian mechanism with that rate
      (add/remove-one-user adjacency), through Opacus' RDP / PRV / GDP accountant -- the
      bound of DP-FedAvg (McMahan et al., 2018), with the fixed-denominator estimator.
    * ``mechanism="gaussian"``, ``sampling="fixed"``, every client every round: the Gaussian
      mechanism composed over rounds (add/remove; no amplification, none to claim).
    * ``mechanism="gaussian"``, ``sampling="fixed"``, ``cohort < population``: sampling
      without replacement (Wang, Balle & Kasiviswanathan, 2019) through Google's
      ``dp-accounting`` RDP accountant.  That bound holds for replace-one adjacency (the
      population size is public), under which one user moves the clipped sum by up to twice
      the clipping norm, so the accountant is fed half the noise multiplier: conservative.
    * ``mechanism="tree"`` (DP-FTRL, Kairouz et al., 2021): tree aggregation, each client at
      most once per tree of ``restart_rounds`` rounds; ``dp-accounting``'s tree RDP
      (replace-with-zero adjacency, its ``REPLACE_SPECIAL``), composed over the trees started.
      No sampling amplification is claimed.
    """

    mechanism: str = "gaussian"
    sampling: str = "fixed"
    population: int = 1
    cohort: float = 1.0  # clients per round: exact (fixed) or expected (poisson)
    restart_rounds: int = 0  # tree: rounds per tree (0: one tree for the whole run)

    @property
    def rate(self) -> float:
        return min(1.0, self.cohort / self.population)

    def history(self, noise: float, rounds: int) -> History:
        """The Opacus-style (noise, rate, steps) history of ``rounds`` Poisson releases."""
        return [(noise, self.rate, rounds)] if rounds else []

    def epsilon(self, noise: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
        """Epsilon of ``rounds`` releases at ``noise`` (0 for none; inf without noise)."""
        if rounds <= 0:
            return 0.0
        if noise <= 0:
            return float("inf")
        if self.mechanism == "tree":
            return _tree_epsilon(noise, self.restart_rounds or rounds, rounds, delta)
        if self.sampling == "poisson" or self.cohort >= self.population:
            return epsilon(self.history(noise, rounds), delta, accountant)
        return _without_replacement_epsilon(noise, self.population, int(self.cohort), rounds, delta)

    def noise_for(self, target_epsilon: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
        """The smallest noise multiplier (to 0.1%) at which ``rounds`` releases spend at most
        ``target_epsilon``: bisection on this class's own accountant, so every mechanism and
        sampling is calibrated the way it is reported."""
        lo, hi = 1e-3, 1.0
        while self.epsilon(hi, rounds, delta, accountant) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise PrivacyError(
                    f"no noise multiplier reaches epsilon {target_epsilon:g} in {rounds} rounds"
                )
        while hi / lo > 1.001:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if self.epsilon(mid, rounds, delta, accountant) > target_epsilon else (lo, mid)
        return hi


def _dp_accounting_epsilon(event: Any, relation: str, delta: float) -> float:
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=getattr(NeighboringRelation, relation))
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _without_replacement_epsilon(
    noise: float, population: int, cohort: int, rounds: int, delta: float
) -> float:
    from dp_accounting import GaussianDpEvent, SampledWithoutReplacementDpEvent, SelfComposedDpEvent

    # Replace-one: one user moves the clipped sum by up to 2C, so the effective noise is halved.
    round_event = SampledWithoutReplacementDpEvent(population, cohort, GaussianDpEvent(noise / 2))
    return _dp_accounting_epsilon(SelfComposedDpEvent(round_event, rounds), "REPLACE_ONE", delta)


def _tree_epsilon(noise: float, restart_rounds: int, rounds: int, delta: float) -> float:
    from dp_accounting import SelfComposedDpEvent, SingleEpochTreeAggregationDpEvent

    trees = math.ceil(rounds / restart_rounds)  # a client takes part at most once in each
    tree = SingleEpochTreeAggregationDpEvent(noise, restart_rounds)
    return _dp_accounting_epsilon(SelfComposedDpEvent(tree, trees), "REPLACE_SPECIAL", delta)
