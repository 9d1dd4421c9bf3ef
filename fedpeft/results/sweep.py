"""``fedpeft sweep``: a grid (or list) of runs over any config keys, resumable.

A sweep file is TOML::

    # What it measures; how to launch it; how long it takes here.
    [sweep]
    name = "compeft-density"        # default: the file's stem
    experiment = "../compeft.toml"  # optional base experiment, relative to this file
    results-dir = "results/sweeps"  # runs land in <results-dir>/<name>/<point>/
    engine = "ray"                  # or "inprocess" (fedpeft.running.launch.ENGINES)
    jobs = 1                        # points at once (each in its own process)

    [base]                          # overrides shared by every point (like an experiment file)
    num-rounds = 5

    [grid]                          # the cartesian product of these lists
    "codec.density" = [0.01, 0.05, 0.1]
    seed = [0, 1, 2]

    [[points]]                      # optional explicit points; the grid applies to each
    label = "dense"
    "codec.name" = "none"

Every point is resolved and validated (unknown keys, bad values, registry names, the
dataset) before the first one runs.  Each point's folder is named after the values it
sets, so a rerun finds its earlier results: a finished point (all rounds recorded, the
final adapter written, the same config) is skipped, an interrupted one resumes from its
last checkpoint, one that never finished a round starts again.  A point that fails is
recorded and the sweep goes on; ``sweep.json`` in the sweep folder lists every point with
its status.  Feed the folder to ``fedpeft report``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fedpeft.config import ConfigError, ConfigValue, RunConfig, with_defaults
from fedpeft.files import atomic_write_text
from fedpeft.running.launch import ENGINES, RayOptions, check_run, load_experiment, resolve_config, simulate

MANIFEST = "sweep.json"
SWEEP_KEYS = ("name", "experiment", "results-dir", "engine", "jobs")
#: Keys that never distinguish two points (they name where a point lands).
NOT_VARIED = ("results-dir", "run-name", "resume")


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its folder name and its overrides."""

    name: str
    overrides: dict[str, ConfigValue]
    varied: dict[str, ConfigValue]  # what this point sets that is not the sweep's base


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file (see the module docstring for the format)."""

    name: str
    base: dict[str, ConfigValue]
    grid: dict[str, list[ConfigValue]]
    points: list[dict[str, ConfigValue]] = field(default_factory=lambda: [{}])
    results_dir: Path = Path("results/sweeps")
    engine: str = "ray"
    jobs: int = 1

    @property
    def folder(self) -> Path:
        return (self.results_dir / self.name).expanduser().resolve()

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Sweep:
        """Parse and check a sweep file; errors name the file and the offending key."""
        path = Path(path)
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
        unknown = set(doc) - {"sweep", "base", "grid", "points"}
        if unknown:
            raise ConfigError(
                f"{path}: unknown top-level table(s) {sorted(unknown)} (valid: sweep, base, grid, points)"
            )
        head = doc.get("sweep", {})
        if bad := set(head) - set(SWEEP_KEYS):
            raise ConfigError(
                f"{path}: unknown key(s) {sorted(bad)} in [sweep] (valid: {', '.join(SWEEP_KEYS)})"
            )
        base: dict[str, ConfigValue] = {}
        if "experiment" in head:
            base |= load_experiment(path.parent / str(head["experiment"]))
        base |= _flatten(doc.get("base", {}), f"{path} [base]")
        grid = _flatten(doc.get("grid", {}), f"{path} [grid]", lists=True)
        points = [_flatten(p, f"{path} [[points]]") for p in doc.get("points", [{}])]
        engine = str(head.get("engine", "ray"))
        if engine not in ENGINES:
            raise ConfigError(f"{path}: [sweep] engine = {engine!r} (valid: {', '.join(ENGINES)})")
        jobs = head.get("jobs", 1)
        if not isinstance(jobs, int) or jobs < 1:
            raise ConfigError(f"{path}: [sweep] jobs must be a positive integer, got {jobs!r}")
        for key in NOT_VARIED:
            if key in grid or any(key in p for p in points) or key in base:
                raise ConfigError(f"{path}: '{key}' is set by the sweep itself; use [sweep] results-dir")
        results = Path(str(head.get("results-dir", "results/sweeps")))
        return cls(str(head.get("name", path.stem)), base, grid, points or [{}], results, engine, jobs)

    # ------------------------------------------------------------------ expanding
    def expand(self) -> list[SweepPoint]:
        """Every point: each explicit point crossed with the grid, in file order."""
        keys = list(self.grid)
        out: list[SweepPoint] = []
        for point in self.points:
            label = point.get("label")
            settings = {k: v for k, v in point.items() if k != "label"}
            if clash := set(settings) & set(keys):
                raise ConfigError(f"sweep {self.name!r}: {sorted(clash)} set both in [[points]] and [grid]")
            for combo in itertools.product(*(self.grid[k] for k in keys)):
                varied = settings | dict(zip(keys, combo, strict=True))
                named = dict(zip(keys, combo, strict=True)) if label is not None else varied
                name = _point_name(str(label) if label is not None else None, named)
                out.append(SweepPoint(name, self.base | varied, varied))
        names = [p.name for p in out]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ConfigError(f"sweep {self.name!r}: points share a folder name {dupes}; give them labels")
        return out

    def resolve(self) -> list[tuple[SweepPoint, RunConfig, dict[str, ConfigValue]]]:
        """Validate every point before anything runs: (point, config, final overrides)."""
        resolved = []
        for point in self.expand():
            overrides = point.overrides | {"results-dir": str(self.folder), "run-name": point.name}
            try:
                cfg, final = resolve_config(overrides)
                check_run(cfg)
            except (ConfigError, ValueError) as err:
                raise ConfigError(f"sweep {self.name!r}, point {point.name!r}: {err}") from err
            resolved.append((point, cfg, final))
        return resolved


# ---------------------------------------------------------------------- state of a point
def point_status(run_dir: Path, cfg: RunConfig) -> str:
    """``done``, ``partial`` (a checkpoint to resume from), ``new``; or raises on a config clash."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        return "new"
    saved = with_defaults(json.loads(config_file.read_text()))  # keys added since count at default
    wanted = json.loads(json.dumps(cfg.to_run_config(), default=str))
    diff = sorted(k for k in set(saved) | set(wanted) if k != "resume" and saved.get(k) != wanted.get(k))
    if diff:
        raise ConfigError(
            f"{run_dir} holds a run with another config (keys {diff}); move it away, or give the "
            "sweep another name or results-dir"
        )
    from fedpeft.recovery.checkpoint import CHECKPOINT_FILE
    from fedpeft.results.records import ADAPTER_DIR, read_rounds

    rounds = read_rounds(run_dir)
    if (
        rounds
        and rounds[-1]["round"] == cfg.num_rounds
        and (run_dir / ADAPTER_DIR / "fedpeft.json").is_file()
    ):
        return "done"
    return "partial" if (run_dir / CHECKPOINT_FILE).is_file() else "new"


