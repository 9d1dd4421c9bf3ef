"""The bytes-to-accuracy frontier: every codec against dense LoRA at equal footing, on the
workloads that chose the defaults and on two that did not.

Workloads (``--workload``; each a real federation, in process, several runs at once):

* ``bbc-news`` and ``wordnet-nouns`` (MiniLM, LoRA r=8, Dirichlet 0.5): the defaults
  (``server.aggregate = "bounded"``, the downlink's density) were chosen here.
* ``fashion-mnist`` (the packaged DINOv2-S/14, LoRA, 56 px) and ``llm`` (the packaged
  SmolLM2-135M-Instruct, LoRA q/v, BBC News as a question; exact match of greedy answers):
  never used to choose anything; run with the defaults unchanged.

Rows: dense LoRA as Flower runs it, and the default ComPEFT (``codec.name = "compeft"``
both ways, nothing else set: no data on the server) over ``--seeds`` seeds; over one seed,
the validation step search on dense and on ComPEFT (``server.step-search``: needs labelled
data on the server, so the two are compared with each other), ComPEFT with FedAvg's plain
mean (``server.aggregate = "all"``), and every other registered codec.  The server's
default setting leaves a dense run unchanged (``bounded`` only acts on sparse payloads),
so "dense with the same server setting" is the dense row itself; the search rows give
both sides the same server-side help.  One round of full-model FedAvg measures its
uplink per client and round exactly.

Per row: final accuracy (mean and sample std over seeds), rounds and bytes (up + down) to
the target (the better dense row's final accuracy less 1 pt), total bytes, uplink per
client-round and how many times below full-model FedAvg, and the server's share of the
round time (``time_split["server"]`` of the round records: decoding, aggregation, the
server step and any search).  Dense has converged when its mean accuracy moved less than
0.5 pt over the last 3 rounds.  Plots come from ``fedpeft report`` over the same folders.
Runs are resumable: a finished run is skipped, an interrupted one resumes from its last
checkpoint.  ``--ablation`` measures the data-free aggregation one change at a time.

    .venv/bin/python -m benchmarks.frontier --workload bbc-news [--rounds 30] [--seeds 3]
    .venv/bin/python -m benchmarks.frontier --workload fashion-mnist --seeds 1
    .venv/bin/python -m benchmarks.frontier --ablation --rounds 15 [--workload wordnet-nouns]
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, table, write
from fedpeft.recovery.checkpoint import CHECKPOINT_FILE
from fedpeft.results.records import human_bytes, read_rounds
from fedpeft.results.report import make_report


@dataclass(frozen=True)
class Workload:
    """One federation the frontier runs every row on."""

    base: dict[str, Any]
    rounds: int
    steps: int
    validation: int  # server validation examples, cut for every row alike (same test set)
    chose_defaults: bool
    metric: str = "accuracy"  # a record field, or a key of its task metrics
    note: str = ""
    full_model: dict[str, Any] = field(
        default_factory=lambda: {"peft.method": "full", "train.learning-rate": 5e-5}
    )


MINILM = {"num-clients": 10, "data.partitioner": "dirichlet", "data.alpha": 0.5, "device": "cpu"}
WORKLOADS: dict[str, Workload] = {
    "bbc-news": Workload(MINILM, 30, 4, 89, True, note="MiniLM LoRA r=8, 10 clients, Dirichlet 0.5"),
    "wordnet-nouns": Workload(
        MINILM | {"data.dataset": "wordnet-nouns", "data.max-examples": 6000},
        15,
        4,
        100,
        True,
        note="MiniLM LoRA r=8, 26 supersenses, 6,000 glosses, 10 clients, Dirichlet 0.5",
    ),
    "fashion-mnist": Workload(
        {
            "task.name": "image-classification",
            "model.name": "dinov2-small",
            "model.image-size": 56,
            "data.dataset": "fashion-mnist",
            "data.max-examples": 20000,
            "data.max-test-examples": 1000,
            "num-clients": 10,
            "data.partitioner": "dirichlet",
            "data.alpha": 0.5,
            "train.batch-size": 16,
            "train.eval-batch-size": 128,
            "train.learning-rate": 1e-3,  # fedpeft_vision's probe for LoRA
            "device": "cpu",
        },
        20,
        10,
        200,
        False,
        note="DINOv2-S/14 LoRA r=8 at 56 px, 10 clients, Dirichlet 0.5",
        full_model={"peft.method": "full", "train.learning-rate": 2e-5},
    ),
    "llm": Workload(
        {
            "task.name": "causal-lm",
            "model.name": "smollm2-135m",
            "model.max-length": 96,
            "data.dataset": "bbc-news",
            "data.max-test-examples": 200,
            "lm.generate-examples": 100,
            "lm.max-new-tokens": 8,
            "lora.target-modules": "q_proj,v_proj",
            "num-clients": 10,
            "data.partitioner": "dirichlet",
            "data.alpha": 0.5,
            "train.batch-size": 8,
            "train.eval-batch-size": 50,
            "min-train-clients": 1,
            "device": "cpu",
        },
        3,  # ~10 min a round for two runs on 2 cores (evaluation: 200 scored, 100 generated)
        4,
        50,
        False,
        metric="exact_match",
        note="SmolLM2-135M-Instruct LoRA q/v, BBC News as a question, 10 clients, Dirichlet 0.5",
        full_model={"peft.method": "full", "train.learning-rate": 2e-5, "train.batch-size": 2},
    ),
}
CODED = {"codec.name": "compeft"}  # nothing else: the data-free default, both ways
SEARCH = {"server.step-search": "1,2,4,8"}
DENSE, DEFAULT = "dense LoRA (FedAvg)", "ComPEFT (default, no server data)"
DENSE_SEARCH, CODED_SEARCH = "dense LoRA + step search (server data)", "ComPEFT + step search (server data)"
OTHERS: list[tuple[str, dict[str, Any]]] = [
    (DENSE_SEARCH, SEARCH),
    (CODED_SEARCH, CODED | SEARCH),
    ("ComPEFT, FedAvg's mean over all clients", CODED | {"server.aggregate": "all"}),
    ("ComPEFT 5% up", CODED | {"codec.density": 0.05}),
    ("fp16 both ways", {"codec.name": "fp16"}),
    ("int8 both ways", {"codec.name": "int8"}),
    ("sign (EF-SignSGD) both ways", {"codec.name": "sign"}),
    ("top-k, fp16 values, both ways", {"codec.name": "topk"}),
]

# The ablation: the data-free aggregation of ComPEFT, one change at a time from ComPEFT
# both ways at 10% with FedAvg's plain mean and no search (the failing row), at
# the workload's budget.  Runs before the server step existed (10 rounds, the validation
# alpha search then the default) are in benchmarks/results/frontier_ablation.md.  The
# last row is the default: the bounded mean with a density-1 downlink.
PLAIN = CODED | {"codec.density": 0.1, "codec.downlink-density": 0.1, "server.aggregate": "all"}
ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("dense LoRA", {}),
    ("ComPEFT 10%, FedAvg's mean (the old data-free setting)", PLAIN),
    ("mean over the clients that sent each coordinate", PLAIN | {"server.aggregate": "senders"}),
    ("... bounded by the clients' mean update length", PLAIN | {"server.aggregate": "bounded"}),
    (
        "FedAvg's mean, density warm-up 100% -> 10% over 5 rounds",
        PLAIN | {"codec.warmup-rounds": 5, "codec.warmup-density": 1.0},
    ),
    ("FedAvg's mean, step searched on validation (server data)", PLAIN | SEARCH),
    (
        "... and the downlink at density 1 (the default)",
        PLAIN | {"server.aggregate": "bounded", "codec.downlink-density": 1.0},
    ),
]


def budget(work: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """The same budget for every row; the validation split is cut for every row alike, so
    all of them are measured on the same test examples (the search rows tune on it)."""
    return {
        "num-rounds": args.rounds or work.rounds,
        "train.max-steps": work.steps,
        "data.validation-examples": work.validation,
    }


def frontier_runs(seeds: int, rows: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(label, seed, overrides): headline rows over ``seeds`` seeds, the others over one."""
    runs: list[tuple[str, int, dict[str, Any]]] = []
    for seed in range(seeds):
        runs += [(DENSE, seed, {}), (DEFAULT, seed, CODED)]
    others = OTHERS if rows == "all" else OTHERS[:2] if rows == "search" else []
    return runs + [(label, 0, over) for label, over in others]


