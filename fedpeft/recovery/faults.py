"""Injected client failures: FedPEFT's "client stability" axis, reproducibly.

With ``failures.*-probability`` set, every sampled client draws once per round -- from
(seed, round, partition) only, so the same clients fail in a rerun -- and then:

* **raise**: the ClientApp raises before training; Flower turns that into an error reply,
  recorded with its reason;
* **hang**: the client is stuck past ``round-timeout`` and never trains that round; its
  (empty) reply comes too late and the server records "no reply before the round timeout";
* **drop**: the client trains, then crashes before replying: its reply never arrives in
  time, and nothing it did that round persists (its ``Context.state`` -- error-feedback
  residual, privacy ledger -- is as before the round; the server never saw the update,
  so neither is charged for it).

Neither changes a client's state, which is what makes them reproducible on Flower's
engine too: there the late call really runs on past the round, and a state change that
landed after the server's checkpoint of that round would make a resumed run differ.

The server aggregates what did arrive; with fewer than ``min-replies`` the round leaves
the global model as it was.  Implemented as a Flower client mod, outside every other mod.

Staying away is real time on Flower's engines (the client sleeps; the server's round
timeout decides) and *simulated* time on the in-process engine (:func:`simulated_time`):
there clients run one after another, so a wall-clock timeout would make the outcome
depend on how busy the machine is.  A reply misses the round there exactly when the
delays injected into it exceed ``round-timeout``, whatever the load.

Crashes of the whole run (SIGKILL at chosen moments) are :mod:`fedpeft.recovery.crash`'s.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpeft.config import RunConfig
from fedpeft.wire import CONFIG_KEY

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
# A hanging or dropped client stays away this much longer than the round timeout.
LATE_BY_SECONDS = 1.0


class InjectedFailure(RuntimeError):
    """The failure a client was told to have (``failures.raise-probability``)."""


def draw(cfg: RunConfig, server_round: int, partition_id: int) -> str:
    """What client ``partition_id`` does in ``server_round``: "ok", "raise", "hang" or "drop"."""
    f = cfg.failures
    u = random.Random(f"fedpeft-failure-{cfg.seed}-{server_round}-{partition_id}").random()
    for kind, p in (
        ("raise", f.raise_probability),
        ("hang", f.hang_probability),
        ("drop", f.drop_probability),
    ):
        if u < p:
            return kind
        u -= p
    return "ok"


def failure_mod(get_cfg: Callable[[Context], RunConfig]) -> Mod:
    """A client mod for train messages that injects the configured failures."""

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        cfg = get_cfg(context)
        if not cfg.failures.active():
            return call_next(msg, context)
        config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
        kind = draw(cfg, server_round, int(context.node_config["partition-id"]))
        if kind == "raise":
            raise InjectedFailure(f"injected failure: client raised in round {server_round}")
        if kind == "hang":
            stay_away(cfg.round_timeout + LATE_BY_SECONDS)
            return Message(RecordDict(), reply_to=msg)  # too late to matter: never aggregated
        before = copy.deepcopy(context.state) if kind == "drop" else None
        reply = call_next(msg, context)
        if before is not None:
            stay_away(cfg.round_timeout + LATE_BY_SECONDS)
            context.state = before  # crashed before replying: this round's state is lost
        return reply

    return mod


# ---------------------------------------------------------------------- simulated time
class SimulatedClock:
    """Seconds a client has been told to stay away during one call (nothing really waits)."""

    def __init__(self) -> None:
        self.elapsed = 0.0

    def sleep(self, seconds: float) -> None:
        self.elapsed += seconds


_CLOCK: ContextVar[SimulatedClock | None] = ContextVar("fedpeft_simulated_clock", default=None)


@contextlib.contextmanager
def simulated_time() -> Iterator[SimulatedClock]:
    """Within this block, :func:`stay_away` advances the returned clock instead of sleeping."""
    clock = SimulatedClock()
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


def stay_away(seconds: float) -> None:
    """Be late by ``seconds``: real sleep, or simulated time inside :func:`simulated_time`."""
    clock = _CLOCK.get()
    if clock is None:
        time.sleep(seconds)
    else:
        clock.sleep(seconds)
