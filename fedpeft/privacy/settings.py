"""The privacy section (``dp.*``): sample-level DP-SGD on the clients, user-level DP on the server.

Light (no Opacus): the run config imports it to know every key.  The central mechanism is
a name in :data:`fedpeft.privacy.mechanisms.CENTRAL_MECHANISMS`, and that entry states
what it needs of the rest of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedpeft.privacy.mechanisms import CENTRAL_MECHANISMS
from fedpeft.settings import ConfigError, Section, choices, from_registry, value_range


@dataclass(frozen=True)
class DPConfig(Section, section="dp"):
    """Differential privacy: sample-level DP-SGD on clients (Opacus) and/or user-level central DP.

    ``local``: every client trains with DP-SGD (Abadi et al., 2016) and keeps a privacy
    ledger; ``central``: Flower's clipping + noising wrappers (McMahan et al., 2018;
    Andrew et al., 2021 for adaptive clipping); ``both``.
    """

    mode: str = field(default="off", metadata=choices("off", "local", "central", "both"))
    # Local DP-SGD noise multiplier; ignored when target-epsilon > 0.
    noise_multiplier: float = field(default=1.0, metadata=value_range(0.0))
    # > 0: choose each client's noise so that all num-rounds rounds spend this epsilon.
    target_epsilon: float = field(default=0.0, metadata=value_range(0.0))
    # Per-sample gradient clipping norm of local DP-SGD.
    max_grad_norm: float = field(default=1.0, metadata=value_range(0.0, lo_open=True))
    delta: float = field(default=1e-5, metadata=value_range(0.0, 1.0, lo_open=True))
    accountant: str = field(default="rdp", metadata=choices("rdp", "prv", "gdp"))
    # > 0: a client whose epsilon would pass this in the next round sits it out (recorded).
    epsilon_budget: float = field(default=0.0, metadata=value_range(0.0))
    # Local DP-SGD: how Opacus gets each example's gradient.  "hooks" (default) and
    # "functorch" materialise every per-sample gradient (memory: batch x trainable params);
    # "ghost" (ghost clipping, Li et al., 2022) computes only their norms and clips through
    # a second backward pass (less memory for wide layers, more compute).  Not every PEFT
    # method runs in every mode: a bad pair is refused naming the modes that work.
    grad_sample_mode: str = field(default="hooks", metadata=choices("hooks", "functorch", "ghost"))
    # Local DP-SGD: > 0 splits each logical batch (Poisson, expected size train.batch-size)
    # into physical batches of at most this many examples (Opacus' BatchMemoryManager):
    # large logical batches in bounded memory; steps, noise and accounting stay logical.
    max_physical_batch_size: int = field(default=0, metadata=value_range(0))
    # Central DP: clipping of each client's update on the server or on the client.
    central_side: str = field(default="server", metadata=choices("server", "client"))
    central_clipping: str = field(default="fixed", metadata=choices("fixed", "adaptive"))
    central_noise_multiplier: float = field(default=1.0, metadata=value_range(0.0))
    # Fixed clipping norm, or the initial one for adaptive clipping.
    central_clipping_norm: float = field(default=1.0, metadata=value_range(0.0, lo_open=True))
    # > 0: choose the central noise multiplier so that num-rounds releases spend this
    # user-level epsilon (under the bound of the run's sampling and mechanism).
    central_target_epsilon: float = field(default=0.0, metadata=value_range(0.0))
    # How the noise is released: "gaussian" (DP-FedAvg, noise on every round's aggregate) or
    # "tree" (DP-FTRL, Kairouz et al., 2021: noisy prefix sums by tree aggregation, no
    # sampling amplification needed).  A registered mechanism (fedpeft.privacy.mechanisms).
    central_mechanism: str = field(default="gaussian", metadata=from_registry(CENTRAL_MECHANISMS))
    # DP-FTRL: rounds per tree before it restarts from the current model (0: one tree for
    # the whole run); every client takes part at most once per tree.
    tree_restart_rounds: int = field(default=0, metadata=value_range(0))

    def per_example(self) -> bool:
        """Whether clients train with sample-level DP-SGD (each example's gradient clipped)."""
        return self.mode in ("local", "both")

    def user_level(self) -> bool:
        """Whether the server releases the aggregate under user-level (central) DP."""
        return self.mode in ("central", "both")

    def check_run(self, run: Any) -> None:
        if not self.user_level() and (
            self.central_target_epsilon > 0 or self.central_mechanism != "gaussian"
        ):
            raise ConfigError(
                "config keys 'dp.central-target-epsilon' / 'dp.central-mechanism' need dp.mode = 'central' "
                f"or 'both', not {self.mode!r}"
            )
        if self.user_level():
            CENTRAL_MECHANISMS[self.central_mechanism].check(run)  # what the mechanism needs of the run