def run_one(folder: Path, name: str, overrides: dict[str, Any], log: Path) -> Path:
    """One ``fedpeft run`` in its own process: skipped when finished (its adapter is there
    and it ran ``num-rounds``), resumed from its checkpoint when it was interrupted or ran
    fewer rounds (a longer budget extends the finished runs: nothing in these runs depends
    on the number of rounds), else started."""
    run_dir = folder / name
    if finished(run_dir, int(overrides["num-rounds"])):
        return run_dir
    resume = {"resume": True} if (run_dir / CHECKPOINT_FILE).is_file() else {}
    cmd = [sys.executable, "-m", "fedpeft.cli", "run", "--engine", "inprocess"]
    for key, value in (overrides | {"results-dir": str(folder), "run-name": name} | resume).items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        cmd += ["--set", f"{key}={text}"]
    with log.open("a") as fh:
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


def score(record: dict[str, Any], metric: str) -> float:
    """A round's headline figure: a record field (accuracy) or one of its task metrics."""
    value = record.get(metric)
    return float(value if value is not None else record["metrics"][metric])


def bytes_to(rounds: list[dict[str, Any]], target: float, metric: str) -> tuple[int | None, int | None]:
    """(first round at or above ``target``, cumulative bytes up + down there)."""
    for r in rounds[1:]:
        if score(r, metric) >= target:
            return r["round"], r["cum_bytes_up"] + r["cum_bytes_down"]
    return None, None


