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

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.lazy import lazy_exports

if TYPE_CHECKING:
    from fedpeft.server.discovery import (
        ClientDiscoveryError as ClientDiscoveryError,
    )
    from fedpeft.server.discovery import (
        Discovery as Discovery,
    )
    from fedpeft.server.discovery import (
        discover_clients as discover_clients,
    )
    from fedpeft.server.stack import (
        ServerState as ServerState,
    )
    from fedpeft.server.stack import (
        check_compatible as check_compatible,
    )
    from fedpeft.server.stack import (
        server_picks_cohort as server_picks_cohort,
    )
    from fedpeft.server.stack import (
        strategy_stack as strategy_stack,
    )

_WHERE = {
    "ClientDiscoveryError": ".discovery",
    "Discovery": ".discovery",
    "discover_clients": ".discovery",
    "ServerState": ".stack",
    "check_compatible": ".stack",
    "server_picks_cohort": ".stack",
    "strategy_stack": ".stack",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
