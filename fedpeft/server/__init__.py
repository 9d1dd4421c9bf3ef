"""The server wing: everything between the ServerApp and the aggregation strategy.

* :mod:`~fedpeft.server.stack` -- :func:`strategy_stack` (the one place that orders the
  wrappers), :func:`check_compatible`, :class:`ServerState` (what the checkpoint keeps);
* the wrappers, one per module: :mod:`~fedpeft.server.guard` (update guard),
  :mod:`~fedpeft.server.alpha` (server step tuned on validation data),
  :mod:`~fedpeft.server.transport` (codec), :mod:`~fedpeft.server.budget` (privacy
  budget), :mod:`~fedpeft.server.user_dp` (user-level DP: the mechanism registry,
  DP-FedAvg) with :mod:`~fedpeft.server.ftrl` (DP-FTRL), :mod:`~fedpeft.server.sampling`
  (Poisson client sampling), :mod:`~fedpeft.server.tap` (strategy metrics),
  :mod:`~fedpeft.server.resume` (round offset, node renaming);
* :mod:`~fedpeft.server.discovery` (round 0), :mod:`~fedpeft.server.meter` (exact bytes,
  a Grid wrapper), :mod:`~fedpeft.server.recorder` (one record per round),
  :mod:`~fedpeft.server.figures`, :mod:`~fedpeft.server.rejections`.

The apps call into this package; the core (models, data, codecs, privacy, training)
never imports it, and it never imports the apps.
"""

from fedpeft.server.discovery import ClientDiscoveryError, Discovery, discover_clients
from fedpeft.server.stack import ServerState, check_compatible, server_picks_cohort, strategy_stack

__all__ = [
    "ClientDiscoveryError",
    "Discovery",
    "ServerState",
    "check_compatible",
    "discover_clients",
    "server_picks_cohort",
    "strategy_stack",
]
