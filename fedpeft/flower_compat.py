"""Every private Flower API fedpeft uses, behind one door, checked against ``flwr.__version__``.

Flower's public API is what ``flwr.app``, ``flwr.serverapp`` (with ``.strategy``) and
``flwr.clientapp`` (with ``.mod``) export.  fedpeft needs a few things beyond it: the
simulation engine entry that takes a ``Run`` (for run-config overrides), the process's run
identity (``Message()`` reads it), message ids, protobuf serialization (exact byte counts,
checkpoints), the Fleet HTTP client (the deployment probe), and two patches of the
simulation engine that make runs of thousands of virtual clients affordable.  All of it is
here and nowhere else (``tests/test_import_direction.py`` holds every other module to the
public API), so a Flower upgrade is checked against this one file.

It was written against the Flower series in :data:`SUPPORTED_FLWR`;
:func:`check_flower_version` is the first thing ``fedpeft run`` does.  The module imports
nothing of fedpeft (``strategies.conformance`` uses it too), and the heavy parts of Flower
(the simulation engine, the SuperNode) only when a function needs them.

Every patch of a Flower function goes through :func:`patched`, a context manager that puts
the original back when the block ends, also when it raises.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import flwr
from flwr.app import Context, Message, RecordDict
from flwr.common.config import flatten_dict as _flatten_dict
from flwr.common.config import get_fused_config_from_dir
from flwr.common.constant import NODE_ID_NUM_BYTES as NODE_ID_NUM_BYTES
from flwr.common.constant import SUPERLINK_NODE_ID as SUPERLINK_NODE_ID
from flwr.common.constant import ErrorCode
from flwr.common.serde import error_to_proto, metadata_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.run import Run as Run
from flwr.supercore.task_identity import TaskIdentity

#: The Flower release series (major.minor) this module was written against.
SUPPORTED_FLWR = ("1.41",)

#: Flower's error code for a ClientApp that raised (what its engine puts in the error reply).
CLIENT_APP_RAISED_EXCEPTION = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


# ---------------------------------------------------------------------------- version
class UnsupportedFlowerVersion(RuntimeError):
    """The installed flwr is not a release series this module was written for."""


def check_flower_version(version: str | None = None) -> str:
    """The installed flwr version; raises :class:`UnsupportedFlowerVersion` outside :data:`SUPPORTED_FLWR`.

    The message is one line naming both, for a command line to print as it is.
    """
    installed = flwr.__version__ if version is None else version
    series = ".".join(installed.split(".")[:2])
    if series not in SUPPORTED_FLWR:
        supported = ", ".join(f"{s}.x" for s in SUPPORTED_FLWR)
        raise UnsupportedFlowerVersion(
            f"flwr {installed} is installed, but fedpeft supports flwr {supported} only "
            f"(it uses Flower internals); install it with: pip install 'flwr=={SUPPORTED_FLWR[-1]}.*'"
        )
    return installed


# ---------------------------------------------------------------------------- patches
@contextmanager
def patched(owner: Any, name: str, replacement: Any) -> Iterator[Any]:
    """``owner.name = replacement`` for the block; afterwards, also on error, ``owner`` is as before.

    Yields the attribute as it was looked up before.  An attribute that ``owner`` only
    inherited (a classmethod of a base class) is deleted again rather than set, so the
    class is left exactly as it was.
    """
    own = vars(owner)
    had, raw = name in own, own.get(name)
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        if had:
            setattr(owner, name, raw)
        else:
            delattr(owner, name)


# --------------------------------------------------------------- run identity, messages
def set_task_identity(run_id: int, task_id: int, node_id: int) -> None:
    """The process's run identity, which ``Message()`` stamps on every instruction message."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, task_id, node_id


def task_run_id() -> int:
    """The run id of the process's run identity (raises when none is set)."""
    return TaskIdentity.run_id


def ensure_task_identity() -> None:
    """Give the process a placeholder run identity (1, 1, 1) if it has none (outside Flower's runtime)."""
    if TaskIdentity._run_id is None:
        set_task_identity(1, 1, 1)


