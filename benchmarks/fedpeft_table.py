"""The FedPEFT comparison on this machine's data, and LoRA aggregation under mixed ranks.

Part 1 (FedPEFT, Sun et al. 2022): for every registered PEFT method, the trainable (=
exchanged) parameters, the bytes per client per round (serialized messages, both ways)
and the global accuracy after a fixed budget of rounds, on BBC News with IID and
Dirichlet 0.1 partitions (``--datasets wordnet-nouns --skip-lora-part --tag _wordnet``:
WordNet nouns, 10 classes).

Part 2: LoRA FedAvg vs FFA-LoRA vs FlexLoRA vs FLoRA.  FlexLoRA and FLoRA run with
heterogeneous ranks (2, 4, 8, 16 cycled over the clients) and at a uniform rank 8;
FedAvg and FFA-LoRA cannot mix ranks (the factors' shapes differ), so they run at rank 8.

Runs use the real ServerApp and ClientApp over the in-process grid (``fedpeft.running.inprocess``:
the same messages, byte meter and records as on Ray, without Ray's start-up per run).
Every method gets its own learning rate (the table lists it; none was tuned beyond a
literature default).  Writes ``benchmarks/results/fedpeft_table.{json,md,png}``.

    .venv/bin/python -m benchmarks.fedpeft_table [--rounds 5 --steps 5 --clients 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, run_inprocess, table, write
from fedpeft.config import RunConfig
from fedpeft.models import METHODS, get_model, quiet_libraries
from fedpeft.results.records import human_bytes
from fedpeft.tasks import get_task

# AdamW learning rates: LoRA's default; the usual 5e-5 for full fine-tuning; prompt-style
# methods and single-vector methods need larger steps (Lester et al.; Liu et al.).
LEARNING_RATES = {
    "lora": 2e-3,
    "full": 5e-5,
    "head": 1e-2,
    "bitfit": 3e-3,
    "adapter": 2e-3,
    "prompt": 3e-2,
    "prefix": 1e-2,
    "ia3": 1e-2,
}
PARTITIONS = {
    "iid": {"data.partitioner": "iid"},
    "dir0.1": {"data.partitioner": "dirichlet", "data.alpha": 0.1},
}
HETERO = "2,4,8,16"


def run(overrides: dict[str, Any], tmp: str, name: str) -> dict[str, Any]:
    """One federation in-process; its figures."""
    _, rounds, wall = run_inprocess(overrides, tmp, name)
    trained = rounds[1:]
    per_client_up = [c["bytes_up"] for r in trained for c in r["clients"] if c["ok"]]
    per_client_down = [c["bytes_down"] for r in trained for c in r["clients"]]
    trainable = json.loads((Path(tmp) / name / "adapter" / "fedpeft.json").read_text())["exchanged"]
    return {
        "accuracy": rounds[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rounds),
        "initial_accuracy": rounds[0]["accuracy"],
        "accuracy_by_round": [r["accuracy"] for r in rounds],
        "bytes_up_per_client_round": max(per_client_up, default=0),
        "bytes_down_per_client_round": max(per_client_down, default=0),
        "total_bytes": rounds[-1]["cum_bytes_up"] + rounds[-1]["cum_bytes_down"],
        "exchanged_tensors": len(trainable),
        "wall_seconds": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="local steps of batch 16 per round")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--methods", default=",".join(sorted(METHODS)))
    ap.add_argument(
        "--datasets", default="bbc-news", help="comma-separated: bbc-news, wordnet-nouns (10 classes)"
    )
    ap.add_argument("--skip-lora-part", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the results files (e.g. _wordnet)")
    args = ap.parse_args()
    quiet_libraries()
    base = {
        "num-rounds": args.rounds,
        "num-clients": args.clients,
        "min-train-clients": args.clients,
        "device": "auto",
        "train.max-steps": args.steps,
        "train.batch-size": 16,
    }
    known = {
        "bbc-news": {},
        # 82k glosses: 20k of them, and a 2,000-example server test split, keep a run short.
        "wordnet-nouns": {
            "data.num-classes": 10,
            "data.max-examples": 20_000,
            "data.max-test-examples": 2_000,
        },
    }
    datasets = {name: known[name] for name in args.datasets.split(",") if name}
    methods = [m for m in args.methods.split(",") if m]
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, dextra in datasets.items():
            for part, pextra in PARTITIONS.items():
                for method in methods:
                    o = base | dextra | pextra | {"data.dataset": dataset, "peft.method": method}
                    o["train.learning-rate"] = LEARNING_RATES.get(method, 2e-3)
                    cfg = RunConfig.from_run_config(o)
                    rec = {
                        "part": "methods",
                        "dataset": dataset,
                        "partition": part,
                        "method": method,
                        "learning_rate": o["train.learning-rate"],
                        "trainable": get_model(cfg, get_task(cfg).num_outputs(cfg)).num_trainable,
                    } | run(o, tmp, f"{dataset}-{part}-{method}")
                    records.append(rec)
                    print(_line(rec), flush=True)
        if not args.skip_lora_part:
            lora = base | PARTITIONS["dir0.1"] | {"peft.method": "lora", "train.learning-rate": 2e-3}
            variants = [
                ("fedavg", "8", lora),
                ("ffa-lora", "8", lora | {"strategy.name": "ffa-lora"}),
                ("flexlora", "8", lora | {"strategy.name": "flexlora"}),
                ("flora", "8", lora | {"strategy.name": "flora"}),
                ("flexlora", HETERO, lora | {"strategy.name": "flexlora", "lora.ranks": HETERO}),
                ("flora", HETERO, lora | {"strategy.name": "flora", "lora.ranks": HETERO}),
            ]
            for strategy, ranks, o in variants:
                reuse = next(
                    (
                        r
                        for r in records
                        if strategy == "fedavg" and r["method"] == "lora" and r["partition"] == "dir0.1"
                    ),
                    None,
                )
                figures = (
                    {k: v for k, v in reuse.items() if k not in ("part", "method")}
                    if reuse
                    else run(o, tmp, f"lora-{strategy}-{ranks}")
                )
                rec = {"part": "lora", "strategy": strategy, "ranks": ranks} | figures
                records.append(rec)
                print(_line(rec), flush=True)
    _report(records, args)


def _line(rec: dict[str, Any]) -> str:
    what = rec.get("method") or f"{rec['strategy']} r={rec['ranks']}"
    return (
        f"  {rec.get('dataset', 'bbc-news')} {rec.get('partition', 'dir0.1')} {what}: "
        f"acc {rec['accuracy']:.4f}, {human_bytes(rec['bytes_up_per_client_round'])} up per client per round, "
        f"{rec['wall_seconds']:.0f} s"
    )


def _report(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    methods = [r for r in records if r["part"] == "methods"]
    full = {(r["dataset"], r["partition"]): r for r in methods if r["method"] == "full"}
    rows = []
    for r in methods:
        ref = full.get((r["dataset"], r["partition"]))
        ratio = f"{ref['bytes_up_per_client_round'] / r['bytes_up_per_client_round']:.0f}x" if ref else "-"
        rows.append(
            [
                r["dataset"],
                r["partition"],
                r["method"],
                f"{r['trainable']:,}",
                human_bytes(r["bytes_up_per_client_round"]),
                ratio,
                r["learning_rate"],
                f"{r['accuracy']:.4f}",
                f"{r['best_accuracy']:.4f}",
            ]
        )
    text = table(
        [
            "dataset",
            "partition",
            "method",
            "trainable",
            "up / client / round",
            "vs full",
            "lr",
            "final acc",
            "best acc",
        ],
        rows,
    )
    lora_rows = [
        [
            r["strategy"],
            r["ranks"],
            human_bytes(r["bytes_up_per_client_round"]),
            human_bytes(r["bytes_down_per_client_round"]),
            human_bytes(r["total_bytes"]),
            f"{r['accuracy']:.4f}",
            f"{r['best_accuracy']:.4f}",
        ]
        for r in records
        if r["part"] == "lora"
    ]
    lora_text = table(
        ["strategy", "ranks", "max up / client", "max down / client", "total bytes", "final acc", "best acc"],
        lora_rows,
    )
    header = (
        f"{args.clients} clients, {args.rounds} rounds, {args.steps} local steps of batch 16 per round; "
        "bytes are serialized message sizes"
    )
    out = f"{header}\n\n## PEFT methods\n\n{text}\n"
    if lora_rows:
        out += f"\n## LoRA aggregation (BBC News, Dirichlet 0.1)\n\n{lora_text}\n"
    print(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"fedpeft_table{args.tag}.md").write_text(out)
    write(f"fedpeft_table{args.tag}", {"settings": vars(args), "records": records})
    _plot(records, args.tag)


def _plot(records: list[dict[str, Any]], tag: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r for r in records if r["part"] == "methods"]
    dataset = methods[0]["dataset"] if methods else ""
    methods = [r for r in methods if r["dataset"] == dataset]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for part, marker in (("iid", "o"), ("dir0.1", "s")):
        rs = [r for r in methods if r["partition"] == part]
        axes[0].scatter(
            [r["bytes_up_per_client_round"] for r in rs],
            [r["accuracy"] for r in rs],
            marker=marker,
            label=part,
        )
        for r in rs:
            axes[0].annotate(r["method"], (r["bytes_up_per_client_round"], r["accuracy"]), fontsize=8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bytes up per client per round")
    axes[0].set_ylabel("global accuracy after the budget")
    axes[0].set_title(f"PEFT methods, {dataset}")
    axes[0].legend()
    lora = [r for r in records if r["part"] == "lora"]
    if not lora:
        axes[1].axis("off")
    for r in lora:
        axes[1].plot(r["accuracy_by_round"], marker=".", label=f"{r['strategy']} r={r['ranks']}")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("global accuracy")
    axes[1].set_title("LoRA aggregation, Dirichlet 0.1")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"fedpeft_table{tag}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
