"""ComPEFT density sweep: accuracy and total bytes (up + down) of dense LoRA, the codec at
densities 1/5/10/20% with and without error feedback, and full-model FedAvg.

BBC News (and WordNet nouns with --wordnet), Dirichlet 0.5, 10 clients, real Ray-backed
simulations.  The headline figure is the ratio of full-model FedAvg bytes to ComPEFT
LoRA bytes.  Local work is capped (--steps) so the sweep fits a laptop; raise it for
paper-grade numbers.

    .venv/bin/python -m benchmarks.compeft_sweep [--rounds 5 --steps 4]   # ~16 min on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks._common import RESULTS, table, write
from fedpeft.launch import RayOptions, simulate
from fedpeft.results import human_bytes, read_rounds
from fedpeft.runtime import quiet_libraries


def variants(downlink: str, skip_full: bool) -> list[tuple[str, dict]]:
    # Full fine-tuning diverges at LoRA's learning rate (2e-3): it gets the usual 5e-5.
    full = {"peft.method": "full", "train.learning-rate": 5e-5}
    out: list[tuple[str, dict]] = (
        [("dense LoRA", {})] if skip_full else [("full-model FedAvg", full), ("dense LoRA", {})]
    )
    for d in (0.01, 0.05, 0.10, 0.20):
        for ef in (True, False):
            out.append(
                (
                    f"ComPEFT {d:.0%}{'' if ef else ' no-EF'}",
                    {
                        "codec.name": "compeft",
                        "codec.density": d,
                        "codec.error-feedback": ef,
                        "codec.downlink": downlink,
                    },
                )
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--wordnet", action="store_true", help="also sweep WordNet nouns (10 classes)")
    ap.add_argument(
        "--downlink", choices=["compeft", "fp32", "fp16"], default="compeft", help="codec runs' downlink"
    )
    ap.add_argument(
        "--full-bytes",
        type=float,
        default=0.0,
        help="total bytes of full-model FedAvg from an earlier sweep (skips that run)",
    )
    ap.add_argument("--tag", default="", help="suffix of the results files")
    args = ap.parse_args()
    quiet_libraries()
    datasets = {"bbc-news": {}} | (
        {"wordnet-nouns": {"data.num-classes": 10, "data.max-examples": 20000}} if args.wordnet else {}
    )
    figures: dict[str, list[dict]] = {}
    md = []
    for dataset, extra in datasets.items():
        rows, records = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, overrides) in enumerate(variants(args.downlink, args.full_bytes > 0)):
                base = {
                    "num-rounds": args.rounds,
                    "num-clients": 10,
                    "data.dataset": dataset,
                    "data.partitioner": "dirichlet",
                    "data.alpha": 0.5,
                    "train.max-steps": args.steps,
                    "device": "cpu",
                    "results-dir": tmp,
                    "run-name": f"v{i}",
                }
                rounds = read_rounds(Path(simulate(base | extra | overrides, RayOptions())))
                last = rounds[-1]
                records.append(
                    {
                        "variant": name,
                        "final_accuracy": last["accuracy"],
                        "best_accuracy": max(r["accuracy"] for r in rounds),
                        "bytes_up": last["cum_bytes_up"],
                        "bytes_down": last["cum_bytes_down"],
                        "bytes_total": last["cum_bytes_up"] + last["cum_bytes_down"],
                    }
                )
        if args.full_bytes > 0:
            half = args.full_bytes / 2
            earlier = {
                "variant": "full-model FedAvg (earlier sweep)",
                "final_accuracy": float("nan"),
                "best_accuracy": float("nan"),
                "bytes_up": half,
                "bytes_down": half,
                "bytes_total": args.full_bytes,
            }
            records.insert(0, earlier)
        full = records[0]["bytes_total"]
        dense = records[1]["bytes_total"]
        for rec in records:
            rec["full_over_this"] = full / rec["bytes_total"]
            rec["dense_lora_over_this"] = dense / rec["bytes_total"]
            rows.append(
                [
                    rec["variant"],
                    f"{rec['final_accuracy']:.4f}",
                    human_bytes(rec["bytes_up"]),
                    human_bytes(rec["bytes_down"]),
                    human_bytes(rec["bytes_total"]),
                    f"{rec['full_over_this']:.0f}x",
                    f"{rec['dense_lora_over_this']:.1f}x",
                ]
            )
        text = table(
            ["variant", "final acc", "up", "down", "total", "full / this", "dense LoRA / this"], rows
        )
        print(
            f"\n{dataset}: 10 clients, Dirichlet 0.5, {args.rounds} rounds, {args.steps} local steps\n{text}"
        )
        md.append(
            f"### {dataset} (10 clients, Dirichlet 0.5, {args.rounds} rounds, {args.steps} local steps, "
            f"codec downlink {args.downlink})\n\n{text}\n"
        )
        figures[dataset] = records
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"compeft_sweep{args.tag}.md").write_text("\n".join(md))
    write(f"compeft_sweep{args.tag}", {"settings": vars(args), **figures})


if __name__ == "__main__":
    main()