def up_per_client_round(rounds: list[dict[str, Any]]) -> float:
    sizes = [c["bytes_up"] for r in rounds[1:] for c in r["clients"] if c.get("ok")]
    return statistics.fmean(sizes) if sizes else float("nan")


def server_share(rounds: list[dict[str, Any]]) -> float:
    """The server's share of the trained rounds' wall time (decode, aggregate, step, search)."""
    trained = [r for r in rounds[1:] if r.get("time_split")]
    wall = sum(r["wall_seconds"] for r in trained)
    return sum(r["time_split"]["server"] for r in trained) / wall if wall else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def converged(runs: list[list[dict[str, Any]]], metric: str) -> tuple[bool, list[float]]:
    """Whether the mean curve moved less than 0.5 pt over the last 3 rounds, and those 3."""
    last3 = [statistics.fmean(score(r[-i], metric) for r in runs) for i in (3, 2, 1)]
    return max(last3) - min(last3) < 0.005, last3


def summarise_row(
    label: str,
    seeds: list[list[dict[str, Any]]],
    target: float,
    ref_bytes: float,
    full_up: float,
    metric: str,
) -> dict[str, Any]:
    """One row's figures against ``target`` and the dense bytes to it (``ref_bytes``)."""
    acc_m, acc_s = mean_std([score(r[-1], metric) for r in seeds])
    hits = [bytes_to(r, target, metric) for r in seeds]
    reached = [h for h in hits if h[0] is not None]
    rounds_m = statistics.fmean(h[0] for h in reached) if reached else None  # type: ignore[misc]
    bytes_m = statistics.fmean(h[1] for h in reached) if reached else None  # type: ignore[misc]
    up = statistics.fmean(up_per_client_round(r) for r in seeds)
    return {
        "label": label,
        "seeds": len(seeds),
        "final_mean": acc_m,
        "final_std": acc_s,
        "curve_mean": [statistics.fmean(score(r[i], metric) for r in seeds) for i in range(len(seeds[0]))],
        "reached_target": f"{len(reached)}/{len(seeds)}",
        "rounds_to_target": rounds_m,
        "bytes_to_target": bytes_m,
        "dense_bytes_to_target_over_this": (ref_bytes / bytes_m)
        if bytes_m and ref_bytes == ref_bytes
        else None,
        "total_bytes": statistics.fmean(r[-1]["cum_bytes_up"] + r[-1]["cum_bytes_down"] for r in seeds),
        "up_per_client_round": up,
        "full_model_up_over_this": full_up / up,
        "server_share": statistics.fmean(server_share(r) for r in seeds),
    }


def row_cells(rec: dict[str, Any], dense_final: float) -> list[Any]:
    bytes_m, rounds_m = rec["bytes_to_target"], rec["rounds_to_target"]
    return [
        rec["label"],
        rec["seeds"],
        f"{100 * rec['final_mean']:.1f}%" + (f" ± {100 * rec['final_std']:.1f}" if rec["seeds"] > 1 else ""),
        f"{100 * (rec['final_mean'] - dense_final):+.1f}",
        f"{rounds_m:.1f}" if rounds_m else f"never ({rec['reached_target']})",
        human_bytes(round(bytes_m)) if bytes_m else "-",
        f"{rec['dense_bytes_to_target_over_this']:.1f}x" if rec["dense_bytes_to_target_over_this"] else "-",
        human_bytes(round(rec["total_bytes"])),
        human_bytes(round(rec["up_per_client_round"])),
        f"{rec['full_model_up_over_this']:,.0f}x",
        f"{100 * rec['server_share']:.1f}%",
    ]


HEADERS = [
    "run",
    "seeds",
    "final",
    "vs dense (pt)",
    "rounds to target",
    "bytes to target",
    "dense / this",
    "total bytes",
    "up per client-round",
    "full-model up / this",
    "server share of round time",
]


