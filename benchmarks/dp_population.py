"""User-level DP at population scale: DP-FedAvg with Poisson client sampling over 1,000 clients.

WordNet nouns (26 supersense classes, MiniLM), 1,000 clients (Dirichlet), each joining a
round independently with probability 0.05 (~50 per round), LoRA and FFA-LoRA, user-level
DP at epsilon 8 and 2 (delta = 1 / population, RDP accountant with sampling
amplification: the noise multiplier is chosen so that all rounds spend exactly that
epsilon) against the same runs without DP.  Every client's update is clipped to
``--clip`` on the server and the sum is divided by the expected cohort (the
fixed-denominator estimator the bound assumes).  A last pair of rows runs LoRA under DP-FTRL
(tree aggregation, fixed cohorts of 50, no amplification) at the same epsilons.  Runs over the in-process grid (the same
apps and messages as on Ray).  Each finished run is written at once, so a stopped
benchmark keeps what it measured.

    .venv/bin/python -m benchmarks.dp_population [--rounds 30 --seeds 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from typing import Any

from benchmarks._common import RESULTS, run_inprocess, table, write
from fedpeft.models import quiet_libraries

METHODS: dict[str, dict[str, Any]] = {
    "lora": {},
    "ffa-lora": {"strategy.name": "ffa-lora"},
    # DP-FTRL: fixed cohorts of 50, each client once per tree (a tree of 20 rounds covers
    # the 1,000 clients, then restarts), no sampling amplification; only private, compared
    # with LoRA's non-private row.
    "lora-ftrl": {"client-sampling": "fixed", "dp.central-mechanism": "tree", "dp.tree-restart-rounds": 20},
}
BASELINE = {"lora-ftrl": "lora"}  # whose non-private row a method is compared with
EPSILONS: list[float | None] = [None, 8.0, 2.0]


def settings(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "num-rounds": args.rounds,
        "num-clients": args.clients,
        "fraction-train": args.rate,
        "client-sampling": "poisson",
        "min-train-clients": 1,
        "device": args.device,
        "data.dataset": "wordnet-nouns",
        "data.partitioner": "dirichlet",
        "data.alpha": 1.0,
        "data.max-test-examples": args.test_examples,
        "model.max-length": 32,
        "peft.method": "lora",
        "lora.r": args.rank,
        "lora.alpha": 2 * args.rank,
        "train.batch-size": args.batch,
        "train.max-steps": args.steps,
        "train.learning-rate": args.lr,
    }


def run_one(args: argparse.Namespace, method: str, eps: float | None, seed: int, tmp: str) -> dict[str, Any]:
    overrides = settings(args, seed) | METHODS[method]
    if eps is not None:
        overrides |= {
            "dp.mode": "central",
            "dp.central-target-epsilon": eps,
            "dp.delta": 1.0 / args.clients,
            "dp.central-clipping-norm": args.clip,
        }
    name = f"{method}-{eps or 'inf'}-{seed}"
    _, rounds, seconds = run_inprocess(overrides, tmp, name)
    curve = [r["accuracy"] for r in rounds]
    return {
        "method": method,
        "epsilon": eps if eps is not None else float("inf"),
        "seed": seed,
        "final_accuracy": curve[-1],
        "best_accuracy": max(curve),
        "curve": curve,
        "epsilon_spent": rounds[-1].get("central_epsilon"),
        "cohorts": [len(r["clients"]) for r in rounds[1:]],
        "bytes_up_per_client": statistics.mean(c["bytes_up"] for r in rounds[1:] for c in r["clients"]),
        "seconds_per_round": seconds / len(rounds),
    }


def summarize(records: list[dict[str, Any]]) -> str:
    rows = []
    base = {
        m: statistics.mean(
            r["final_accuracy"] for r in records if r["method"] == m and r["epsilon"] == float("inf")
        )
        for m in METHODS
        if any(r["method"] == m and r["epsilon"] == float("inf") for r in records)
    }
    for method in METHODS:
        for eps in EPSILONS:
            eps_v = eps if eps is not None else float("inf")
            group = [r for r in records if r["method"] == method and r["epsilon"] == eps_v]
            if not group:
                continue
            acc = [r["final_accuracy"] for r in group]
            mean = statistics.mean(acc)
            spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
            ref = BASELINE.get(method, method)
            gap = "-" if eps is None or ref not in base else f"{100 * (mean - base[ref]):+.1f} pt"
            spent = [r["epsilon_spent"] for r in group if r["epsilon_spent"] is not None]
            rows.append(
                [
                    method,
                    "inf" if eps is None else f"{eps:g}",
                    len(group),
                    f"{100 * mean:.1f}% ± {100 * spread:.1f}",
                    gap,
                    f"{max(spent):.2f}" if spent else "-",
                    f"{statistics.mean(c for r in group for c in r['cohorts']):.1f}",
                    f"{statistics.mean(r['bytes_up_per_client'] for r in group) / 1e3:.1f} kB",
                    f"{statistics.mean(r['seconds_per_round'] for r in group):.1f}",
                ]
            )
    return table(
        [
            "method",
            "target eps",
            "seeds",
            "final accuracy",
            "vs non-private",
            "eps spent",
            "mean cohort",
            "up/client/round",
            "s/round",
        ],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument(
        "--rate", type=float, default=0.05, help="Poisson sampling probability per client and round"
    )
    ap.add_argument("--steps", type=int, default=2, help="local steps per sampled client")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--rank",
        type=int,
        default=1,
        help="LoRA rank: the noise's norm grows with the square root of the exchanged parameters",
    )
    ap.add_argument("--lr", type=float, default=1e-2, help="local AdamW learning rate")
    ap.add_argument("--clip", type=float, default=0.5, help="user-level clipping norm")
    ap.add_argument("--test-examples", type=int, default=500)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", default="", help="comma-separated method:eps pairs to run (default: all)")
    ap.add_argument("--resume", action="store_true", help="keep the runs in the results file; run the rest")
    args = ap.parse_args()
    quiet_libraries()
    wanted = {tuple(p.split(":")) for p in args.only.split(",") if p}
    records: list[dict[str, Any]] = []
    saved = RESULTS / "dp_population.json"
    if args.resume and saved.exists():  # keep the runs already measured, skip them below
        records = json.loads(saved.read_text())["records"]
    order = [
        ("lora", None),
        ("lora", 8.0),
        ("ffa-lora", 8.0),
        ("lora", 2.0),
        ("ffa-lora", 2.0),
        ("ffa-lora", None),
        ("lora-ftrl", 8.0),
        ("lora-ftrl", 2.0),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for method, eps in order:
                if wanted and (method, "inf" if eps is None else f"{eps:g}") not in wanted:
                    continue
                eps_v = eps if eps is not None else float("inf")
                if any((r["method"], r["epsilon"], r["seed"]) == (method, eps_v, seed) for r in records):
                    continue
                records.append(run_one(args, method, eps, seed, tmp))
                text = summarize(records)
                print(text, flush=True)
                (RESULTS / "dp_population.md").write_text(
                    f"WordNet nouns (26 classes), {args.clients} clients (Dirichlet 1.0), Poisson rate {args.rate}, "
                    f"{args.rounds} rounds of {args.steps} local AdamW steps of batch {args.batch} (lr {args.lr:g}), LoRA rank "
                    f"{args.rank} on query/value + head, user-level clip "
                    f"{args.clip}, delta 1/{args.clients}, RDP\n\n{text}\n"
                )
                write("dp_population", {"settings": vars(args), "records": records})


if __name__ == "__main__":
    main()
