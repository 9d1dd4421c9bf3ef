"""``fedpeft`` command line.

``fedpeft run [EXPERIMENT.toml] [--set key=value ...] | --resume RESULTS_DIR``: one simulation;
``fedpeft sweep SWEEP.toml``: a grid of them, resumable; ``fedpeft report RESULTS_DIR...``: a
comparison table and plots; ``fedpeft deploy [EXPERIMENT.toml] [--set ...] [--supernodes N]
[--tls]``: one run on a real SuperLink and SuperNodes on this machine; ``fedpeft keys``: every
config key with its default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.config import ConfigError, ConfigValue, config_schema

if TYPE_CHECKING:
    from fedpeft.running.launch import RayOptions


def _add_engine_options(cmd: argparse.ArgumentParser, *, engine_default: str | None = "ray") -> None:
    cmd.add_argument(
        "--engine",
        choices=("ray", "inprocess"),
        default=engine_default,
        help="ray: Flower's simulation engine (default; --resume: the engine the run started on); "
        "inprocess: the same apps in this process, no Ray",
    )
    cmd.add_argument("--ray-address", default=None, help="join an existing Ray cluster (e.g. 127.0.0.1:6379)")
    cmd.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per client (default 1)")
    cmd.add_argument(
        "--gpus-per-client",
        type=float,
        default=None,
        help="Ray GPUs per client (default: 0.5 when CUDA is present, else 0)",
    )
    cmd.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray may use (default: all)")
    cmd.add_argument("--object-store-mb", type=int, default=512, help="Ray object store size (MB)")
    cmd.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpeft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one simulation on Flower's simulation engine (Ray)")
    run.add_argument("experiment", nargs="?", help="a simulations/*.toml file of run-config overrides")
    run.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key (repeatable); see `fedpeft keys`",
    )
    run.add_argument(
        "--resume",
        metavar="RESULTS_DIR",
        default=None,
        help="continue that run from its last complete round (its config.json; no experiment or --set)",
    )
    _add_engine_options(run, engine_default=None)
    sweep = sub.add_parser("sweep", help="run every point of a sweep file (skips finished points, resumes)")
    sweep.add_argument("sweep_file", metavar="SWEEP.toml", help="a sweep file (see fedpeft.results.sweep)")
    sweep.add_argument("--jobs", type=int, default=None, help="points at once (default: the file's, else 1)")
    sweep.add_argument("--dry-run", action="store_true", help="validate and list the points, run nothing")
    _add_engine_options(sweep, engine_default=None)
    report = sub.add_parser("report", help="one table (markdown + CSV) and plots across results folders")
    report.add_argument(
        "paths", nargs="+", metavar="RESULTS_DIR", help="run folders, sweep folders, or above"
    )
    report.add_argument("--out", default=None, help="where to write (default: <first RESULTS_DIR>/report)")
    report.add_argument(
        "--target", type=float, default=None, help="target accuracy for rounds/bytes to target (default 0.8)"
    )
    _add_deploy(sub)
    sub.add_parser("keys", help="list every run-config key with its default")
    return parser


def _ray_options(args: argparse.Namespace) -> RayOptions:
    from fedpeft.running.launch import RayOptions

    return RayOptions(
        cpus_per_client=args.cpus_per_client,
        gpus_per_client=args.gpus_per_client,
        num_cpus=args.num_cpus,
        object_store_mb=args.object_store_mb,
        address=args.ray_address,
        verbose=args.verbose,
    )


def _report(args: argparse.Namespace) -> int:
    from fedpeft.results.report import DEFAULT_TARGET, make_report

    out = args.out or str(Path(args.paths[0]) / "report")
    rep = make_report(args.paths, out, DEFAULT_TARGET if args.target is None else args.target)
    print(rep.markdown)
    print("\nwritten: " + ", ".join(str(p) for p in rep.files.values()))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedpeft.results.sweep import Sweep, describe, run_sweep
    from fedpeft.running.launch import quiet_flower

    quiet_flower(args.verbose)  # validating every point builds its strategy: Flower's notes, once each
    spec = Sweep.load(args.sweep_file)
    if args.dry_run:
        spec.resolve()  # every point validated
        print(describe(spec.expand()))
        return 0
    manifest = run_sweep(spec, _ray_options(args), jobs=args.jobs, engine=args.engine)
    return 1 if any(p["status"] == "failed" for p in manifest["points"].values()) else 0


def _add_deploy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dep = sub.add_parser("deploy", help="run on a real Flower SuperLink + SuperNodes on loopback")
    dep.add_argument("experiment", nargs="?", help="a simulations/*.toml file of run-config overrides")
    dep.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override one key"
    )
    dep.add_argument(
        "--supernodes", type=int, default=None, help="SuperNodes to start (default and required: num-clients)"
    )
    dep.add_argument(
        "--tls", action="store_true", help="TLS with a CA and server certificate made on the fly"
    )
    dep.add_argument("--work-dir", default=None, help="process logs and probe logs (default: a temp folder)")


def _overrides(args: argparse.Namespace) -> dict[str, ConfigValue]:
    """The experiment file's overrides, then every ``--set`` (``run`` and ``deploy``)."""
    from fedpeft.running.launch import load_experiment, parse_set

    overrides = load_experiment(args.experiment) if args.experiment else {}
    return overrides | parse_set(args.sets)


def _deploy(args: argparse.Namespace) -> int:
    """``fedpeft deploy``: one run on real Flower processes; prints results and traffic."""
    from fedpeft.running.deploy import deploy

    result = deploy(_overrides(args), supernodes=args.supernodes, tls=args.tls, work_dir=args.work_dir)
    print(f"fedpeft deploy: run {result.run_id} {result.status} in {result.wall_seconds:.1f} s")
    print(f"fedpeft deploy: {result.traffic.summary()}")
    print(f"fedpeft deploy: results in {result.run_dir}; process logs in {result.work_dir}")
    return 0 if result.traffic.exact else 1


def _flower_problem() -> str | None:
    """Why the installed Flower cannot run fedpeft (one line), or None when it can."""
    try:
        from fedpeft.flower_compat import UnsupportedFlowerVersion, check_flower_version
    except ImportError as err:  # a Flower whose internals moved: fedpeft cannot even load them
        from importlib.metadata import version

        return f"flwr {version('flwr')} lacks an internal module fedpeft uses ({err})"
    try:
        check_flower_version()
    except UnsupportedFlowerVersion as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("run", "sweep", "deploy") and (problem := _flower_problem()):
        print(f"fedpeft: error: {problem}", file=sys.stderr)
        return 2
    if args.command == "keys":
        for key, (_, fld) in sorted(config_schema().items()):
            default = ",".join(fld.default) if isinstance(fld.default, tuple) else fld.default
            print(f"{key} = {default!r}")
        return 0
    from fedpeft.recovery.checkpoint import CheckpointError
    from fedpeft.running.deploy import DeploymentError
    from fedpeft.running.launch import resume_overrides, simulate
    from strategies import StrategyError

    try:
        if args.command == "deploy":
            return _deploy(args)
        if args.command == "report":
            return _report(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.resume and (args.experiment or args.sets):
            raise ConfigError("--resume continues a run as it was configured: give no experiment or --set")
        overrides = resume_overrides(args.resume) if args.resume else _overrides(args)
        simulate(overrides, _ray_options(args), engine=args.engine)
    except (ConfigError, StrategyError, CheckpointError, FileNotFoundError, DeploymentError) as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
