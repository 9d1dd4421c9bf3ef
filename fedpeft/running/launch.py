"""Start a simulation: the one function that hides which Flower entry point is used.

:func:`simulate` validates the whole configuration first (an unknown key, a bad value,
an unknown method or strategy, a missing dataset all fail here, before Ray starts), then
runs the app's ServerApp and ClientApp on Flower's simulation engine with a Ray backend
whose resources are explicit: CPUs (and GPUs) per client, object store size, no
dashboard, and every socket on loopback unless a cluster address is given.

Flower 1.41's public ``run_simulation`` cannot pass a run config, so the engine underneath
it is started through :func:`fedpeft.flower_compat.run_simulation_engine` with a ``Run``
that carries the overrides, exactly as ``flwr run`` would fuse them with
``[tool.flwr.app.config]``.  Flower is pinned (:func:`fedpeft.flower_compat.check_flower_version`
runs first); a test runs this path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from fedpeft import flower_compat
from fedpeft.config import ConfigError, ConfigValue, RunConfig
from fedpeft.config import parse_set as parse_set  # the command line's --set, read in fedpeft.config

if TYPE_CHECKING:
    from fedpeft.apps.server_app import ServerRun

APP_COMPONENTS = ("fedpeft.apps.server_app:app", "fedpeft.apps.client_app:app")
#: ``ray``: Flower's simulation engine on Ray (what users run). ``inprocess``: the same
#: ServerApp logic and ClientApp in this process, one client after another, through
#: :mod:`fedpeft.running.inprocess` -- no Ray start-up (about 20 s a run here), for
#: debugging, notebooks and many small sweep points.
ENGINES = ("ray", "inprocess")
#: From this many virtual clients on, Flower's simulation engine runs with
#: :func:`fedpeft.flower_compat.one_pass_delivery` and
#: :func:`~fedpeft.flower_compat.shared_run_config`.  Both replace per-node work of Flower
#: 1.41 that grows with the total number of nodes: the delivery sweep asks the LinkState once
#: per node every 0.1 s, each ask scanning every stored message (O(nodes x messages) while
#: discovery's queries are in flight: 1,000 nodes took 129 s of discovery before, 29 s after),
#: and every node's Context re-fuses ``pyproject.toml`` (0.4 ms and 10.7 kB per node before,
#: 3 us and 1.0 kB after); see ``benchmarks/results/scale.md``.  Below a few hundred nodes
#: that is milliseconds a round and a few MB, so smaller runs use Flower's own code, which
#: gives the same results: the patches change no message, context or config, only how they
#: are found and stored, except that one-pass delivery waits for a node's reply before
#: handing it the next message, which matters only for a client kept past the round timeout
#: (:func:`engine_patches_for` keeps it on for runs that inject those).
LARGE_RUN_CLIENTS = 200


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
    here = Path(__file__).resolve().parents[2]
    pyproject = here / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(
            f"no pyproject.toml next to the fedpeft package ({here}); run from a clone of the "
            "fedpeft repository (the Flower App is defined there)"
        )
    return here


def load_experiment(path: str | Path) -> dict[str, ConfigValue]:
    """A simulations/*.toml file as flat run-config overrides (nested tables -> dotted keys)."""
    with Path(path).open("rb") as fh:
        return flower_compat.flatten_dict(tomllib.load(fh))


def resume_overrides(run_dir: str | Path) -> dict[str, ConfigValue]:
    """The overrides that continue the run in ``run_dir``: its own config, with ``resume``."""
    import json

    path = Path(run_dir).expanduser().resolve()
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is not a fedpeft results folder (no config.json)")
    saved = json.loads(config.read_text())
    return saved | {"resume": True, "results-dir": str(path.parent), "run-name": path.name}


def resolve_config(
    overrides: Mapping[str, ConfigValue],
) -> tuple[RunConfig, dict[str, ConfigValue]]:
    """Defaults from pyproject.toml + ``overrides`` -> (validated config, final overrides).

    The returned overrides pin ``results-dir`` (absolute) and ``run-name`` so that the
    launcher and the ServerApp agree on the results folder.
    """
    from fedpeft.results.records import run_dir_for

    RunConfig.from_run_config(overrides)  # names an unknown key before Flower's generic error
    overrides = dict(overrides)
    dataset = overrides.get("data.dataset")
    if isinstance(dataset, str) and Path(dataset).expanduser().is_file():
        # Ray workers and a SuperLink may run elsewhere: pin local files absolutely.
        overrides["data.dataset"] = str(Path(dataset).expanduser().resolve())
    fused = flower_compat.fused_run_config(app_dir(), overrides)
    cfg = RunConfig.from_run_config(fused)
    run_dir = run_dir_for(cfg)
    final = dict(overrides) | {"results-dir": str(run_dir.parent), "run-name": run_dir.name}
    return RunConfig.from_run_config(dict(fused) | final), final


def check_run(cfg: RunConfig) -> None:
    """Every check that building ``cfg``'s run makes, short of loading its model: the
    registries, the strategy stack with its wrappers, the checkpoint, the data.  For
    validating many runs before any starts (a sweep); a run itself is checked as it is
    built, once (:func:`preflight`)."""
    from fedpeft.models import get_method
    from fedpeft.recovery.checkpoint import Checkpoint
    from fedpeft.results.records import run_dir_for
    from fedpeft.server.rejections import RejectionLog
    from fedpeft.server.stack import strategy_stack
    from strategies import resolve_strategy

    get_method(cfg.peft.method)
    resolve_strategy(cfg.strategy.name)
    strategy_stack(cfg, RejectionLog())  # builds every wrapper: their own checks run now
    if cfg.resume:  # a missing or damaged checkpoint fails here, not after Ray has started
        Checkpoint.load(run_dir_for(cfg))
    _check_clients(cfg)


def preflight(cfg: RunConfig) -> ServerRun:
    """Build the run's server side now, so that every error comes before the engine starts:
    the registries, the strategy stack and its wrappers, the checkpoint, the data.  The
    launcher hands what it built to the ServerApp (:func:`fedpeft.apps.server_app.hand_over`),
    which runs it rather than building it again."""
    from fedpeft.apps.server_app import build_server_run
    from fedpeft.models import get_method
    from strategies import resolve_strategy

    get_method(cfg.peft.method)  # the registries first: their errors are the quickest to give
    resolve_strategy(cfg.strategy.name)
    built = build_server_run(cfg)
    _check_clients(cfg)
    return built


def _check_clients(cfg: RunConfig) -> None:
    """What only the clients would find out: DP-SGD's mode for the method, the client data."""
    from fedpeft.tasks import get_task

    if cfg.dp.per_example():
        from fedpeft.privacy.dpsgd import check_grad_sample_mode

        check_grad_sample_mode(cfg.peft.method, cfg.dp.grad_sample_mode)
    task = get_task(cfg)
    if task.num_outputs(cfg) < 2:
        raise ConfigError(f"config key 'data.dataset': {cfg.data.dataset!r} has fewer than 2 classes")
    task.client_train_size(cfg, 0, cfg.num_clients)  # the data loads and splits (natural ids, say)


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


#: Ray reads its config key ``worker_niceness`` from this variable (its spelling, not upper case).
RAY_WORKER_NICENESS = "RAY_worker_niceness"


def engine_environment() -> None:
    """Environment that keeps Ray and Flower local, quiet, and at this process's priority.

    Ray binds every interface unless told otherwise (KNOWLEDGE.md).  It also starts its
    workers ``worker_niceness`` (15) nicer than itself, so that they yield to its own
    daemons; beside any other normal-priority process they then get ~2% of a core and a
    simulation starves (a suite run beside three busy processes sat in round 0).  The value
    is added to the niceness the workers inherit, so 0 runs the clients at the driver's
    own priority, as the user started it (``nice -n 10 fedpeft run ...`` stays at 10);
    Ray's job manager sets the same for its drivers.  Set ``RAY_worker_niceness`` to keep
    another value.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault(RAY_WORKER_NICENESS, "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def simulate(
    overrides: Mapping[str, ConfigValue] | None = None,
    ray: RayOptions | None = None,
    *,
    engine: str | None = None,
) -> Path:
    """Run one simulation to completion; returns its results folder.

    ``engine`` is one of :data:`ENGINES` (None: "ray", or, resuming, the engine the run
    started on, with its client threads: :data:`LAUNCH_FILE`); both run the same
    ServerApp and ClientApp code and write the same results folder.
    """
    flower_compat.check_flower_version()
    if engine is not None and engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r} (valid: {', '.join(ENGINES)})")
    ray = ray or RayOptions()
    quiet_flower(ray.verbose)  # before preflight: building the strategy logs Flower's notes
    cfg, final = resolve_config(dict(overrides or {}))
    engine_environment()
    built = preflight(cfg)
    launch = Launch(engine or "ray", max(1, int(ray.cpus_per_client)))
    if cfg.resume:
        launch = _resumed_launch(built.run_dir, engine, launch)
    else:
        launch.save(built.run_dir)
    if launch.engine == "inprocess":
        from fedpeft.running.inprocess import run_inprocess

        fused = flower_compat.fused_run_config(app_dir(), final)
        run_inprocess(cfg, fused, client_threads=launch.client_threads, built=built)
    else:
        from fedpeft.apps.server_app import hand_over

        hand_over(built)  # Flower's engine runs the ServerApp in this process, in a thread
        _run_engine(cfg, final, ray_backend_config(cfg, ray), ray.verbose)
    run_dir = built.run_dir
    if not (run_dir / "rounds.jsonl").is_file():
        raise RuntimeError(f"the simulation ended without writing results to {run_dir}; rerun with --verbose")
    return run_dir


LAUNCH_FILE = "launch.json"  # in the results folder: how the run was started


@dataclass(frozen=True)
class Launch:
    """How a run was started, kept so that ``--resume`` continues it the same way: on the
    in-process engine node ids come from the seed and clients compute with this many
    threads, so a resumed run equals the run left alone to the byte; on Flower's Ray
    engine node ids are drawn at random each start."""

    engine: str
    client_threads: int

    def save(self, run_dir: Path) -> None:
        import json

        run_dir.mkdir(parents=True, exist_ok=True)  # before the ServerApp writes anything there
        (run_dir / LAUNCH_FILE).write_text(json.dumps(dataclasses.asdict(self)) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> Launch | None:
        import json

        path = run_dir / LAUNCH_FILE
        if not path.is_file():
            return None  # a run started before launches were recorded
        saved = json.loads(path.read_text())
        return cls(str(saved["engine"]), int(saved["client_threads"]))


def _resumed_launch(run_dir: Path, asked: str | None, default: Launch) -> Launch:
    """The launch a resumed run continues with: the run's own, unless ``asked`` names
    another engine (then said, since node ids and message sizes may then differ)."""
    started = Launch.load(run_dir)
    if started is None:
        return default
    if asked is None or asked == started.engine:
        return started
    print(
        f"fedpeft: note: the run started on the {started.engine} engine and resumes on {asked}: "
        "node ids differ, so whole-message byte counts may differ from the run left alone",
        flush=True,
    )
    return default


def quiet_flower(verbose: bool) -> None:
    """Flower's logger at ERROR (DEBUG with ``verbose``); FutureWarnings off unless ``verbose``.

    Flower logs every round at INFO, and notes such as "fraction_evaluate is set to 0.0"
    at WARNING when a strategy is built; fedpeft prints its own line per round instead.
    Client failures still show: Flower logs them as errors.  Call it before anything builds
    a strategy (preflight does).
    """
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)


@dataclass(frozen=True)
class EnginePatches:
    """Which simulation-engine patches of :mod:`fedpeft.flower_compat` a run gets."""

    one_pass: bool = False
    shared_config: bool = False


def engine_patches_for(cfg: RunConfig) -> EnginePatches:
    """Which :func:`fedpeft.flower_compat.run_simulation_engine` patches ``cfg``'s run gets.

    Both from :data:`LARGE_RUN_CLIENTS` on.  One-pass delivery also hands a node its next
    message only after it replied (as a SuperNode pulls), which injected hangs and drops
    rely on to stay reproducible (:mod:`fedpeft.recovery.faults`): a client kept past the round
    timeout must not run the next round at the same time on a copy of its Context.
    """
    large = cfg.num_clients >= LARGE_RUN_CLIENTS
    late_clients = cfg.failures.hang_probability > 0 or cfg.failures.drop_probability > 0
    return EnginePatches(one_pass=large or late_clients, shared_config=large)


def _run_engine(
    cfg: RunConfig, overrides: dict[str, ConfigValue], backend: dict[str, Any], verbose: bool
) -> None:
    """Flower's simulation engine with a Run that carries our overrides."""
    server_attr, client_attr = APP_COMPONENTS
    patches = engine_patches_for(cfg)
    flower_compat.run_simulation_engine(
        num_supernodes=cfg.num_clients,
        server_app_attr=server_attr,
        client_app_attr=client_attr,
        app_dir=app_dir(),
        overrides=overrides,
        backend=backend,
        verbose=verbose,
        one_pass=patches.one_pass,
        shared_config=patches.shared_config,
    )
