"""Differential privacy on the clients: the accounting, and DP-SGD training with Opacus.

* :mod:`fedpeft.privacy.accounting` -- pure maths: what a round costs
  (:class:`RoundPlan`, :func:`plan_round`), what a history of rounds spent
  (:func:`epsilon`, :class:`Ledger`, :class:`UserLevel` for user-level DP).
* :mod:`fedpeft.privacy.dpsgd` -- :func:`train_private`, sample-level DP-SGD with Opacus.

The only package that imports Opacus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.lazy import lazy_exports

if TYPE_CHECKING:
    from fedpeft.privacy.accounting import (
        DP_EPSILON as DP_EPSILON,
    )
    from fedpeft.privacy.accounting import (
        DP_NOISE_MULTIPLIER as DP_NOISE_MULTIPLIER,
    )
    from fedpeft.privacy.accounting import (
        DP_SAMPLE_RATE as DP_SAMPLE_RATE,
    )
    from fedpeft.privacy.accounting import (
        DP_STEPS as DP_STEPS,
    )
    from fedpeft.privacy.accounting import (
        History as History,
    )
    from fedpeft.privacy.accounting import (
        Ledger as Ledger,
    )
    from fedpeft.privacy.accounting import (
        PrivacyError as PrivacyError,
    )
    from fedpeft.privacy.accounting import (
        RoundPlan as RoundPlan,
    )
    from fedpeft.privacy.accounting import (
        UserLevel as UserLevel,
    )
    from fedpeft.privacy.accounting import (
        epsilon as epsilon,
    )
    from fedpeft.privacy.accounting import (
        plan_round as plan_round,
    )
    from fedpeft.privacy.dpsgd import (
        train_private as train_private,
    )

_WHERE = {
    "DP_EPSILON": ".accounting",
    "DP_NOISE_MULTIPLIER": ".accounting",
    "DP_SAMPLE_RATE": ".accounting",
    "DP_STEPS": ".accounting",
    "History": ".accounting",
    "Ledger": ".accounting",
    "PrivacyError": ".accounting",
    "RoundPlan": ".accounting",
    "UserLevel": ".accounting",
    "epsilon": ".accounting",
    "plan_round": ".accounting",
    "train_private": ".dpsgd",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