def empty_run(run_id: int) -> Run:
    """A ``Run`` with only its id set (what ``Grid.run`` returns outside Flower's runtime)."""
    return Run.create_empty(run_id)


def set_message_id(msg: Message, message_id: str) -> None:
    """Give ``msg`` the id a SuperLink would (``Metadata.message_id`` has no public setter)."""
    msg.metadata.__dict__["_message_id"] = message_id


# ---------------------------------------------------------------------- serialization
#: Field number of ``content`` in Flower's ``Message`` protobuf.
MESSAGE_CONTENT_FIELD: int = ProtoMessage.DESCRIPTOR.fields_by_name["content"].number


def recorddict_proto_size(content: RecordDict) -> int:
    """Protobuf size of ``content`` as Flower serializes it."""
    return int(recorddict_to_proto(content).ByteSize())


def message_head_size(msg: Message) -> int:
    """Protobuf size of ``msg`` without its content: metadata and error, as Flower serializes them."""
    return int(
        ProtoMessage(
            metadata=metadata_to_proto(msg.metadata),
            error=error_to_proto(msg.error) if msg.has_error() else None,
        ).ByteSize()
    )


def recorddict_to_bytes(content: RecordDict) -> bytes:
    """``content`` serialized as Flower's ``RecordDict`` protobuf."""
    return bytes(recorddict_to_proto(content).SerializeToString())


def recorddict_from_bytes(data: bytes) -> RecordDict:
    """The ``RecordDict`` that :func:`recorddict_to_bytes` wrote."""
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