def verdict(rows: dict[str, dict[str, Any]], dense: str, coded: str, target: float) -> str:
    """The issue's target for one pair: final within 1 pt, >= 10x fewer bytes to the target."""
    if dense not in rows or coded not in rows:
        return f"{coded} vs {dense}: not run"
    d, c = rows[dense], rows[coded]
    gap = 100 * (c["final_mean"] - d["final_mean"])
    ratio = c["dense_bytes_to_target_over_this"]
    ok = gap >= -1.0 and ratio is not None and ratio >= 10
    ratio_text = f"{ratio:.1f}x fewer bytes to {100 * target:.1f}%" if ratio else "target not reached"
    return f"{coded} vs {dense}: {gap:+.1f} pt, {ratio_text}: {'met' if ok else 'missed'}"


def frontier(args: argparse.Namespace, work: Workload, folder: Path, tag: str) -> dict[str, Any]:
    metric, n_rounds = work.metric, args.rounds or work.rounds
    runs = frontier_runs(args.seeds, args.rows)
    jobs = [(slug(lb, sd), work.base | budget(work, args) | {"seed": sd} | ov) for lb, sd, ov in runs]
    # A message's size does not depend on the number of clients or steps: 2 clients, 1 step.
    one = {"num-rounds": 1, "num-clients": 2, "min-train-clients": 2, "train.max-steps": 1}
    full = ("full-model-1-round", work.base | budget(work, args) | one | work.full_model)
    t0 = time.perf_counter()
    if not args.report_only:
        run_all(folder, [full, *jobs], args.workers)
    seconds = time.perf_counter() - t0
    command = " ".join(a for a in sys.argv[1:] if a != "--report-only")  # the one that ran them
    full_up = (
        up_per_client_round(read_rounds(folder / full[0])) if finished(folder / full[0], 1) else float("nan")
    )
    by_label: dict[str, list[list[dict[str, Any]]]] = {}
    missing = []
    for label, seed, _ in runs:
        if finished(folder / slug(label, seed), n_rounds):  # a longer run is read up to n_rounds
            by_label.setdefault(label, []).append(read_rounds(folder / slug(label, seed))[: n_rounds + 1])
        else:  # --report-only over a partial set
            missing.append(slug(label, seed))
    dense_ok, last3 = converged(by_label[DENSE], metric)
    run_seconds = sum(r["wall_seconds"] for seeds in by_label.values() for run in seeds for r in run)

    def target_of(*dense_rows: str) -> tuple[float, float]:
        """(the better dense row's final less 1 pt, that row's mean bytes to it)."""
        present = [d for d in dense_rows if d in by_label]
        best = max(present, key=lambda d: statistics.fmean(score(r[-1], metric) for r in by_label[d]))
        target = statistics.fmean(score(r[-1], metric) for r in by_label[best]) - 0.01
        hits = [b for r in by_label[best] if (b := bytes_to(r, target, metric)[1]) is not None]
        return target, statistics.fmean(hits) if hits else float("nan")

    target, ref = target_of(DENSE)
    rows = {
        label: summarise_row(label, seeds, target, ref, full_up, metric)
        for label, seeds in by_label.items()
        if label not in (DENSE_SEARCH, CODED_SEARCH)
    }
    lines = [verdict(rows, DENSE, DEFAULT, target)]
    searched = {}
    if DENSE_SEARCH in by_label and CODED_SEARCH in by_label:
        s_target, s_ref = target_of(DENSE, DENSE_SEARCH)
        searched = {
            label: summarise_row(label, by_label[label], s_target, s_ref, full_up, metric)
            for label in (DENSE_SEARCH, CODED_SEARCH)
        }
        lines.append(verdict(searched, DENSE_SEARCH, CODED_SEARCH, s_target))
    text = table(HEADERS, [row_cells(r, target + 0.01) for r in rows.values()])
    if searched:
        text += "\n\nWith the validation search (server data), against dense with the same search:\n\n"
        text += table(HEADERS, [row_cells(r, s_target + 0.01) for r in searched.values()])
    report = make_report([folder], folder / "report", target=target)
    for name in ("frontier", "accuracy_vs_bytes"):
        if name in report.files:
            shutil.copy(report.files[name], RESULTS / f"frontier_{tag}_{name}.png")
    head = (
        f"{tag} ({work.note}; defaults {'chosen here' if work.chose_defaults else 'NOT chosen here'}): "
        f"{args.rounds or work.rounds} rounds of {work.steps} local steps; metric {metric}; target = dense "
        f"LoRA's final - 1 pt = {100 * target:.1f}%; dense converged (last 3 rounds within 0.5 pt): "
        f"{dense_ok} ({', '.join(f'{100 * a:.1f}%' for a in last3)}); full-model FedAvg uplink per "
        f"client-round {human_bytes(round(full_up))}; {run_seconds / 60:.0f} min of the runs' own wall "
        f"time summed ({args.workers} ran at a time)."
    )
    if missing:
        head += f" Not run: {', '.join(missing)}."
    body = "\n".join(f"- {line}" for line in lines)
    print(f"\n{head}\n{body}\n\n{text}")
    (RESULTS / f"frontier_{tag}.md").write_text(
        f"Command: `.venv/bin/python -m benchmarks.frontier {command}`\n\n{head}\n\n{body}\n\n{text}\n"
    )
    return {
        "settings": vars(args)
        | {"base": work.base, "steps": work.steps, "chose_defaults": work.chose_defaults},
        "target": target,
        "dense_converged": dense_ok,
        "dense_last3": last3,
        "full_model_up_per_client_round": full_up,
        "seconds": seconds,
        "run_seconds": run_seconds,
        "verdicts": lines,
        "rows": list(rows.values()) + list(searched.values()),
    }


