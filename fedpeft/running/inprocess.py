"""The in-process engine: the real ServerApp logic and ClientApp in one process, without Ray.

:func:`run_inprocess` is ``fedpeft run --engine inprocess`` (the Ray-backed engine of
:mod:`fedpeft.running.launch` is the default).  Its grid, ``DirectGrid``, delivers each
message straight to a ``ClientApp`` in this process, with one persistent ``Context`` per
node (as Flower's simulation engine keeps them).  Tests and strategy authors use it to run
whole federations in seconds.

It is deterministic by construction, so a run, its rerun and its resumption after a
crash agree to the byte:

* node ids are 64-bit numbers like Flower's (a message's size includes them as varints),
  drawn from the run seed instead of at random, so the same seed gives the same ids;
* clients run one after another, and the round timeout counts only the delays injected
  into a client (:func:`fedpeft.recovery.faults.simulated_time`), never how long the CPU took.
"""

from __future__ import annotations

import contextlib
import copy
import random
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.config import ConfigValue, RunConfig
from fedpeft.flower_compat import (
    CLIENT_APP_RAISED_EXCEPTION,
    NODE_ID_NUM_BYTES,
    SUPERLINK_NODE_ID,
    Run,
    empty_run,
    set_message_id,
    set_task_identity,
    task_run_id,
)
from fedpeft.recovery.faults import simulated_time
from fedpeft.runtime import derive_seed
from strategies.grid import MessageGrid

if TYPE_CHECKING:
    from fedpeft.apps.server_app import ServerRun


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch threads (None: leave them), then restore."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seeded_node_ids(seed: int, count: int) -> list[int]:
    """``count`` distinct node ids of Flower's width (uint64, never 0 or the SuperLink's), from ``seed``."""
    return _seeded_uint64s(seed, "node-ids", count)


def _seeded_uint64s(seed: int, label: str, count: int) -> list[int]:
    rng = random.Random(derive_seed(seed, label))
    ids: list[int] = []
    while len(ids) < count:
        node = rng.getrandbits(8 * NODE_ID_NUM_BYTES)
        if node not in (0, SUPERLINK_NODE_ID) and node not in ids:
            ids.append(node)
    return ids


class DirectGrid(MessageGrid):
    """``num_nodes`` virtual nodes served by ``client_app`` in the calling process."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping[str, ConfigValue],
        *,
        node_ids: Sequence[int] | None = None,
        reply_timeout: float | None = None,
        client_threads: int | None = None,
    ) -> None:
        seed = int(run_config.get("seed", 0))
        # Message() needs a run identity outside Flower's runtime. Every message carries the
        # run and task ids as varints, and Flower draws both as random 64-bit numbers:
        # ids of that width, from the seed, give messages of a Ray run's size.
        run_id, task_id = _seeded_uint64s(seed, "run-and-task-id", 2)
        set_task_identity(run_id, task_id, SUPERLINK_NODE_ID)
        self.client_app = client_app
        # Node ids do not follow partition order, as in Flower's engine; partition i gets ids[i].
        ids = list(node_ids) if node_ids is not None else seeded_node_ids(seed, num_nodes)
        if len(set(ids)) != num_nodes:
            raise ValueError(f"DirectGrid needs {num_nodes} distinct node ids, got {len(set(ids))}")
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for pid, node_id in enumerate(ids)
        }
        self._inbox: dict[str, Message] = {}
        self.fail_nodes: set[int] = set()  # nodes whose next messages get no reply
        # A reply whose injected delays (simulated time) exceed this missed the round
        # (default: the run config's round-timeout).
        if reply_timeout is None and "round-timeout" in run_config:
            reply_timeout = float(run_config["round-timeout"])
        self.reply_timeout = reply_timeout
        # Torch threads while a client runs (None: the process's). Flower's Ray engine gives
        # each client actor OMP_NUM_THREADS = its CPUs, and a float sum over 1 thread can
        # differ in the last bits from one over 2: the same count gives the same numbers.
        self.client_threads = client_threads

    #: Every reply that will ever come is in the first pull (clients run inside it), so a
    #: caller need not wait out the round timeout for the missing ones.
    answers_at_once = True

    def set_run(self, run: Run) -> None:  # pragma: no cover - nothing to set
        pass

    @property
    def run(self) -> Run:
        return empty_run(task_run_id())

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            set_message_id(msg, str(uuid.uuid4()))  # as Flower's grid does
            self._inbox[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for msg_id in list(message_ids):
            msg = self._inbox.pop(msg_id, None)
            if msg is None or msg.metadata.dst_node_id in self.fail_nodes:
                continue
            context = self.contexts[msg.metadata.dst_node_id]
            before = copy.deepcopy(context.state)
            with simulated_time() as clock, torch_threads(self.client_threads):
                try:
                    reply = self.client_app(msg, context)
                except Exception as err:  # a crashing ClientApp becomes an error reply, as in Flower
                    # Flower's code and wording for a ClientApp that raised.
                    reason = f"{type(err)}:<'{err}'>"
                    reply = Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
                    # Flower's engine keeps a node's Context only from calls that return, so
                    # what the failed call changed in place is undone (a resumed run agrees).
                    context.state = before
            set_message_id(reply, str(uuid.uuid4()))  # as Flower's engine does
            if self.reply_timeout is None or clock.elapsed <= self.reply_timeout:
                replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(
    cfg: RunConfig, run_config: Mapping[str, ConfigValue], client_threads: int, built: ServerRun | None = None
) -> None:
    """The ServerApp's round loop over an in-process grid of ``num-clients`` nodes.

    ``run_config`` is the fused run config each node's Context carries (as Flower's engine
    would give it).  Clients run with as many torch threads as a Ray client actor gets CPUs,
    so both engines compute the same numbers to the bit.
    """
    from fedpeft.apps import client_app
    from fedpeft.apps.server_app import run_server

    grid = DirectGrid(
        client_app.app,
        cfg.num_clients,
        run_config,
        reply_timeout=cfg.round_timeout,
        client_threads=client_threads,
    )
    run_server(grid, cfg, built)
