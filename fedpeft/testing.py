"""An in-process ``Grid`` for fast, Ray-free runs of the real ServerApp logic and ClientApp.

``DirectGrid`` delivers each message straight to a ``ClientApp`` in this process, with
one persistent ``Context`` per node (as Flower's simulation engine keeps them).  Tests
and strategy authors use it to run whole federations in seconds; the Ray-backed engine
(:mod:`fedpeft.launch`) is what users run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.config import ConfigValue


class DirectGrid(Grid):
    """``num_nodes`` virtual nodes served by ``client_app`` in the calling process."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping[str, ConfigValue],
        *,
        first_node_id: int = 1000,
        reply_timeout: float | None = None,
    ) -> None:
        if TaskIdentity._run_id is None:  # Message() needs a run identity outside Flower's runtime
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
        self.client_app = client_app
        # Node ids deliberately do not follow partition order, as in Flower's engine.
        ids = [first_node_id + (7919 * i) % (num_nodes * 7919 + 1) for i in range(num_nodes)]
        self.contexts = {
            node_id: Context(
                run_id=TaskIdentity.run_id,
                node_id=node_id,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for pid, node_id in enumerate(reversed(ids))
        }
        self._inbox: dict[str, Message] = {}
        self.fail_nodes: set[int] = set()  # nodes whose next messages get no reply
        # Clients run one after another here; one whose own call takes longer than this
        # is treated as a reply that missed the round (as with Flower's engine in parallel).
        self.reply_timeout = reply_timeout

    def set_run(self, run: Run) -> None:  # pragma: no cover - nothing to set
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(TaskIdentity.run_id)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
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
            started = time.monotonic()
            try:
                reply = self.client_app(msg, context)
            except Exception as err:  # a crashing ClientApp becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if self.reply_timeout is None or time.monotonic() - started <= self.reply_timeout:
                replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
