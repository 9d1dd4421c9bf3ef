"""Federated instruction tuning of a real LLM: SmolLM2-135M-Instruct with LoRA on BBC News.

The job FlowerTune and OpenFedLLM federate, on this machine: the packaged
SmolLM2-135M-Instruct (a Llama, 134.5M parameters) answers "Which section of the BBC News
website is this article from?" for 10 clients holding Dirichlet(0.5) label-skewed shares
of 1,780 articles; the server scores every round on 200 held-out articles: perplexity of
the reference answers and exact match of greedy answers (the round's accuracy).

Variants, every one at the same budget (rounds x clients x steps x batch examples):

* ``fedavg``      -- LoRA r=8 on q_proj/v_proj, FedAvg, dense float32 updates;
* ``compeft``     -- the same, every update ComPEFT-coded both ways (10% density);
* ``flexlora``    -- the same LoRA, aggregated by FlexLoRA (SVD of the mean product);
* ``all-linear``  -- LoRA r=8 on every linear layer, FedAvg;
* ``central``     -- the same LoRA trained on the union of the clients' data by one party
  for the same number of examples (``num-clients = 1``, 10x the steps per round): the
  ceiling federated training is compared with.

``fedavg`` and ``central`` (the headline pair) run over ``--seeds``; the rest on the first
seed.  Round 0 of every run is the base model.  Bytes per client per round are measured
messages (both ways) and are put against the full model's float32 size (538 MB: what
full fine-tuning would send each way).  Runs use the real apps over the in-process grid
(``fedpeft.running.inprocess.DirectGrid``: the same messages, meter and records as on Ray).
Writes ``benchmarks/results/llm_instruct.{json,md}``.

    .venv/bin/python -m benchmarks.llm_instruct [--rounds 4 --steps 4 --seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

from benchmarks._common import RESULTS, run_inprocess, table, write
from fedpeft.config import RunConfig
from fedpeft.models import quiet_libraries
from fedpeft.results.records import human_bytes
from fedpeft.tasks.model import task_model

BASE: dict[str, Any] = {
    "task.name": "causal-lm",
    "model.name": "smollm2-135m",
    "model.max-length": 96,
    "data.dataset": "bbc-news",
    "data.partitioner": "dirichlet",
    "data.alpha": 0.5,
    "data.test-fraction": 0.2,
    "data.max-test-examples": 200,
    "lm.generate-examples": 200,
    "lm.max-new-tokens": 8,
    "lora.r": 8,
    "lora.alpha": 16.0,
    "lora.target-modules": "q_proj,v_proj",
    "train.batch-size": 8,
    "train.learning-rate": 2e-3,
    "train.eval-batch-size": 50,
    "min-train-clients": 1,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "compeft": {"codec.name": "compeft", "codec.downlink": "compeft"},
    "flexlora": {"strategy.name": "flexlora"},
    "all-linear": {"lora.target-modules": "all-linear"},
    "central": {},  # num-clients and steps set in main()
}
HEADLINE = ("fedavg", "central")


def run(overrides: dict[str, Any], tmp: str, name: str) -> dict[str, Any]:
    """One federation in-process; its figures."""
    cfg, rounds, wall = run_inprocess(overrides, tmp, name)
    trained = rounds[1:]
    up = [c["bytes_up"] for r in trained for c in r["clients"] if c["ok"]]
    down = [c["bytes_down"] for r in trained for c in r["clients"]]
    return {
        "exact_match": [r["metrics"]["exact_match"] for r in rounds],
        "perplexity": [r["metrics"]["perplexity"] for r in rounds],
        "examples_per_round": sum(c["num_examples"] for c in trained[-1]["clients"]),
        "bytes_up_per_client_round": statistics.mean(up),
        "bytes_down_per_client_round": statistics.mean(down),
        "seconds_per_round": statistics.mean(r["wall_seconds"] for r in trained),
        "trainable": task_model(cfg).num_trainable,
        "wall_seconds": wall,
    }


def overrides_for(variant: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    common = BASE | {"num-rounds": args.rounds, "seed": seed, "device": args.device}
    if variant == "central":  # one party, the union of the data, the same examples per round
        return common | {
            "num-clients": 1,
            "data.partitioner": "iid",
            "train.max-steps": args.steps * args.clients,
        }
    return common | VARIANTS[variant] | {"num-clients": args.clients, "train.max-steps": args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the headline pair (fedavg, central)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    quiet_libraries()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    records: list[dict[str, Any]] = []
    full_bytes = 4 * _frozen_parameters(RunConfig.from_run_config(BASE | {"device": args.device}))
    # The first seed runs every variant, the headline pair first; later seeds the pair only.
    order = [(seeds[0], v) for v in sorted(variants, key=lambda v: v not in HEADLINE)]
    order += [(seed, v) for seed in seeds[1:] for v in variants if v in HEADLINE]
    with tempfile.TemporaryDirectory() as tmp:
        for seed, variant in order:
            name = f"{variant}-s{seed}"
            print(f"--- {name}", flush=True)
            rec = {"variant": variant, "seed": seed} | run(overrides_for(variant, args, seed), tmp, name)
            records.append(rec)
            print(_line(rec), flush=True)
            _save(records, args, full_bytes)  # after every run: a long benchmark keeps what it has
    print(_report(_summarize(records, full_bytes), args, full_bytes))


def _save(records: list[dict[str, Any]], args: argparse.Namespace, full_bytes: int) -> None:
    summary = _summarize(records, full_bytes)
    figures = {
        "args": vars(args),
        "base": BASE,
        "full_model_bytes": full_bytes,
        "runs": records,
        "summary": summary,
    }
    write("llm_instruct", figures)
    (RESULTS / "llm_instruct.md").write_text(_report(summary, args, full_bytes) + "\n")


def _frozen_parameters(cfg: RunConfig) -> int:
    """The backbone's parameters (tied embeddings once): what full fine-tuning would send."""
    return sum(p.numel() for p in task_model(cfg).module.parameters() if not p.requires_grad)


