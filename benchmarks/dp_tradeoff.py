"""Local DP-SGD (Opacus) on the clients: privacy against accuracy, and what a private step costs.

Two sections:

* accuracy (default): federated runs over the in-process grid (the real apps and
  messages, no Ray start-up per run), each method without DP and under local DP-SGD at
  each target epsilon (each client's noise chosen so that taking part in every round
  spends exactly that epsilon at delta 1e-5, clipping at 1.0), with large logical
  batches (``train.batch-size``, expected Poisson size) trained in physical batches
  (``dp.max-physical-batch-size``): DP-SGD's noise on the mean gradient shrinks as
  1 / batch, so the default is WordNet nouns (10 supersenses), LoRA and FFA-LoRA, logical
  batches of 256 in physical batches of 64 (the committed table: 2 clients, 3 rounds of
  6 logical steps, lr 5e-3, about 20 minutes on 2 cores).  Writes ``results/dp_tradeoff.{json,md}``.
  (The earlier table, BBC News at batch 16, LoRA vs full fine-tuning over Ray, is
  ``--data bbc-news --logical-batch 16 --physical-batch 0 --methods lora,full --epsilons
  inf,8,3,1 --rounds 3 --steps 4 --clients 6``.)
* ``--modes``: the cost of one private step against non-private training of the same
  method, for each grad-sample mode (``dp.grad-sample-mode``: hooks, functorch, ghost)
  at a logical batch of 256 in physical batches of 32 and 256: seconds per logical step
  and peak memory, each configuration in a fresh child process (peak RSS, ``ru_maxrss``,
  only grows within a process; on CUDA ``torch.cuda.max_memory_allocated``).  Writes
  ``results/dp_modes.{json,md}``.

    .venv/bin/python -m benchmarks.dp_tradeoff [--rounds 3 --steps 6 --clients 2]
    .venv/bin/python -m benchmarks.dp_tradeoff --modes [--methods lora,ffa-lora]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks._common import RESULTS, run_inprocess, table, write
from fedpeft.models import quiet_libraries

# Run-config overrides of each method (FFA-LoRA: LoRA with A frozen; its strategy implies it).
METHODS: dict[str, dict[str, Any]] = {
    "lora": {},
    "ffa-lora": {"strategy.name": "ffa-lora"},
    "full": {"peft.method": "full", "train.learning-rate": 5e-5},
}
DATA: dict[str, dict[str, Any]] = {
    # 82k glosses: a seeded subsample keeps tokenizing and evaluation short.
    "wordnet-nouns": {
        "data.dataset": "wordnet-nouns",
        "data.num-classes": 10,
        "data.max-test-examples": 2000,
        "model.max-length": 32,
    },
    "bbc-news": {"data.dataset": "bbc-news"},
}
MODES = ("hooks", "functorch", "ghost")


# ---------------------------------------------------------------------- accuracy
def accuracy_overrides(args: argparse.Namespace, method: str, eps: float | None) -> dict[str, Any]:
    """The run config of one federated run of the accuracy section."""
    overrides: dict[str, Any] = {
        "seed": args.seed,
        "num-rounds": args.rounds,
        "num-clients": args.clients,
        "min-train-clients": args.clients,
        "device": args.device,
        "data.partitioner": "iid",
        "train.batch-size": args.logical_batch,
        "train.max-steps": args.steps,
        "train.learning-rate": args.lr,
    } | DATA[args.data]
    overrides["data.max-examples"] = 20_000 if args.max_examples is None else args.max_examples
    overrides |= METHODS[method]
    if eps is not None:
        overrides |= {
            "dp.mode": "local",
            "dp.target-epsilon": eps,
            "dp.max-grad-norm": 1.0,
            "dp.max-physical-batch-size": args.physical_batch,
            "dp.grad-sample-mode": args.grad_sample_mode,
        }
    return overrides


def run_accuracy(args: argparse.Namespace) -> None:
    """Every method at every target epsilon; the files are rewritten after each run, so a
    stopped benchmark keeps what it measured."""
    methods = [m for m in args.methods.split(",") if m]
    epsilons = [None if e in ("inf", "none") else float(e) for e in args.epsilons.split(",") if e]
    settings = {k: v for k, v in vars(args).items() if k != "modes"}
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for eps in epsilons:
                name = f"{method}-{'inf' if eps is None else eps}"
                _, rounds, wall = run_inprocess(accuracy_overrides(args, method, eps), tmp, name)
                trained = rounds[1:]
                records.append(
                    {
                        "method": method,
                        "epsilon": float("inf") if eps is None else eps,
                        "accuracy": rounds[-1]["accuracy"],
                        "initial_accuracy": rounds[0]["accuracy"],
                        "curve": [r["accuracy"] for r in rounds],
                        "max_epsilon_spent": rounds[-1].get("max_epsilon"),
                        "round_seconds": sum(r["wall_seconds"] for r in trained) / max(len(trained), 1),
                        "wall_seconds": wall,
                    }
                )
                text = accuracy_table(records)
                print(text, flush=True)
                head = (
                    f"{args.data}, IID, {args.clients} clients, {args.rounds} rounds of {args.steps} local "
                    f"steps, logical batch {args.logical_batch} (DP: physical {args.physical_batch or 'same'}, "
                    f"{args.grad_sample_mode}), lr {args.lr:g}, delta 1e-5, clip 1.0"
                )
                (RESULTS / f"dp_tradeoff{args.tag}.md").write_text(f"{head}\n\n{text}\n")
                write(f"dp_tradeoff{args.tag}", {"settings": settings, "records": records})


def accuracy_table(records: list[dict[str, Any]]) -> str:
    rows = []
    for rec in records:
        base = next(
            (r for r in records if r["method"] == rec["method"] and r["epsilon"] == float("inf")), None
        )
        private = rec["epsilon"] != float("inf")
        rows.append(
            [
                rec["method"],
                f"{rec['epsilon']:g}",
                f"{100 * rec['accuracy']:.1f}%",
                f"{100 * (rec['accuracy'] - base['accuracy']):+.1f} pt" if base and private else "-",
                f"{rec['max_epsilon_spent']:.2f}"
                if private and rec["max_epsilon_spent"] is not None
                else "-",
                f"{rec['round_seconds']:.1f}",
                f"{rec['round_seconds'] / base['round_seconds']:.2f}x" if base else "-",
            ]
        )
    return table(
        [
            "method",
            "target eps",
            "accuracy",
            "vs non-private",
            "eps spent",
            "s / round",
            "time vs non-private",
        ],
        rows,
    )


# ---------------------------------------------------------------------- modes: one child per point
def mode_points(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration of the modes section: non-private first, then each mode x physical batch."""
    points = []
    for method in (m for m in args.methods.split(",") if m):
        points.append({"method": method, "mode": "non-private", "physical": args.logical_batch})
        for mode in MODES:
            for physical in (int(p) for p in args.physical_batches.split(",")):
                points.append({"method": method, "mode": mode, "physical": physical})
    return points


