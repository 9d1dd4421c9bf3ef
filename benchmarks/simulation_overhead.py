"""Overhead of our Ray-backed Flower simulation against a plain in-process loop.

The same total local work -- same clients, steps, batch size, sequence length, seeds and
the same server-side evaluation each round -- is run (a) as a real simulation through
``fedpeft.running.launch.simulate`` (Flower's engine, Ray actors, protobuf-sized messages) and
(b) as a plain loop in this process over clients that share one model.  Reported: wall
seconds of each, the steady-state ratio b/a over rounds 1..R (start-up excluded), the
start-up itself, and how often each Ray worker built its model (once per worker, not
once per client call).

    .venv/bin/python -m benchmarks.simulation_overhead [--clients 6 --rounds 3 --steps 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import table, write
from fedpeft.config import RunConfig
from fedpeft.models import build_model, quiet_libraries
from fedpeft.results.records import read_rounds
from fedpeft.running.launch import RayOptions, simulate
from fedpeft.runtime import derive_seed
from fedpeft.tasks import get_task
from fedpeft.training import train_local


def in_process(cfg: RunConfig) -> list[float]:
    """Plain FedAvg loop, one shared model; seconds per round (train all + aggregate + evaluate)."""
    task = get_task(cfg)
    model = build_model(cfg, task.num_outputs(cfg))
    test = task.server_test_set(cfg)
    parts = [task.client_train_set(cfg, pid, cfg.num_clients) for pid in range(cfg.num_clients)]
    global_state = model.exchange_state()
    task.evaluate(model, test, cfg.train.eval_batch_size)  # round 0, as the simulation does
    times = []
    for rnd in range(1, cfg.num_rounds + 1):
        t = time.perf_counter()
        states, weights = [], []
        for pid, data in enumerate(parts):
            model.load_exchange_state(global_state)
            res = train_local(
                model, data, cfg.train, seed=derive_seed(cfg.seed, "train", rnd, pid), task=task
            )
            states.append(model.exchange_state())
            weights.append(res.num_examples)
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        global_state = {
            k: sum(wi * s[k] for wi, s in zip(w, states, strict=True)).astype(np.float32)
            for k in global_state
        }
        model.load_exchange_state(global_state)
        task.evaluate(model, test, cfg.train.eval_batch_size)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    quiet_libraries()
    overrides = {
        "num-clients": args.clients,
        "num-rounds": args.rounds,
        "min-train-clients": args.clients,
        "device": "cpu",
        "data.partitioner": "iid",
        "data.max-test-examples": 200,
        "model.max-length": args.max_length,
        "train.batch-size": args.batch_size,
        "train.max-steps": args.steps,
    }
    with tempfile.TemporaryDirectory() as tmp:
        overrides |= {"results-dir": tmp, "run-name": "overhead"}
        t = time.perf_counter()
        run_dir = simulate(overrides, RayOptions())
        ray_total = time.perf_counter() - t
        rounds = read_rounds(Path(run_dir))
        calls = [c for r in rounds[1:] for c in r["clients"]]
        loads = sorted({int(c["metrics"]["model-loads"]) for c in calls})
    ray_steady = sum(r["wall_seconds"] for r in rounds[1:])
    ray_startup = ray_total - ray_steady
    cfg = RunConfig.from_run_config(overrides)
    torch.set_num_threads(torch.get_num_threads())
    t = time.perf_counter()
    loop_rounds = in_process(cfg)
    loop_total = time.perf_counter() - t
    loop_steady = sum(loop_rounds)
    ratio = loop_steady / ray_steady
    print(
        table(
            ["path", "total s", "start-up s", f"rounds 1..{args.rounds} s", "per round s"],
            [
                ["(a) Ray simulation", ray_total, ray_startup, ray_steady, ray_steady / args.rounds],
                [
                    "(b) in-process loop",
                    loop_total,
                    loop_total - loop_steady,
                    loop_steady,
                    loop_steady / args.rounds,
                ],
            ],
        )
    )
    print(f"steady-state ratio b/a = {ratio:.3f} (target >= 0.9: our overhead <= 10%)")
    print(f"model builds per Ray worker process, over {len(calls)} client train calls: {loads}")
    write(
        "simulation_overhead",
        {
            "settings": vars(args),
            "ray": {
                "total_s": ray_total,
                "startup_s": ray_startup,
                "steady_s": ray_steady,
                "round_s": [r["wall_seconds"] for r in rounds[1:]],
            },
            "in_process": {"total_s": loop_total, "steady_s": loop_steady, "round_s": loop_rounds},
            "ratio_b_over_a": ratio,
            "accuracy_ray": rounds[-1]["accuracy"],
            "model_builds_per_worker": loads,
            "client_train_calls": len(calls),
        },
    )


if __name__ == "__main__":
    main()
