"""Per-round wall time and peak memory as the number of virtual clients grows.

For each total (default 10, 100, 1,000, 10,000) one real simulation runs through
``fedpeft.running.launch.simulate`` (Flower's engine on Ray, the real ServerApp and ClientApp,
MiniLM + LoRA, WordNet nouns split IID) with 10 clients sampled per round and the
ComPEFT codec on with error feedback, so every client that has trained keeps a
persistent state (its residual, the codec's copy of the global) in ``Context.state``
and on disk.

Each point runs in a fresh child process (so no point inherits another's heap); this
process samples the RSS of the child's whole process tree (driver, GCS, raylet, every
Ray worker) every ``--interval`` seconds and splits the samples by round, using the
round records as they appear in ``rounds.jsonl``.  Reported per total: round 0
(Ray start, discovery of every node, initial evaluation) apart from the steady rounds
1..R; the steady per-round time relative to the smallest total; the peak RSS of the
tree and of the driver alone; and the stored per-client state (latest file per client,
i.e. what ``Context.state`` holds in memory, and all state files on disk), so memory
growth can be compared with it.

    .venv/bin/python -m benchmarks.scale [--totals 10,100,1000,10000 --rounds 4 --steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, table, write

SAMPLED = 10


def overrides_for(total: int, args: argparse.Namespace, results_dir: str) -> dict[str, Any]:
    return {
        "num-clients": total,
        "num-rounds": args.rounds,
        "fraction-train": SAMPLED / total,
        "min-train-clients": SAMPLED,
        "fraction-evaluate": 0.0,
        "device": "cpu",
        "results-dir": results_dir,
        "run-name": f"scale-{total}",
        "data.dataset": "wordnet-nouns",
        "data.partitioner": "iid",
        "data.num-classes": args.num_classes,
        "data.max-test-examples": args.test_examples,
        "model.max-length": args.max_length,
        "peft.method": "lora",
        "train.batch-size": args.batch_size,
        "train.max-steps": args.steps,
        "codec.name": "compeft",
        "codec.density": args.density,
        "codec.error-feedback": True,
    }


# ---------------------------------------------------------------------- child: one point
def run_point(total: int, args: argparse.Namespace, results_dir: str) -> None:
    from fedpeft.models import quiet_libraries
    from fedpeft.running.launch import RayOptions, simulate

    quiet_libraries()
    simulate(overrides_for(total, args, results_dir), RayOptions(cpus_per_client=1.0))


# ---------------------------------------------------------------------- parent: sampling
def tree_rss(proc: Any) -> tuple[int, int, int]:
    """(RSS of the tree, RSS of the root, processes) in bytes; vanished processes are skipped."""
    import psutil

    try:
        root = proc.memory_info().rss
        kids = proc.children(recursive=True)
    except psutil.Error:
        return 0, 0, 0
    total = root
    for kid in kids:
        try:
            total += kid.memory_info().rss
        except psutil.Error:
            continue
    return total, root, 1 + len(kids)


class Sampler(threading.Thread):
    """Peak tree RSS (and driver RSS) per phase; a phase ends when a round record appears."""

    def __init__(self, pid: int, rounds_file: Path, interval: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.rounds_file = rounds_file
        self.interval = interval
        self.stop = threading.Event()
        # phase i = until round record i is written (phase 0: start-up + discovery + round 0)
        self.peaks: dict[int, dict[str, int]] = {}
        self.max_procs = 0

    def _round_lines(self) -> int:
        try:
            with self.rounds_file.open("rb") as fh:
                return fh.read().count(b"\n")
        except OSError:
            return 0

    def run(self) -> None:
        while not self.stop.is_set():
            tree, root, n = tree_rss(self.proc)
            phase = self._round_lines()
            peak = self.peaks.setdefault(phase, {"tree": 0, "driver": 0})
            peak["tree"] = max(peak["tree"], tree)
            peak["driver"] = max(peak["driver"], root)
            self.max_procs = max(self.max_procs, n)
            self.stop.wait(self.interval)


def state_sizes(run_dir: Path) -> dict[str, int]:
    """Stored client state: latest file per client (what Context.state holds) and all files."""
    clients = run_dir / "clients"
    latest = on_disk = count = 0
    if clients.is_dir():
        for folder in clients.iterdir():
            files = sorted(folder.glob("round-*.state"))
            if files:
                count += 1
                latest += files[-1].stat().st_size
                on_disk += sum(f.stat().st_size for f in files)
    ckpt = run_dir / "checkpoint.bin"
    return {
        "clients_with_state": count,
        "state_in_memory_bytes": latest,
        "state_on_disk_bytes": on_disk,
        "checkpoint_bytes": ckpt.stat().st_size if ckpt.is_file() else 0,
        "partitions_json_bytes": (run_dir / "partitions.json").stat().st_size
        if (run_dir / "partitions.json").is_file()
        else 0,
    }


def measure(total: int, args: argparse.Namespace, results_dir: str) -> dict[str, Any]:
    run_dir = Path(results_dir) / f"scale-{total}"
    cmd = [sys.executable, "-m", "benchmarks.scale", "--one", str(total), "--results-dir", results_dir]
    cmd += _forward(args)
    env = dict(os.environ)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rs", dir=env.get("RAY_TMPDIR"))
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("RAY_worker_niceness", "0")  # workers at the driver's priority (launch.engine_environment)
    load_before = os.getloadavg()
    t = time.perf_counter()
    child = subprocess.Popen(cmd, env=env)
    sampler = Sampler(child.pid, run_dir / "rounds.jsonl", args.interval)
    sampler.start()
    rc = child.wait()
    elapsed = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    if rc != 0:
        raise RuntimeError(f"the run with {total} clients failed (exit {rc})")
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line]
    steady = [r["wall_seconds"] for r in rounds[1:]]
    peaks = [sampler.peaks.get(i, {"tree": 0, "driver": 0}) for i in range(len(rounds))]
    sampled = sorted({c["partition_id"] for r in rounds[1:] for c in r["clients"]})
    return {
        "total_clients": total,
        "process_total_s": elapsed,
        "round0_s": rounds[0]["wall_seconds"],
        "round_s": steady,
        "steady_round_s": sum(steady) / len(steady),
        "clients_per_round": [len(r["clients"]) for r in rounds[1:]],
        "distinct_clients_trained": len(sampled),
        "accuracy": [r["accuracy"] for r in rounds],
        "peak_tree_rss_bytes": max(p["tree"] for p in sampler.peaks.values()),
        "peak_driver_rss_bytes": max(p["driver"] for p in sampler.peaks.values()),
        "peak_tree_rss_by_round_bytes": [p["tree"] for p in peaks],
        "peak_driver_rss_by_round_bytes": [p["driver"] for p in peaks],
        "max_processes": sampler.max_procs,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        **state_sizes(run_dir),
    }


def _forward(args: argparse.Namespace) -> list[str]:
    keys = ("rounds", "steps", "batch_size", "max_length", "num_classes", "test_examples", "density")
    out: list[str] = []
    for key in keys:
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


def mb(n: float) -> float:
    return n / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--totals", default="10,100,1000,10000")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--test-examples", type=int, default=200)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--interval", type=float, default=0.1, help="RSS sampling period, seconds")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--results-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the runs' results folders (printed)")
    ap.add_argument("--out", default="scale", help="results file name (benchmarks/results/<out>.*)")
    args = ap.parse_args()
    if args.one:
        run_point(args.one, args, args.results_dir)
        return
    totals = [int(t) for t in args.totals.split(",")]
    tmp = tempfile.mkdtemp(prefix="fedpeft-scale-")
    points = []
    for total in totals:
        print(f"=== {total} virtual clients, {SAMPLED} per round", flush=True)
        points.append(measure(total, args, tmp))
        write(args.out, {"partial": True, "points": points})  # kept if a later point does not finish
        print(
            json.dumps({k: v for k, v in points[-1].items() if not k.endswith("by_round_bytes")}), flush=True
        )
    base = points[0]
    rows = []
    for p in points:
        p["steady_ratio_vs_smallest"] = p["steady_round_s"] / base["steady_round_s"]
        p["tree_growth_vs_smallest_bytes"] = p["peak_tree_rss_bytes"] - base["peak_tree_rss_bytes"]
        p["driver_growth_vs_smallest_bytes"] = p["peak_driver_rss_bytes"] - base["peak_driver_rss_bytes"]
        p["state_growth_vs_smallest_bytes"] = p["state_in_memory_bytes"] - base["state_in_memory_bytes"]
        rows.append(
            [
                p["total_clients"],
                p["round0_s"],
                p["steady_round_s"],
                p["steady_ratio_vs_smallest"],
                mb(p["peak_tree_rss_bytes"]),
                mb(p["peak_driver_rss_bytes"]),
                mb(p["driver_growth_vs_smallest_bytes"]),
                mb(p["state_in_memory_bytes"]),
                mb(p["state_on_disk_bytes"]),
                mb(p["checkpoint_bytes"]),
            ]
        )
    headers = [
        "clients",
        "round 0 s (discovery)",
        "steady s/round",
        f"x vs {base['total_clients']}",
        "peak tree RSS MB",
        "peak driver RSS MB",
        "driver growth MB",
        "client state MB (memory)",
        "client state MB (disk)",
        "checkpoint MB",
    ]
    text = table(headers, rows)
    print(text)
    settings = {k: v for k, v in vars(args).items() if k not in ("one", "results_dir")}
    settings["sampled_per_round"] = SAMPLED
    write(args.out, {"settings": settings, "points": points})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(
        "# Scale: per-round cost vs total virtual clients\n\n"
        f"Command: `python -m benchmarks.scale --totals {args.totals} --rounds {args.rounds} "
        f"--steps {args.steps}`; {SAMPLED} clients sampled per round, ComPEFT with error feedback, "
        "MiniLM + LoRA r=8, WordNet nouns IID. Round 0 = Ray start-up is outside it; it is discovery "
        "of every node plus the initial evaluation. Steady = mean of rounds 1..R. RSS = sum over "
        "the driver and every Ray process (shared pages counted once per process).\n\n" + text + "\n"
    )
    if args.keep:
        print(f"runs kept in {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
