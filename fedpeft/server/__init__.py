"""The server wing: everything between the ServerApp and the aggregation strategy.

* :mod:`~fedpeft.server.stack` -- :func:`strategy_stack` (the one place that orders the
  wrappers), :func:`check_compatible`, :class:`ServerState` (what the checkpoint keeps);
* the wrappers, one per module: :mod:`~fedpeft.server.guard` (update guard),
  :mod:`~fedpeft.server.alpha` (server step tuned on validation data),
  :mod:`~fedpeft.server.transport` (codec), :mod:`~fedpeft.server.budget` (privacy
  budget, Flower's central DP), :mod:`~fedpeft.server.tap` (strategy metrics),
  :mod:`~fedpeft.server.resume` (round offset, node renaming);
* :mod:`~fedpeft.server.discovery` (round 0), :mod:`~fedpeft.server.meter` (exact bytes,
  a Grid wrapper), :mod:`~fedpeft.server.recorder` (one record per round),
  :mod:`~fedpeft.server.figures`, :mod:`~fedpeft.server.rejections`.

The apps call into this package; the core (models, data, codecs, privacy, training)
never imports it, and it never imports the apps.
"""

from fedpeft.server.discovery import ClientDiscoveryError, Discovery, discover_clients
from fedpeft.server.stack import ServerState, check_compatible, sampled_per_round, strategy_stack

__all__ = [
    "ClientDiscoveryError",
    "Discovery",
    "ServerState",
    "check_compatible",
    "discover_clients",
    "sampled_per_round",
    "strategy_stack",
]
