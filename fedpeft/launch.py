"""Start a simulation: the one function that hides which Flower entry point is used.

:func:`simulate` validates the whole configuration first (an unknown key, a bad value,
an unknown method or strategy, a missing dataset all fail here, before Ray starts), then
runs the app's ServerApp and ClientApp on Flower's simulation engine with a Ray backend
whose resources are explicit: CPUs (and GPUs) per client, object store size, no
dashboard, and every socket on loopback unless a cluster address is given.

Flower 1.41's public ``run_simulation`` cannot pass a run config, so this calls the
engine underneath it (``flwr.simulation.run_simulation._run_simulation``) with a
``Run`` that carries the overrides, exactly as ``flwr run`` would fuse them with
``[tool.flwr.app.config]``.  Flower is pinned; a test runs this path.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from fedpeft.config import ConfigError, ConfigValue, RunConfig

APP_COMPONENTS = ("fedpeft.apps.server_app:app", "fedpeft.apps.client_app:app")
#: ``ray``: Flower's simulation engine on Ray (what users run). ``inprocess``: the same
#: ServerApp logic and ClientApp in this process, one client after another, through
#: :class:`fedpeft.testing.DirectGrid` -- no Ray start-up (about 20 s a run here), for
#: debugging, notebooks and many small sweep points.
ENGINES = ("ray", "inprocess")


@dataclass(frozen=True)
class RayOptions:
    """Ray resources for a simulation."""

    cpus_per_client: float = 1.0
    # None: 0.5 of a GPU per client when CUDA is visible and device allows it, else 0.
    gpus_per_client: float | None = None
    # Total CPUs Ray may use on this machine (None: all); ignored with ``address``.
    num_cpus: int | None = None
    object_store_mb: int = 512
    # An existing Ray cluster ("127.0.0.1:6379", "ray://..."); None starts a local one.
    address: str | None = None
    verbose: bool = False


def app_dir() -> Path:
    """The Flower App folder (the one whose pyproject.toml declares our components)."""
    here = Path(__file__).resolve().parent.parent
    pyproject = here / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(
            f"no pyproject.toml next to the fedpeft package ({here}); run from a clone of the "
            "fedpeft repository (the Flower App is defined there)"
        )
    return here


def load_experiment(path: str | Path) -> dict[str, ConfigValue]:
    """A simulations/*.toml file as flat run-config overrides (nested tables -> dotted keys)."""
    from flwr.common.config import flatten_dict

    with Path(path).open("rb") as fh:
        return dict(flatten_dict(tomllib.load(fh)))


def resume_overrides(run_dir: str | Path) -> dict[str, ConfigValue]:
    """The overrides that continue the run in ``run_dir``: its own config, with ``resume``."""
    import json

    path = Path(run_dir).expanduser().resolve()
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is not a fedpeft results folder (no config.json)")
    saved = json.loads(config.read_text())
    return saved | {"resume": True, "results-dir": str(path.parent), "run-name": path.name}


def parse_set(items: list[str]) -> dict[str, ConfigValue]:
    """``key=value`` pairs; values parse as TOML scalars, else as plain strings."""
    out: dict[str, ConfigValue] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"--set {key}: only scalars are allowed, got {raw!r}")
        out[key.strip()] = value
    return out


def resolve_config(
    overrides: Mapping[str, ConfigValue],
) -> tuple[RunConfig, dict[str, ConfigValue]]:
    """Defaults from pyproject.toml + ``overrides`` -> (validated config, final overrides).

    The returned overrides pin ``results-dir`` (absolute) and ``run-name`` so that the
    launcher and the ServerApp agree on the results folder.
    """
    from flwr.common.config import get_fused_config_from_dir

    from fedpeft.apps.server_app import run_dir_for

    RunConfig.from_run_config(overrides)  # names an unknown key before Flower's generic error
    overrides = dict(overrides)
    dataset = overrides.get("data.dataset")
    if isinstance(dataset, str) and Path(dataset).expanduser().is_file():
        # Ray workers and a SuperLink may run elsewhere: pin local files absolutely.
        overrides["data.dataset"] = str(Path(dataset).expanduser().resolve())
    fused = get_fused_config_from_dir(app_dir(), dict(overrides))
    cfg = RunConfig.from_run_config(fused)
    run_dir = run_dir_for(cfg)
    final = dict(overrides) | {"results-dir": str(run_dir.parent), "run-name": run_dir.name}
    return RunConfig.from_run_config(dict(fused) | final), final


def preflight(cfg: RunConfig) -> None:
    """Resolve every registry entry and the dataset now, so errors come before Ray starts."""
    from fedpeft.apps.server_app import strategy_stack
    from fedpeft.models import get_method
    from fedpeft.rejections import RejectionLog
    from fedpeft.tasks import get_task
    from strategies import resolve_strategy

    get_method(cfg.peft.method)
    resolve_strategy(cfg.strategy.name)
    strategy_stack(cfg, RejectionLog(), {})  # builds every wrapper: their own checks run now
    if cfg.resume:  # a missing or damaged checkpoint fails here, not after Ray has started
        from fedpeft.apps.server_app import run_dir_for
        from fedpeft.checkpoint import Checkpoint

        Checkpoint.load(run_dir_for(cfg))
    if get_task(cfg).num_outputs(cfg) < 2:
        raise ConfigError(f"config key 'data.dataset': {cfg.data.dataset!r} has fewer than 2 classes")


def ray_backend_config(cfg: RunConfig, ray: RayOptions) -> dict[str, Any]:
    """Flower's backend_config for the Ray backend (``init_args`` go to ``ray.init``)."""
    gpus = ray.gpus_per_client
    if gpus is None:
        import torch

        gpus = (
            0.5
            if (torch.cuda.is_available() and cfg.device in ("auto", "cuda"))
            or cfg.device.startswith("cuda:")
            else 0.0
        )
    init: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.DEBUG if ray.verbose else logging.ERROR,
        "log_to_driver": ray.verbose,
        "configure_logging": True,
    }
    if ray.address:
        init["address"] = ray.address
    else:
        init["address"] = "local"
        init["object_store_memory"] = ray.object_store_mb * 1024 * 1024
        if ray.num_cpus is not None:
            init["num_cpus"] = ray.num_cpus
    return {
        "client_resources": {"num_cpus": ray.cpus_per_client, "num_gpus": gpus},
        "init_args": init,
    }


def loopback_environment() -> None:
    """Environment that keeps Ray and Flower local and quiet (see KNOWLEDGE: Ray binds *:port)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def simulate(
    overrides: Mapping[str, ConfigValue] | None = None,
    ray: RayOptions | None = None,
    *,
    engine: str = "ray",
) -> Path:
    """Run one simulation to completion; returns its results folder.

    ``engine`` is one of :data:`ENGINES`; both run the same ServerApp and ClientApp code
    and write the same results folder.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r} (valid: {', '.join(ENGINES)})")
    ray = ray or RayOptions()
    cfg, final = resolve_config(dict(overrides or {}))
    loopback_environment()
    preflight(cfg)
    quiet_flower(ray.verbose)
    if engine == "inprocess":
        _run_inprocess(cfg, final, client_threads=max(1, int(ray.cpus_per_client)))
    else:
        _run_engine(cfg, final, ray_backend_config(cfg, ray), ray.verbose)
    from fedpeft.apps.server_app import run_dir_for

    run_dir = run_dir_for(cfg)
    if not (run_dir / "rounds.jsonl").is_file():
        raise RuntimeError(f"the simulation ended without writing results to {run_dir}; rerun with --verbose")
    return run_dir


def quiet_flower(verbose: bool) -> None:
    # Flower logs every round at INFO; fedpeft prints its own line per round instead.
    # Client failures still show: Flower logs them as errors.
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)


def _run_inprocess(cfg: RunConfig, overrides: dict[str, ConfigValue], client_threads: int) -> None:
    """The ServerApp's round loop over an in-process grid of ``num-clients`` nodes.

    Clients run with as many torch threads as a Ray client actor gets CPUs, so both
    engines compute the same numbers to the bit.
    """
    from flwr.common.config import get_fused_config_from_dir

    from fedpeft.apps import client_app
    from fedpeft.apps.server_app import run_server
    from fedpeft.testing import DirectGrid

    fused = get_fused_config_from_dir(app_dir(), dict(overrides))
    grid = DirectGrid(
        client_app.app,
        cfg.num_clients,
        fused,
        reply_timeout=cfg.round_timeout,
        client_threads=client_threads,
    )
    run_server(grid, cfg)


def _run_engine(
    cfg: RunConfig, overrides: dict[str, ConfigValue], backend: dict[str, Any], verbose: bool
) -> None:
    """Flower's simulation engine with a Run that carries our overrides."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(overrides)
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(app_dir(), dict(overrides)),
    )
    server_attr, client_attr = APP_COMPONENTS
    with one_pass_delivery(), shared_run_config():
        _run_simulation(
            num_supernodes=cfg.num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app_attr=client_attr,
            server_app_attr=server_attr,
            backend_name="ray",
            backend_config=backend,
            app_dir=str(app_dir()),
            run=run,
            server_app_context=context,
            is_app=True,
            verbose_logging=verbose,
        )


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

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


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
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
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
    from flwr.app import Context
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

    vce_api._register_node_info_stores = _register_node_info_stores
    try:
        yield
    finally:
        vce_api._register_node_info_stores = original