# ------------------------------------------------------------------------- run config
def flatten_dict(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Nested TOML tables as Flower's run-config keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    return dict(_flatten_dict(dict(raw)))


def fused_run_config(app_dir: str | Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` with ``overrides`` applied, as ``flwr run`` fuses them."""
    return dict(get_fused_config_from_dir(Path(app_dir), dict(overrides)))


# ----------------------------------------------------------------- simulation engine
def run_simulation_engine(
    *,
    num_supernodes: int,
    server_app_attr: str,
    client_app_attr: str,
    app_dir: str | Path,
    overrides: Mapping[str, Any],
    backend: dict[str, Any],
    verbose: bool,
    one_pass: bool = False,
    shared_config: bool = False,
) -> None:
    """Flower's simulation engine on Ray with a ``Run`` that carries ``overrides``.

    Flower 1.41's public ``run_simulation`` cannot pass a run config, so this calls the
    engine underneath it (``flwr.simulation.run_simulation._run_simulation``) with a ``Run``
    that carries the overrides, exactly as ``flwr run`` would fuse them with
    ``[tool.flwr.app.config]``.  ``one_pass`` and ``shared_config`` apply
    :func:`one_pass_delivery` and :func:`shared_run_config` while it runs; without them the
    engine is Flower's own code.
    """
    from flwr.common.constant import RUN_ID_NUM_BYTES, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(overrides)
    set_task_identity(run.run_id, run.primary_task_id, SUPERLINK_NODE_ID)
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=fused_run_config(app_dir, overrides),
    )
    with engine_patches(one_pass=one_pass, shared_config=shared_config):
        _run_simulation(
            num_supernodes=num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app_attr=client_app_attr,
            server_app_attr=server_app_attr,
            backend_name="ray",
            backend_config=backend,
            app_dir=str(app_dir),
            run=run,
            server_app_context=context,
            is_app=True,
            verbose_logging=verbose,
        )


@contextmanager
def engine_patches(*, one_pass: bool, shared_config: bool) -> Iterator[None]:
    """The chosen simulation-engine patches for the block, all undone when it ends (also on error)."""
    with ExitStack() as stack:
        if one_pass:
            stack.enter_context(one_pass_delivery())
        if shared_config:
            stack.enter_context(shared_run_config())
        yield


# ---------------------------------------------------------------------- message delivery
def deliver_pending(state: Any, nodes_mapping: Mapping[int, int]) -> list[Any]:
    """The undelivered messages of an in-memory LinkState, at most one per node, marked delivered.

    Flower 1.41's simulation loop (``vce_api.add_messages_to_queue``) asks the LinkState
    every 0.1 s, node by node, for one message: ``num_nodes`` calls per sweep, each of which
    scans every stored message.  With 10,000 virtual clients that is a sweep of ~10^4 calls
    even when 10 are sampled (per-round cost grows with the total) and ~10^8 message checks
    while discovery's 10,000 queries are in flight.  This is one pass over the stored
    messages instead, with the same checks (``_check_stored_messages``: TTL, federation) and
    the same result: each node's first undelivered message, marked delivered.

    One difference, on purpose: a node whose last message is still being processed (no
    reply stored yet) gets nothing new, as a real SuperNode pulls its next message only
    after replying.  Flower's sweep hands it the next one at once, so a client that is
    still busy when the server gives up on it (a hanging client past the round timeout)
    would run two rounds at the same time on two copies of its Context, and the one that
    finished last would overwrite the other's state: results would depend on timing.
    """
    from flwr.supercore.date import now

    store = state.message_ins_store
    answered = state.message_ins_id_to_message_res_id
    with state.lock:
        busy = {
            msg.metadata.dst_node_id
            for msg_id, msg in store.items()
            if msg.metadata.delivered_at != "" and msg_id not in answered
        }
        waiting = [
            msg_id
            for msg_id, msg in store.items()
            if msg.metadata.delivered_at == ""
            and msg.metadata.dst_node_id in nodes_mapping
            and msg.metadata.dst_node_id not in busy
        ]
        if not waiting:
            return []
        state._check_stored_messages(set(waiting))  # drops expired / invalid ones
        out, seen = [], set()
        for msg_id in waiting:
            msg = store.get(msg_id)
            if msg is None or msg.metadata.dst_node_id in seen:
                continue
            seen.add(msg.metadata.dst_node_id)
            out.append(msg)
        delivered_at = now().isoformat()
        for msg in out:
            msg.metadata.delivered_at = delivered_at
    return out


@contextmanager
def one_pass_delivery() -> Iterator[None]:
    """Swap Flower's per-node delivery sweep for :func:`deliver_pending` while a simulation runs.

    Only for the in-memory LinkState the engine creates; any other state keeps Flower's loop.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
        needs = ("message_ins_store", "message_ins_id_to_message_res_id", "_check_stored_messages")
        if not all(hasattr(state, name) for name in needs):
            original(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            for msg in deliver_pending(state, nodes_mapping):
                queue.put(msg)
            f_stop.wait(0.1)

    with patched(vce_api, "add_messages_to_queue", add_messages_to_queue):
        yield


# ----------------------------------------------------------------- per-node run contexts
def register_node_info_stores(
    nodes_mapping: Mapping[int, int], run: Any, app_dir: str | Path
) -> dict[int, Any]:
    """Flower's per-node ``DeprecatedRunInfoStore``s, with the run config fused once and shared.

    Flower 1.41's ``vce_api._register_node_info_stores`` calls ``register_context`` per node,
    which re-reads and re-fuses ``pyproject.toml`` (``get_fused_config_from_dir``) and keeps
    two copies of the result per node (``RunInfo.initial_run_config`` and the Context's
    ``run_config``): 10,000 TOML parses before the first message is delivered and two config
    dicts per virtual node.  This builds the same stores (same ``node_config`` per node, same
    Context fields, same run id) around one fused dict.

    Sharing is safe because nothing in the driver writes to it: the worker sends a node's
    Context to a Ray actor (serialized: the actor works on its own copy), then
    ``update_context`` only *compares* the returned ``run_config`` with
    ``initial_run_config`` (raising if the ClientApp changed it) and replaces the node's
    Context by the returned object, which carries its own deserialized copies.  So the shared
    dict is only ever read, by ``update_context`` and by the serializer.  The stores are
    :func:`shared_config_store` instances: after Flower's check, ``update_context`` points the
    returned Context back at the shared run config (equal by that check) and at the node's
    ``node_config`` (when equal), so a node that has answered once does not keep its own copy.
    """
    from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
    from flwr.compat.client.run_info_store import RunInfo

    store_class = shared_config_store()
    fused = get_fused_config_from_dir(Path(app_dir), run.override_config)
    num_partitions = len(set(nodes_mapping.values()))
    stores: dict[int, Any] = {}
    for node_id, partition_id in nodes_mapping.items():
        store = store_class(
            node_id=node_id, node_config={PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: num_partitions}
        )
        context = Context(
            run_id=run.run_id,
            node_id=node_id,
            node_config=store.node_config,
            state=RecordDict(),
            run_config=fused,
        )
        store.run_infos[run.run_id] = RunInfo(context=context, initial_run_config=fused)
        stores[node_id] = store
    return stores


@functools.cache
def shared_config_store() -> type[Any]:
    """``DeprecatedRunInfoStore`` whose ``update_context`` keeps the run config shared."""
    from flwr.compat.client.run_info_store import DeprecatedRunInfoStore

    class SharedConfigRunInfoStore(DeprecatedRunInfoStore):
        def update_context(self, run_id: int, context: Context) -> None:
            super().update_context(run_id, context)  # raises if the ClientApp changed run_config
            context.run_config = self.run_infos[run_id].initial_run_config
            if context.node_config == self.node_config:
                context.node_config = self.node_config

    return SharedConfigRunInfoStore


@contextmanager
def shared_run_config() -> Iterator[None]:
    """Swap Flower's per-node context registration for :func:`register_node_info_stores`.

    ``start_vce`` looks ``_register_node_info_stores`` up as a global of ``vce_api`` when it
    runs, so that is the name replaced, while a simulation runs.  Without an app folder
    (``is_app`` false: the config comes from an installed FAB) Flower's function runs.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api._register_node_info_stores

    def _register_node_info_stores(nodes_mapping: Any, run: Any, app_dir: str | None = None) -> Any:
        if not app_dir or not Path(app_dir).is_dir():
            return original(nodes_mapping, run, app_dir)
        return register_node_info_stores(nodes_mapping, run, app_dir)

    with patched(vce_api, "_register_node_info_stores", _register_node_info_stores):
        yield


# ------------------------------------------------------------ Fleet API (deployment probe)
def decode_fleet_response(method: str, body: bytes) -> Any:
    """The protobuf response of Fleet RPC ``method`` (``PullMessages``, ``PushMessages``, ``PullObject``)."""
    from flwr.proto.fleet_pb2 import PullMessagesResponse, PushMessagesResponse
    from flwr.proto.message_pb2 import PullObjectResponse

    types: dict[str, Any] = {
        "PullMessages": PullMessagesResponse,
        "PushMessages": PushMessagesResponse,
        "PullObject": PullObjectResponse,
    }
    return types[method].FromString(body)


def inflate_message(root: str, contents: Mapping[str, bytes]) -> object:
    """The object (a ``Message`` when ``root`` is one) that Flower inflates from ``contents``."""
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    return inflate_object_from_contents(root, dict(contents), keep_object_contents=True)


@contextmanager
def fleet_interceptor(interceptor: Any) -> Iterator[None]:
    """Add ``interceptor`` to every Fleet HTTP client created in this process while the block runs."""
    from flwr.supernode import fleet_http_connection

    client_cls = fleet_http_connection.FleetHttpClient
    original = client_cls.from_server_address.__func__  # type: ignore[attr-defined]

    def from_server_address(cls: type, server_address: str, insecure: bool, root_certificates: Any,
                            interceptors: Sequence[Any], **kwargs: Any) -> Any:  # fmt: skip
        return original(
            cls, server_address, insecure, root_certificates, [*interceptors, interceptor], **kwargs
        )

    with patched(client_cls, "from_server_address", classmethod(from_server_address)):
        yield


def run_supernode(argv: Sequence[str], interceptor: Any | None = None) -> None:
    """Flower's ``flower-supernode`` with ``argv``, its Fleet clients through ``interceptor`` if given."""
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    run: Callable[[], None] = flower_supernode
    if interceptor is None:
        run()
        return
    with fleet_interceptor(interceptor):
        run()