def measure_point(point: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: one warm-up step, then ``args.repeats`` timed logical steps of
    ``args.logical_batch`` examples; seconds per step and the process's peak memory."""
    import dataclasses

    import torch

    from fedpeft.config import RunConfig
    from fedpeft.models import build_model
    from fedpeft.privacy import RoundPlan, train_private
    from fedpeft.tasks import get_task
    from fedpeft.training import Encoded, train_local

    quiet_libraries()
    overrides = {
        "device": args.device,
        "num-clients": 1,
        "min-train-clients": 1,
        "data.partitioner": "iid",
        "data.max-examples": 4096 if args.max_examples is None else args.max_examples,
        "train.batch-size": args.logical_batch,
        "dp.mode": "local",
        "dp.grad-sample-mode": point["mode"] if point["mode"] in MODES else "hooks",
        "dp.max-physical-batch-size": point["physical"],
    } | DATA[args.data]
    if point["method"] == "ffa-lora":
        overrides["lora.freeze-a"] = True
    elif point["method"] != "lora":
        overrides["peft.method"] = point["method"]
    cfg = RunConfig.from_run_config(overrides)
    task = get_task(cfg)
    data = task.client_train_set(cfg, 0, 1)
    assert isinstance(data, Encoded)  # a classification task: token ids, masks, labels
    model = build_model(cfg, task.num_outputs(cfg))
    cuda = model.device.type == "cuda"
    setup_rss = _maxrss_mib()

    def step(batch: int, seed: int) -> tuple[float, int]:
        train = dataclasses.replace(cfg.train, batch_size=batch, max_steps=1)
        t0 = time.perf_counter()
        if point["mode"] == "non-private":
            result = train_local(model, data, train, seed=seed, task=task)
        else:  # one logical step at Poisson rate batch / n; the same draw for every mode
            plan = RoundPlan(1.0, batch / len(data), 1)
            result = train_private(model, data, train, plan, cfg.dp, seed, task=task)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, result.num_examples

    step(min(32, args.logical_batch), seed=100)  # warm-up: lazy initialisation, allocator
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timed = [step(args.logical_batch, seed=i) for i in range(args.repeats)]
    # Poisson batches vary around the logical size: time per logical-batch-size examples.
    per_step = [s * args.logical_batch / max(n, 1) for s, n in timed]
    return point | {
        "seconds_per_step": statistics.median(per_step),
        "rows": [n for _, n in timed],
        "peak_rss_mib": _maxrss_mib(),
        "setup_rss_mib": setup_rss,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "trainable": model.num_trainable,
        "examples": len(data),
    }


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_modes(args: argparse.Namespace) -> None:
    """Each configuration in its own child process; one table with ratios to non-private."""
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for point in mode_points(args):
        child = [sys.executable, "-m", "benchmarks.dp_tradeoff", "--measure", json.dumps(point)]
        child += _forwarded(args)
        out = subprocess.run(child, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"measuring {point} failed (exit {out.returncode})")
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rec["load_average"] = os.getloadavg()[0]
        records.append(rec)
        print(
            f"{point}: {rec['seconds_per_step']:.2f} s / step, peak RSS {rec['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    text = modes_table(records)
    cpu = records[0]["cuda_peak_mib"] is None
    head = (
        f"{args.data}, MiniLM, {records[0]['examples']} examples, max length {DATA[args.data].get('model.max-length', 64)}, "
        f"logical batch {args.logical_batch} (Poisson for DP), median of {args.repeats} timed step(s) after a "
        f"warm-up, {'peak RSS of a fresh process per row' if cpu else 'peak CUDA memory allocated'}; "
        f"{time.perf_counter() - started:.0f} s in all, 1-minute load average "
        f"{statistics.mean(r['load_average'] for r in records):.1f} on {os.cpu_count()} CPUs "
        "(times are shared with whatever else ran; memory is not)"
    )
    print(f"{head}\n{text}")
    (RESULTS / f"dp_modes{args.tag}.md").write_text(f"{head}\n\n{text}\n")
    write(f"dp_modes{args.tag}", {"settings": {k: v for k, v in vars(args).items()}, "records": records})


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The settings a child needs, as command-line flags."""
    return [
        f"--data={args.data}",
        f"--device={args.device}",
        f"--logical-batch={args.logical_batch}",
        *([] if args.max_examples is None else [f"--max-examples={args.max_examples}"]),
        f"--repeats={args.repeats}",
    ]


def modes_table(records: list[dict[str, Any]]) -> str:
    rows = []
    cpu = records[0]["cuda_peak_mib"] is None
    for rec in records:
        base = next(r for r in records if r["method"] == rec["method"] and r["mode"] == "non-private")
        memory = "peak_rss_mib" if cpu else "cuda_peak_mib"
        rows.append(
            [
                rec["method"],
                rec["mode"] if rec["mode"] == "non-private" else f"DP-SGD {rec['mode']}",
                rec["physical"],
                f"{rec['seconds_per_step']:.2f}",
                f"{rec['seconds_per_step'] / base['seconds_per_step']:.2f}x",
                f"{rec[memory]:.0f}",
                f"{rec[memory] / base[memory]:.2f}x",
            ]
            + ([f"{max(rec['peak_rss_mib'] - rec['setup_rss_mib'], 0):.0f}"] if cpu else [])
        )
    memory_head = "peak RSS MiB" if cpu else "peak CUDA MiB"
    return table(
        [
            "method",
            "training",
            "physical batch",
            "s / logical step",
            "time ratio",
            memory_head,
            "memory ratio",
        ]
        + (["MiB over loaded model"] if cpu else []),
        rows,
    )


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", action="store_true", help="the cost section (seconds, memory per mode)")
    ap.add_argument("--data", choices=sorted(DATA), default="wordnet-nouns")
    ap.add_argument("--methods", default=None, help="comma-separated: lora, ffa-lora, full")
    ap.add_argument(
        "--logical-batch", type=int, default=256, help="train.batch-size (expected Poisson batch)"
    )
    ap.add_argument("--physical-batch", type=int, default=64, help="dp.max-physical-batch-size (0: no split)")
    ap.add_argument("--grad-sample-mode", choices=MODES, default="hooks")
    ap.add_argument("--epsilons", default="inf,8", help="comma-separated target epsilons; inf: no DP")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="local logical steps per client and round")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help="data.max-examples (0: all; default 20,000, --modes 4,096)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--physical-batches", default="32,256", help="--modes: the physical batches measured")
    ap.add_argument("--repeats", type=int, default=1, help="--modes: timed steps per configuration")
    ap.add_argument("--tag", default="", help="suffix of the results files (e.g. _smoke)")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child process of --modes
    args = ap.parse_args()
    args.methods = args.methods or "lora,ffa-lora"
    quiet_libraries()
    if args.measure:
        print(json.dumps(measure_point(json.loads(args.measure), args)))
    elif args.modes:
        run_modes(args)
    else:
        run_accuracy(args)


if __name__ == "__main__":
    main()
