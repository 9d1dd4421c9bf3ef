"""``fedpeft`` command line: ``fedpeft run [EXPERIMENT.toml] [--set key=value ...] | --resume RESULTS_DIR``."""

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
    sub.add_parser("keys", help="list every run-config key with its default")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        for key, (_, fld) in sorted(config_schema().items()):
            default = ",".join(fld.default) if isinstance(fld.default, tuple) else fld.default
            print(f"{key} = {default!r}")
        return 0
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