def _line(rec: dict[str, Any]) -> str:
    return (
        f"{rec['variant']} seed {rec['seed']}: EM {rec['exact_match'][0]:.3f} -> {rec['exact_match'][-1]:.3f}, "
        f"ppl {rec['perplexity'][0]:.2f} -> {rec['perplexity'][-1]:.3f}, "
        f"up {human_bytes(int(rec['bytes_up_per_client_round']))}/client/round, "
        f"{rec['seconds_per_round']:.0f} s/round"
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _summarize(records: list[dict[str, Any]], full_bytes: int) -> list[dict[str, Any]]:
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == variant]
        em, em_sd = _mean_std([r["exact_match"][-1] for r in runs])
        ppl, ppl_sd = _mean_std([r["perplexity"][-1] for r in runs])
        up = statistics.mean(r["bytes_up_per_client_round"] for r in runs)
        rows.append(
            {
                "variant": variant,
                "seeds": [r["seed"] for r in runs],
                "trainable": runs[0]["trainable"],
                "base_exact_match": statistics.mean(r["exact_match"][0] for r in runs),
                "base_perplexity": statistics.mean(r["perplexity"][0] for r in runs),
                "exact_match": em,
                "exact_match_std": em_sd,
                "perplexity": ppl,
                "perplexity_std": ppl_sd,
                "exact_match_by_round": [
                    statistics.mean(r["exact_match"][i] for r in runs)
                    for i in range(len(runs[0]["exact_match"]))
                ],
                "bytes_up_per_client_round": up,
                "bytes_down_per_client_round": statistics.mean(
                    r["bytes_down_per_client_round"] for r in runs
                ),
                "full_model_over_up": full_bytes / up,
                "examples_per_round": runs[0]["examples_per_round"],
                "seconds_per_round": statistics.mean(r["seconds_per_round"] for r in runs),
            }
        )
    return rows


def _report(summary: list[dict[str, Any]], args: argparse.Namespace, full_bytes: int) -> str:
    rows = [
        [
            s["variant"],
            f"{len(s['seeds'])}",
            f"{s['trainable']:,}",
            f"{100 * s['base_exact_match']:.1f}% / {s['base_perplexity']:.2f}",
            f"{100 * s['exact_match']:.1f}% ± {100 * s['exact_match_std']:.1f}",
            f"{s['perplexity']:.3f} ± {s['perplexity_std']:.3f}",
            " ".join(f"{100 * x:.0f}" for x in s["exact_match_by_round"]),
            human_bytes(int(s["bytes_up_per_client_round"])),
            human_bytes(int(s["bytes_down_per_client_round"])),
            f"{s['full_model_over_up']:,.0f}x",
            f"{s['seconds_per_round']:.0f}",
        ]
        for s in summary
    ]
    head = (
        f"SmolLM2-135M-Instruct, BBC News as instructions, {args.clients} clients Dirichlet(0.5), "
        f"{args.rounds} rounds x {args.steps} steps x batch {BASE['train.batch-size']} per client "
        f"(central: 1 party, {args.steps * args.clients} steps per round, the same examples); "
        f"held-out: 200 articles. Full model, float32: {human_bytes(full_bytes)}.\n\n"
    )
    return head + table(
        [
            "variant",
            "seeds",
            "trained params",
            "base EM / ppl",
            "final EM",
            "final ppl",
            "EM by round (%)",
            "up/client/round",
            "down/client/round",
            "full model / up",
            "s/round",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