def finished(run_dir: Path, rounds: int) -> bool:
    """Whether a run wrote its final adapter (its last act) after ``rounds`` rounds."""
    if not (run_dir / "adapter").is_dir():
        return False
    return read_rounds(run_dir)[-1]["round"] >= rounds


def ablation(args: argparse.Namespace, work: Workload, folder: Path) -> dict[str, Any]:
    labels = [lb for lb, _ in ABLATION if not args.only or lb in args.only.split(";")]
    jobs = [(slug(lb, 0), work.base | budget(work, args) | dict(ABLATION)[lb]) for lb in labels]
    t0 = time.perf_counter()
    if not args.report_only:
        run_all(folder, jobs, args.workers)
    rows, records = [], []
    n_rounds = args.rounds or work.rounds
    for label in labels:
        if not finished(folder / slug(label, 0), n_rounds):
            rows.append([label, "not run", "-", "-", "-", "-"])
            continue
        rounds = read_rounds(folder / slug(label, 0))[: n_rounds + 1]
        scales = [r["step_scale"] for r in rounds if r.get("step_scale") is not None]
        curve = [score(r, work.metric) for r in rounds]
        rec = {
            "label": label,
            "curve": curve,
            "final": curve[-1],
            "final_loss": rounds[-1]["loss"],
            "bytes_up": rounds[-1]["cum_bytes_up"],
            "bytes_down": rounds[-1]["cum_bytes_down"],
            "scales": scales,
            "server_share": server_share(rounds),
        }
        records.append(rec)
        rows.append(
            [
                label,
                " ".join(f"{100 * a:.1f}" for a in curve[1:]),
                f"{rounds[-1]['loss']:.3f}",
                human_bytes(rec["bytes_up"] + rec["bytes_down"]),
                ",".join(f"{a:g}" for a in scales) or "-",
                f"{100 * rec['server_share']:.1f}%",
            ]
        )
    text = table(
        [
            "setting (one change from ComPEFT 10%, FedAvg's mean)",
            f"{work.metric} by round (%)",
            "final loss",
            "up + down",
            "scale chosen",
            "server share",
        ],
        rows,
    )
    print(text)
    (RESULTS / f"frontier_ablation_{args.workload}.md").write_text(
        f"Command: `.venv/bin/python -m benchmarks.frontier {' '.join(sys.argv[1:])}`; "
        f"{(time.perf_counter() - t0) / 60:.0f} min on this machine.\n\n{text}\n"
    )
    return {"rows": records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="bbc-news")
    ap.add_argument("--rounds", type=int, default=0, help="rounds (0: the workload's own)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", choices=["all", "search", "headline"], default="all")
    ap.add_argument("--workers", type=int, default=2, help="runs at once (one CPU core each)")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--only", default="", help="ablation rows to run (labels, ';'-separated)")
    ap.add_argument("--report-only", action="store_true", help="tables from the finished runs; run nothing")
    ap.add_argument("--out", default="results/benchmarks/frontier", help="where the run folders go")
    args = ap.parse_args()
    work = WORKLOADS[args.workload]
    tag = f"ablation_{args.workload}" if args.ablation else args.workload
    folder = Path(args.out).resolve() / tag
    figures = ablation(args, work, folder) if args.ablation else frontier(args, work, folder, tag)
    write(f"frontier_{tag}", figures)
    print(json.dumps({"folder": str(folder)}))


if __name__ == "__main__":
    main()