# ---------------------------------------------------------------------- running
Runner = Callable[[dict[str, ConfigValue]], Path]


def run_sweep(
    sweep: Sweep,
    ray: RayOptions | None = None,
    *,
    jobs: int | None = None,
    engine: str | None = None,
    echo: Callable[[str], None] = print,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Run every point not yet done; returns (and writes) the manifest.

    ``jobs`` > 1 runs points in parallel, each in its own ``fedpeft run`` process with an
    equal share of this machine's CPUs (or of ``ray.address``'s cluster); with one job
    they run one after another in this process.
    """
    ray = ray or RayOptions()
    jobs = jobs or sweep.jobs
    engine = engine or sweep.engine
    resolved = sweep.resolve()
    sweep.folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"name": sweep.name, "engine": engine, "points": {}}
    todo: list[tuple[SweepPoint, dict[str, ConfigValue]]] = []
    for point, cfg, final in resolved:
        status = point_status(sweep.folder / point.name, cfg)
        manifest["points"][point.name] = {"status": status, "varied": point.varied}
        if status == "done":
            echo(f"sweep {sweep.name}: {point.name}: done already, skipped")
            continue
        todo.append((point, final | {"resume": status == "partial"}))
    _write_manifest(sweep, manifest)
    if runner is None:
        runner = _in_this_process(ray, engine) if jobs == 1 else _in_subprocess(ray, engine, jobs)

    def run_one(numbered: tuple[int, tuple[SweepPoint, dict[str, ConfigValue]]]) -> None:
        number, (point, overrides) = numbered
        entry = manifest["points"][point.name]
        how = "resuming" if overrides["resume"] else "running"
        echo(f"sweep {sweep.name}: {how} {point.name} ({number}/{len(todo)} to run)")
        t0 = time.perf_counter()
        try:
            runner(overrides)
            entry.update(status="done", seconds=round(time.perf_counter() - t0, 1), error="")
        except Exception as err:  # one broken point must not stop the sweep
            entry.update(status="failed", error=f"{type(err).__name__}: {err}")
            echo(f"sweep {sweep.name}: {point.name} failed: {entry['error']}")
            if os.environ.get("FEDPEFT_DEBUG"):
                traceback.print_exc()
        _write_manifest(sweep, manifest)

    if jobs == 1:
        for numbered in enumerate(todo, 1):
            run_one(numbered)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(run_one, enumerate(todo, 1)))
    failed = [n for n, e in manifest["points"].items() if e["status"] == "failed"]
    echo(
        f"sweep {sweep.name}: {len(resolved) - len(failed)}/{len(resolved)} points done"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + f"; results in {sweep.folder} (fedpeft report {sweep.folder})"
    )
    return manifest


def _in_this_process(ray: RayOptions, engine: str) -> Runner:
    return lambda overrides: simulate(overrides, ray, engine=engine)


def _in_subprocess(ray: RayOptions, engine: str, jobs: int) -> Runner:
    """Each point as ``fedpeft run`` in a process of its own (Ray can't run two in one)."""
    share = max(1, (os.cpu_count() or 1) // jobs)

    def run(overrides: dict[str, ConfigValue]) -> Path:
        import tomli_w

        resume = bool(overrides.get("resume"))
        run_dir = Path(str(overrides["results-dir"])) / str(overrides["run-name"])
        with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as fh:
            tomli_w.dump({k: v for k, v in overrides.items() if k != "resume"}, fh)
        cmd = [sys.executable, "-m", "fedpeft.cli", "run"]
        cmd += ["--resume", str(run_dir)] if resume else [fh.name]
        cmd += ["--engine", engine, "--cpus-per-client", str(ray.cpus_per_client)]
        cmd += ["--ray-address", ray.address] if ray.address else ["--num-cpus", str(share)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        finally:
            os.unlink(fh.name)
        if proc.returncode != 0:
            raise RuntimeError(f"fedpeft run exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
        return run_dir

    return run


_MANIFEST_LOCK = threading.Lock()  # parallel points finish in their own threads


def _write_manifest(sweep: Sweep, manifest: Mapping[str, Any]) -> None:
    path = sweep.folder / MANIFEST
    with _MANIFEST_LOCK:
        atomic_write_text(path, json.dumps(manifest, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------- helpers
def _flatten(table: Mapping[str, Any], where: str, *, lists: bool = False) -> dict[str, Any]:
    """Nested TOML tables -> dotted keys; with ``lists`` every value must be a list."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= {f"{key}.{k}": v for k, v in _flatten(value, where, lists=lists).items()}
        elif lists:
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{where}: '{key}' must be a non-empty list of values, got {value!r}")
            out[key] = [_scalar(key, v, where) for v in value]
        else:
            out[key] = _scalar(key, value, where)
    return out


def _scalar(key: str, value: Any, where: str) -> ConfigValue:
    if isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"{where}: '{key}' must be a number, string or boolean, got {value!r}")


def _point_name(label: str | None, values: Mapping[str, ConfigValue]) -> str:
    """A readable folder name: ``label`` and/or ``key=value`` pairs, filesystem-safe."""
    parts = [label] if label else []
    parts += [f"{k}={_fmt(v)}" for k, v in values.items()]
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "-", "_".join(parts) or "base")
    return name[:180]


def _fmt(value: ConfigValue) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe(points: Sequence[SweepPoint]) -> str:
    """One line per point (``fedpeft sweep --dry-run``)."""
    return "\n".join(f"{p.name}: {json.dumps(p.varied)}" for p in points)
