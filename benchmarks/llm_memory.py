"""Peak memory and time of an LLM (and a ViT) client and server, before and after a change.

Each measurement runs in a fresh process, so its peak resident set size (``ru_maxrss``:
the interpreter, the libraries, the model and the work) is that phase's alone:

* ``train``          -- ``train.max-steps`` local steps (seconds per step);
* ``evaluate``       -- the task's evaluation of the server's test set: scoring every
  reference and greedy answers to ``lm.generate-examples`` prompts (seconds);
* ``train+evaluate`` -- both in one process, as a client and the server share one on a
  laptop (the issue's target: at most 3 GB for SmolLM2 LoRA at 8 x 192 tokens);
* ``round``          -- one in-process federated round through the real apps (round 0
  evaluates the base model, round 1 trains every client and evaluates): its seconds and
  exact match.

Settings (``--settings``): ``instruct-192`` (an instruction JSONL written from BBC News:
"continue this article", 5 users split naturally, ``model.max-length = 192``, batch 8, the
default evaluation batch of 64, 32 test prompts, 8 answers: the issue's report),
``benchmark`` (``benchmarks/llm_instruct``'s: BBC News sections, 96 tokens, 200 test
articles all answered), ``test`` (the suite's tiny LLM) and ``dinov2-224`` (DINOv2-S/14
LoRA on Fashion-MNIST at 224 px, batch 8).

"before" is the code at ``--before`` (a git revision, checked out into a temporary
worktree and put first on ``PYTHONPATH`` of the worker processes); "after" is this
checkout.  Both run side by side on this machine with the same settings and seeds.
Writes ``benchmarks/results/llm_memory.{json,md}``.

    .venv/bin/python -m benchmarks.llm_memory [--before 77166ff --settings instruct-192,benchmark]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("train", "evaluate", "train+evaluate", "round")

_LLM = {
    "task.name": "causal-lm",
    "model.name": "smollm2-135m",
    "lora.target-modules": "q_proj,v_proj",
    "lora.r": 8,
    "lora.alpha": 16.0,
    "train.batch-size": 8,
    "train.learning-rate": 2e-3,
    "min-train-clients": 1,
}
SETTINGS: dict[str, dict[str, Any]] = {
    "instruct-192": _LLM
    | {
        "data.dataset": "{instructions}",
        "data.partitioner": "natural",
        "data.partition-column": "user",
        "num-clients": 5,
        "model.max-length": 192,
        "data.max-test-examples": 32,
        "lm.generate-examples": 8,
        "train.max-steps": 3,
    },
    "benchmark": _LLM
    | {  # benchmarks/llm_instruct.BASE, 10 clients x 4 steps
        "data.dataset": "bbc-news",
        "data.partitioner": "dirichlet",
        "data.alpha": 0.5,
        "data.test-fraction": 0.2,
        "data.max-test-examples": 200,
        "num-clients": 10,
        "model.max-length": 96,
        "lm.generate-examples": 200,
        "lm.max-new-tokens": 8,
        "train.eval-batch-size": 50,
        "train.max-steps": 4,
    },
    "dinov2-224": {
        "task.name": "image-classification",
        "model.name": "dinov2-small",
        "model.image-size": 224,
        "data.dataset": "fashion-mnist",
        "data.max-examples": 600,
        "data.max-test-examples": 128,
        "num-clients": 5,
        "peft.method": "lora",
        "train.batch-size": 8,
        "train.max-steps": 3,
        "min-train-clients": 1,
    },
}


# What each variant sets beyond its setting: "before" and "after" run with their code's
# defaults; the other two force model.gradient-checkpointing, whose "auto" turns it on for
# a causal LM only above 1,024 tokens per batch (on at 8 x 192, off at 8 x 96).
VARIANTS: dict[str, dict[str, Any]] = {
    "before": {},
    "after": {},
    "after-checkpointing": {"model.gradient-checkpointing": True},
    "after-no-checkpointing": {"model.gradient-checkpointing": False},
}


# ---------------------------------------------------------------------- worker (one process per figure)
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def worker(phase: str, overrides: dict[str, Any], results_dir: str) -> dict[str, Any]:
    """One phase in this process; imports whichever fedpeft is first on the path."""
    import torch

    from fedpeft.config import RunConfig
    from fedpeft.models import quiet_libraries
    from fedpeft.tasks.model import task_model
    from fedpeft.tasks.registry import get_task
    from fedpeft.training import train_local

    quiet_libraries()
    out: dict[str, Any] = {}
    if phase == "round":
        return out | _round(overrides, results_dir)
    cfg = RunConfig.from_run_config(overrides)
    task = get_task(cfg)
    model = task_model(cfg, task)
    data = task.client_train_set(cfg, 0, cfg.num_clients)
    test = task.server_test_set(cfg)
    out["loaded_mb"] = _peak_mb()
    if "train" in phase:
        start = time.perf_counter()
        result = train_local(model, data, cfg.train, cfg.seed, task=task)
        out["s_per_step"] = (time.perf_counter() - start) / max(result.steps, 1)
        out["train_peak_mb"] = _peak_mb()
    if "evaluate" in phase:
        start = time.perf_counter()
        with torch.no_grad():
            evaluation = task.evaluate(model, test, cfg.train.eval_batch_size)
        out["evaluate_s"] = time.perf_counter() - start
        out["metrics"] = dict(evaluation.metrics) | {"loss": evaluation.loss}
    out["peak_mb"] = _peak_mb()
    return out


def _round(overrides: dict[str, Any], results_dir: str) -> dict[str, Any]:
    # The code under test's own benchmarks._common (first on the path, like its fedpeft).
    from benchmarks._common import run_inprocess

    _, rounds, _ = run_inprocess(overrides | {"num-rounds": 1}, results_dir, "round")
    return {
        "base_seconds": rounds[0]["wall_seconds"],
        "round_seconds": rounds[1]["wall_seconds"],
        "metrics": rounds[1]["metrics"],
        "peak_mb": _peak_mb(),
    }


# ---------------------------------------------------------------------- driver
def _instructions(path: Path) -> None:
    """An instruction JSONL from outside the project's built-in tasks: "continue this
    article" (the first 60 words -> the next 150) from 400 BBC News articles, 5 users."""
    from fedpeft.data.sources import column_values, load_bbc_news

    texts = column_values(load_bbc_news().dataset, "text")[:400]
    with path.open("w") as out:
        for i, text in enumerate(texts):
            words = text.split()
            cut = len(words) // 3
            row = {
                "instruction": "Continue this news article.",
                "input": " ".join(words[:cut][:60]),
                "response": " ".join(words[cut:][:150]),
                "user": f"u{i % 5}",
            }
            out.write(json.dumps(row) + "\n")


