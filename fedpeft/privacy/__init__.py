"""Differential privacy on the clients: the accounting, and DP-SGD training with Opacus.

* :mod:`fedpeft.privacy.accounting` -- pure maths: what a round costs
  (:class:`RoundPlan`, :func:`plan_round`), what a history of rounds spent
  (:func:`epsilon`, :class:`Ledger`, :class:`UserLevel` for user-level DP).
* :mod:`fedpeft.privacy.dpsgd` -- :func:`train_private`, sample-level DP-SGD with Opacus.

The only package that imports Opacus.
"""

from fedpeft.privacy.accounting import (
    DP_EPSILON,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS,
    History,
    Ledger,
    PrivacyError,
    RoundPlan,
    UserLevel,
    epsilon,
    plan_round,
)
from fedpeft.privacy.dpsgd import train_private

__all__ = [
    "DP_EPSILON",
    "DP_NOISE_MULTIPLIER",
    "DP_SAMPLE_RATE",
    "DP_STEPS",
    "History",
    "Ledger",
    "PrivacyError",
    "RoundPlan",
    "UserLevel",
    "epsilon",
    "plan_round",
    "train_private",
]
