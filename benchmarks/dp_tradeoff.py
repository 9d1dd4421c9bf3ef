"""Privacy against accuracy: LoRA vs full fine-tuning under local DP-SGD (Opacus).

Accuracy after a fixed number of rounds at epsilon = inf (no DP), 8, 3 and 1 (each
client's noise chosen so that taking part in every round spends exactly that epsilon,
delta 1e-5), for LoRA and for full fine-tuning, with the wall time of the rounds and
DP-SGD's overhead as a ratio to non-private training of the same method.  FedPEFT (Sun
et al., 2022) reports that PEFT degrades less than full fine-tuning under DP; the table
shows whether that holds here.

    .venv/bin/python -m benchmarks.dp_tradeoff [--rounds 3 --steps 4 --clients 6]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks._common import RESULTS, table, write
from fedpeft.launch import RayOptions, simulate
from fedpeft.results import read_rounds
from fedpeft.runtime import quiet_libraries

METHODS = {"lora": {}, "full": {"train.learning-rate": 5e-5}}
EPSILONS = [None, 8.0, 3.0, 1.0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--clients", type=int, default=6)
    args = ap.parse_args()
    quiet_libraries()
    records, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for method, extra in METHODS.items():
            base_seconds = None
            for eps in EPSILONS:
                overrides = {
                    "num-rounds": args.rounds,
                    "num-clients": args.clients,
                    "min-train-clients": args.clients,
                    "device": "cpu",
                    "peft.method": method,
                    "data.partitioner": "iid",
                    "train.max-steps": args.steps,
                    "results-dir": tmp,
                    "run-name": f"{method}-{eps}",
                } | extra
                if eps is not None:
                    overrides |= {"dp.mode": "local", "dp.target-epsilon": eps, "dp.max-grad-norm": 1.0}
                rounds = read_rounds(Path(simulate(overrides, RayOptions())))
                seconds = sum(r["wall_seconds"] for r in rounds[1:])
                base_seconds = base_seconds or seconds
                rec = {
                    "method": method,
                    "epsilon": eps or float("inf"),
                    "accuracy": rounds[-1]["accuracy"],
                    "initial_accuracy": rounds[0]["accuracy"],
                    "max_epsilon_spent": rounds[-1]["max_epsilon"],
                    "round_seconds": seconds / args.rounds,
                    "overhead_vs_non_private": seconds / base_seconds,
                }
                records.append(rec)
                rows.append(
                    [
                        method,
                        "inf" if eps is None else eps,
                        f"{rec['accuracy']:.4f}",
                        "-" if eps is None else f"{rec['max_epsilon_spent']:.2f}",
                        f"{rec['round_seconds']:.1f}",
                        f"{rec['overhead_vs_non_private']:.2f}x",
                    ]
                )
    text = table(["method", "target eps", "accuracy", "eps spent", "s / round", "DP overhead"], rows)
    print(
        f"BBC News, IID, {args.clients} clients, {args.rounds} rounds, {args.steps} local steps of batch 16\n{text}"
    )
    (RESULTS / "dp_tradeoff.md").write_text(text + "\n")
    write("dp_tradeoff", {"settings": vars(args), "records": records})


if __name__ == "__main__":
    main()