def _measure(code: Path, phase: str, overrides: dict[str, Any], tmp: str) -> dict[str, Any]:
    env = os.environ | {"PYTHONPATH": str(code)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", phase, json.dumps(overrides), tmp]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{phase} failed in {code}:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _worktree(revision: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), revision], check=True)
    return where


def main() -> None:
    from benchmarks._common import RESULTS, table, write

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="77166ff", help="git revision of the 'before' code")
    parser.add_argument("--settings", default="instruct-192,benchmark,test,dinov2-224")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--variants", default="before,after-checkpointing,after-no-checkpointing")
    parser.add_argument("--out", default="llm_memory", help="results file name (benchmarks/results/<out>.*)")
    args = parser.parse_args()
    from tests.conftest import TINY_LLM

    SETTINGS["test"] = _LLM | TINY_LLM  # the suite's tiny LLM
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "instructions.jsonl"
        _instructions(jsonl)
        before = _worktree(args.before, Path(tmp) / "before")
        try:
            for setting in args.settings.split(","):
                base = {k: (str(jsonl) if v == "{instructions}" else v) for k, v in SETTINGS[setting].items()}
                for phase in args.phases.split(","):
                    if phase == "round" and setting in ("test", "dinov2-224"):
                        continue  # rounds: the LLM settings the issue names
                    for variant in args.variants.split(","):
                        code = before if variant == "before" else ROOT
                        overrides = base | VARIANTS[variant]
                        print(f"--- {setting} {phase} {variant}", flush=True)
                        result = _measure(code, phase, overrides, tmp)
                        rows.append({"setting": setting, "phase": phase, "variant": variant} | result)
                        print(json.dumps(rows[-1]), flush=True)
                        _save(rows, args, RESULTS, table, write)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False
            )
    print(_report(rows, args, table))


def _save(
    rows: list[dict[str, Any]], args: argparse.Namespace, results: Path, table: Any, write: Any
) -> None:
    write(args.out, {"args": vars(args), "settings": SETTINGS, "rows": rows})
    (results / f"{args.out}.md").write_text(_report(rows, args, table) + "\n")


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, table: Any) -> str:
    def ratio(row: dict[str, Any], key: str) -> str:
        ref = next(
            (
                r
                for r in rows
                if r["variant"] == "before" and r["setting"] == row["setting"] and r["phase"] == row["phase"]
            ),
            None,
        )
        if ref is None or key not in row or key not in ref or row is ref:
            return ""
        return f" ({row[key] / ref[key]:.2f}x)"

    lines = []
    for row in rows:
        metrics = row.get("metrics", {})
        quality = ", ".join(
            f"{k} {metrics[k]:.4g}" for k in ("exact_match", "perplexity", "accuracy") if k in metrics
        )
        seconds = {
            "train": ("s_per_step", "s/step"),
            "evaluate": ("evaluate_s", "s"),
            "train+evaluate": ("s_per_step", "s/step"),
            "round": ("round_seconds", "s/round"),
        }[row["phase"]]
        lines.append(
            [
                row["setting"],
                row["phase"],
                row["variant"],
                f"{row['peak_mb'] / 1024:.2f} GiB{ratio(row, 'peak_mb')}",
                f"{row.get(seconds[0], 0):.2f} {seconds[1]}{ratio(row, seconds[0])}"
                + (f", eval {row['evaluate_s']:.1f} s" if row["phase"] == "train+evaluate" else ""),
                quality,
            ]
        )
    head = (
        f"Peak resident memory (the whole process) and time, before = {args.before}, after = this checkout; "
        "each figure a fresh process on this machine, side by side. "
        "after-checkpointing / after-no-checkpointing force model.gradient-checkpointing; the default "
        "('auto') is the first for a causal LM above 1,024 tokens per batch (instruct-192), else the second."
    )
    return head + "\n\n" + table(["setting", "phase", "variant", "peak RSS", "time", "quality"], lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])))
    else:
        main()
