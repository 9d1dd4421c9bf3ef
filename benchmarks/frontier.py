"""The bytes-to-accuracy frontier: every codec against dense LoRA, and why ComPEFT lost accuracy.

Two modes, both real federations of the default task (LoRA r=8 on MiniLM, 10 clients,
Dirichlet 0.5, 4 local steps of batch 16 per round, in process, several at once):

* ``frontier`` (default): dense LoRA and the default ComPEFT over ``--seeds`` seeds, every
  other registered codec (both directions) and ComPEFT at other densities over one, all
  for ``--rounds`` rounds; one round of full-model FedAvg measures its uplink bytes per
  client per round exactly.  The target is dense LoRA's mean final accuracy less 1 pt.
  Per row: final accuracy (mean and sample std over seeds), rounds and bytes (up + down)
  to reach the target, total bytes, uplink bytes per client per round and how many times
  smaller that is than full-model FedAvg's; whether dense LoRA has converged (its mean
  accuracy moved less than 0.5 pt over the last 3 rounds).  Plots come from
  ``fedpeft report`` over the same run folders (``frontier.png``, ``accuracy_vs_bytes.png``).
* ``--ablation``: what costs ComPEFT accuracy, one setting at a time, 10 rounds, one seed.

    .venv/bin/python -m benchmarks.frontier [--dataset bbc-news] [--rounds 20] [--seeds 3]
    .venv/bin/python -m benchmarks.frontier --ablation
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, table, write
from fedpeft.report import make_report, summarize
from fedpeft.results import human_bytes, read_rounds

# The default task of the issue: BBC News, 10 clients, Dirichlet 0.5, 4 local steps.
BASE: dict[str, Any] = {
    "num-clients": 10,
    "data.partitioner": "dirichlet",
    "data.alpha": 0.5,
    "train.max-steps": 4,
    "device": "cpu",
}
WORDNET: dict[str, Any] = {"data.dataset": "wordnet-nouns", "num-clients": 30, "data.max-examples": 12000}
CODED = {"codec.name": "compeft", "codec.downlink": "compeft"}

# The ablation, one change at a time from ComPEFT 10% both ways without the alpha search
# (STC mean scale: the settings of the table).  Runs made before the downlink fix
# (replies decoded onto the clients' coded copy, which dropped every round what the
# downlink had not delivered yet) are in benchmarks/results/frontier_ablation.md, with
# the commit that made them.
PLAIN = CODED | {"codec.density": 0.1, "codec.alpha-search": ""}
ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("dense LoRA", {}),
    ("ComPEFT 10% both ways, mean scale", PLAIN),
    ("alpha tuned on validation (1,2,4,8)", PLAIN | {"codec.alpha-search": "1,2,4,8"}),
    ("head and biases in fp16", PLAIN | {"codec.small-tensors": 2000}),
    (
        "density warm-up 50% -> 10% over 5 rounds",
        PLAIN | {"codec.warmup-rounds": 5, "codec.warmup-density": 0.5},
    ),
    ("no downlink error feedback", PLAIN | {"codec.downlink-error-feedback": False}),
    ("global top-k", PLAIN | {"codec.compeft.scope": "global"}),
    ("uplink coded only", PLAIN | {"codec.downlink": "none"}),
    ("scale alpha * std, alpha = 4", PLAIN | {"codec.compeft.scale": "std", "codec.compeft.alpha": 4.0}),
]


def BUDGET(args: argparse.Namespace) -> dict[str, Any]:
    """The same budget for every row; the validation split is cut for every row alike, so
    all of them are measured on the same test examples (the codecs tune on it)."""
    return {
        "num-rounds": args.rounds,
        "train.max-steps": args.steps,
        "data.validation-examples": args.validation,
    }


def frontier_runs(seeds: int) -> list[tuple[str, int, dict[str, Any]]]:
    """(label, seed, overrides): headline rows over ``seeds`` seeds, the others over one."""
    runs: list[tuple[str, int, dict[str, Any]]] = []
    for seed in range(seeds):
        runs.append(("dense LoRA", seed, {}))
        runs.append(("ComPEFT (default)", seed, CODED))
    one = [
        ("fp16 both ways", {"codec.name": "fp16", "codec.downlink": "fp16"}),
        ("int8 both ways", {"codec.name": "int8", "codec.downlink": "int8"}),
        ("sign (EF-SignSGD) both ways", {"codec.name": "sign", "codec.downlink": "sign"}),
        ("top-k 10%, fp16 values, both ways", {"codec.name": "topk", "codec.downlink": "topk"}),
        ("ComPEFT 5%", CODED | {"codec.density": 0.05}),
    ]
    runs += [(label, 0, over) for label, over in one]
    return runs


def run_one(folder: Path, name: str, overrides: dict[str, Any], log: Path) -> Path:
    """One ``fedpeft run`` in its own process (skipped when its adapter is already there)."""
    run_dir = folder / name
    if (run_dir / "adapter").is_dir():
        return run_dir
    cmd = [sys.executable, "-m", "fedpeft.cli", "run", "--engine", "inprocess"]
    for key, value in (overrides | {"results-dir": str(folder), "run-name": name}).items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        cmd += ["--set", f"{key}={text}"]
    with log.open("w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True, env=os.environ.copy())
    return run_dir


def run_all(folder: Path, jobs: list[tuple[str, dict[str, Any]]], workers: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run_one, folder, name, over, folder / f"{name}.log") for name, over in jobs]
        for f in futures:
            f.result()


def slug(label: str, seed: int) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
    while "--" in keep:
        keep = keep.replace("--", "-")
    return f"{keep}-s{seed}"


def bytes_to(rounds: list[dict[str, Any]], target: float) -> tuple[int | None, int | None]:
    """(first round at or above ``target``, cumulative bytes up + down there)."""
    for r in rounds[1:]:
        if r["accuracy"] >= target:
            return r["round"], r["cum_bytes_up"] + r["cum_bytes_down"]
    return None, None


def up_per_client_round(rounds: list[dict[str, Any]]) -> float:
    sizes = [c["bytes_up"] for r in rounds[1:] for c in r["clients"] if c.get("ok")]
    return statistics.fmean(sizes) if sizes else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def frontier(args: argparse.Namespace, base: dict[str, Any], folder: Path, tag: str) -> dict[str, Any]:
    runs = frontier_runs(args.seeds)
    if args.only:
        runs = [r for r in runs if r[0] == args.only]
        run_all(
            folder,
            [(slug(lb, sd), base | BUDGET(args) | {"seed": sd} | ov) for lb, sd, ov in runs],
            args.workers,
        )
        return {}
    jobs = [(slug(label, seed), base | BUDGET(args) | {"seed": seed} | over) for label, seed, over in runs]
    full = (
        "full-model-1-round",
        base | BUDGET(args) | {"num-rounds": 1, "peft.method": "full", "train.learning-rate": 5e-5},
    )
    t0 = time.perf_counter()
    run_all(folder, [full, *jobs], args.workers)
    seconds = time.perf_counter() - t0
    full_up = up_per_client_round(read_rounds(folder / full[0]))
    by_label: dict[str, list[list[dict[str, Any]]]] = {}
    missing = []
    for label, seed, _ in runs:
        rounds = read_rounds(folder / slug(label, seed))
        if rounds:
            by_label.setdefault(label, []).append(rounds)
        else:  # skipped (an adapter folder made by hand): reported as not run
            missing.append(slug(label, seed))
    dense = by_label["dense LoRA"]
    dense_final = statistics.fmean(r[-1]["accuracy"] for r in dense)
    last3 = [statistics.fmean(r[-i]["accuracy"] for r in dense) for i in (1, 2, 3)]
    converged = max(last3) - min(last3) < 0.005
    target = dense_final - 0.01
    dense_bytes = (
        statistics.fmean(b for r in dense if (b := bytes_to(r, target)[1]) is not None)
        if any(bytes_to(r, target)[1] is not None for r in dense)
        else float("nan")
    )
    rows, records = [], []
    for label, seeds in by_label.items():
        acc_m, acc_s = mean_std([r[-1]["accuracy"] for r in seeds])
        hits = [bytes_to(r, target) for r in seeds]
        reached = [h for h in hits if h[0] is not None]
        rounds_m = statistics.fmean(h[0] for h in reached) if reached else None  # type: ignore[misc]
        bytes_m = statistics.fmean(h[1] for h in reached) if reached else None  # type: ignore[misc]
        total = statistics.fmean(r[-1]["cum_bytes_up"] + r[-1]["cum_bytes_down"] for r in seeds)
        up = statistics.fmean(up_per_client_round(r) for r in seeds)
        rec = {
            "label": label,
            "seeds": len(seeds),
            "final_accuracy_mean": acc_m,
            "final_accuracy_std": acc_s,
            "gap_to_dense_pt": 100 * (acc_m - dense_final),
            "reached_target": f"{len(reached)}/{len(seeds)}",
            "rounds_to_target": rounds_m,
            "bytes_to_target": bytes_m,
            "dense_bytes_to_target_over_this": (dense_bytes / bytes_m) if bytes_m else None,
            "total_bytes": total,
            "up_per_client_round": up,
            "full_model_up_over_this": full_up / up,
        }
        records.append(rec)
        rows.append(
            [
                label,
                len(seeds),
                f"{100 * acc_m:.1f}%" + (f" ± {100 * acc_s:.1f}" if len(seeds) > 1 else ""),
                f"{rec['gap_to_dense_pt']:+.1f}",
                f"{rounds_m:.1f}" if rounds_m else f"never ({rec['reached_target']})",
                human_bytes(round(bytes_m)) if bytes_m else "-",
                f"{rec['dense_bytes_to_target_over_this']:.1f}x" if bytes_m else "-",
                human_bytes(round(total)),
                human_bytes(round(up)),
                f"{full_up / up:,.0f}x",
            ]
        )
    headers = [
        "run",
        "seeds",
        "final acc",
        "vs dense (pt)",
        "rounds to target",
        "bytes to target",
        "dense / this",
        "total bytes",
        "up per client-round",
        "full-model up / this",
    ]
    text = table(headers, rows)
    report = make_report([folder], folder / "report", target=target)
    for name in ("frontier", "accuracy_vs_bytes"):
        shutil.copy(report.files[name], RESULTS / f"frontier_{tag}_{name}.png")
    head = (
        f"{tag}: {base.get('num-clients')} clients, Dirichlet 0.5, {args.rounds} rounds of "
        f"{base['train.max-steps']} local steps; target = dense LoRA's final accuracy - 1 pt = "
        f"{100 * target:.1f}%; dense LoRA converged (last 3 rounds within 0.5 pt): {converged} "
        f"({', '.join(f'{100 * a:.1f}%' for a in reversed(last3))}); full-model FedAvg uplink per "
        f"client-round {human_bytes(round(full_up))}; {seconds / 60:.0f} min on this machine."
    )
    if missing:
        head += f" Not run: {', '.join(missing)}."
    print(f"\n{head}\n{text}")
    (RESULTS / f"frontier_{tag}.md").write_text(
        f"Command: `.venv/bin/python -m benchmarks.frontier {' '.join(sys.argv[1:])}`\n\n{head}\n\n{text}\n"
    )
    return {
        "settings": vars(args) | {"base": base},
        "target": target,
        "dense_converged": converged,
        "dense_last3": list(reversed(last3)),
        "full_model_up_per_client_round": full_up,
        "seconds": seconds,
        "rows": records,
    }


def ablation(args: argparse.Namespace, base: dict[str, Any], folder: Path) -> dict[str, Any]:
    jobs = [(slug(label, 0), base | {"num-rounds": 10} | over) for label, over in ABLATION]
    t0 = time.perf_counter()
    run_all(folder, jobs, args.workers)
    rows, records = [], []
    for label, _ in ABLATION:
        s = summarize(folder / slug(label, 0))
        rounds = s.rounds
        alphas = [r["codec_alpha"] for r in rounds if r.get("codec_alpha") is not None]
        rec = {
            "label": label,
            "final_accuracy": s.final_accuracy,
            "final_loss": rounds[-1]["loss"],
            "bytes_up": s.bytes_up,
            "bytes_down": s.bytes_down,
            "alphas": alphas,
        }
        records.append(rec)
        rows.append(
            [
                label,
                f"{100 * s.final_accuracy:.1f}%",
                f"{rounds[-1]['loss']:.3f}",
                human_bytes(s.bytes_up),
                human_bytes(s.bytes_down),
                ",".join(f"{a:g}" for a in alphas) or "-",
            ]
        )
    text = table(
        ["setting (one change from the old default)", "acc @10", "loss @10", "up", "down", "alpha chosen"],
        rows,
    )
    print(text)
    (RESULTS / "frontier_ablation.md").write_text(
        f"Command: `.venv/bin/python -m benchmarks.frontier --ablation`; "
        f"{(time.perf_counter() - t0) / 60:.0f} min.\n\n{text}\n"
    )
    return {"rows": records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["bbc-news", "wordnet-nouns"], default="bbc-news")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="local steps per round")
    ap.add_argument("--validation", type=int, default=89, help="server validation examples (all rows)")
    ap.add_argument("--workers", type=int, default=2, help="runs at once (one CPU core each)")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--out", default="results/benchmarks/frontier", help="where the run folders go")
    ap.add_argument("--only", default="", help="run only the rows with this label (no table)")
    args = ap.parse_args()
    base = BASE | (WORDNET if args.dataset == "wordnet-nouns" else {})
    tag = "ablation" if args.ablation else args.dataset
    folder = Path(args.out).resolve() / tag
    figures = ablation(args, base, folder) if args.ablation else frontier(args, base, folder, tag)
    write(f"frontier_{tag}", figures)
    print(json.dumps({"folder": str(folder)}))


if __name__ == "__main__":
    main()
