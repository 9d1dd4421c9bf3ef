"""``fedpeft`` command line.

``fedpeft run [EXPERIMENT.toml] [--set key=value ...] | --resume RESULTS_DIR`` (simulation),
``fedpeft deploy [EXPERIMENT.toml] [--set key=value ...] [--supernodes N] [--tls]`` (a real
SuperLink and SuperNodes on this machine), ``fedpeft keys``.
"""

from __future__ import annotations

import argparse
import sys

from fedpeft.config import ConfigError, config_schema


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__)
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
    run.add_argument("--ray-address", default=None, help="join an existing Ray cluster (e.g. 127.0.0.1:6379)")
    run.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per client (default 1)")
    run.add_argument(
        "--gpus-per-client",
        type=float,
        default=None,
        help="Ray GPUs per client (default: 0.5 when CUDA is present, else 0)",
    )
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray may use (default: all)")
    run.add_argument("--object-store-mb", type=int, default=512, help="Ray object store size (MB)")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    _add_deploy(sub)
    sub.add_parser("keys", help="list every run-config key with its default")
    return parser


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


def _deploy(args: argparse.Namespace) -> int:
    """``fedpeft deploy``: one run on real Flower processes; prints results and traffic."""
    from fedpeft.deploy import DeploymentError, deploy
    from fedpeft.launch import load_experiment, parse_set
    from strategies import StrategyError

    try:
        overrides = load_experiment(args.experiment) if args.experiment else {}
        overrides |= parse_set(args.sets)
        result = deploy(overrides, supernodes=args.supernodes, tls=args.tls, work_dir=args.work_dir)
    except (ConfigError, StrategyError, FileNotFoundError, DeploymentError) as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    print(f"fedpeft deploy: run {result.run_id} {result.status} in {result.wall_seconds:.1f} s")
    print(f"fedpeft deploy: {result.traffic.summary()}")
    print(f"fedpeft deploy: results in {result.run_dir}; process logs in {result.work_dir}")
    return 0 if result.traffic.exact else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        for key, (_, fld) in sorted(config_schema().items()):
            default = ",".join(fld.default) if isinstance(fld.default, tuple) else fld.default
            print(f"{key} = {default!r}")
        return 0
    if args.command == "deploy":
        return _deploy(args)
    from fedpeft.checkpoint import CheckpointError
    from fedpeft.launch import RayOptions, load_experiment, parse_set, resume_overrides, simulate
    from strategies import StrategyError

    try:
        if args.resume and (args.experiment or args.sets):
            raise ConfigError("--resume continues a run as it was configured: give no experiment or --set")
        overrides = load_experiment(args.experiment) if args.experiment else {}
        overrides |= parse_set(args.sets)
        if args.resume:
            overrides = resume_overrides(args.resume)
        ray = RayOptions(
            cpus_per_client=args.cpus_per_client,
            gpus_per_client=args.gpus_per_client,
            num_cpus=args.num_cpus,
            object_store_mb=args.object_store_mb,
            address=args.ray_address,
            verbose=args.verbose,
        )
        simulate(overrides, ray)
    except (ConfigError, StrategyError, CheckpointError, FileNotFoundError) as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
