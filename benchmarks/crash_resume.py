"""Resume wherever the kill lands: SIGKILL a real ``fedpeft run`` again and again, compare.

For each engine (in-process, Ray) and each setting (dense FedAvg; ComPEFT both ways +
FedAdam + local DP-SGD with a budget + injected failures), one run is left alone and
then, per drill, the same run is SIGKILLed -- whole process tree, no clean-up -- at
seeded moments: random times, and named crash points (a client just trained, the server
about to aggregate, a round record half appended, the checkpoint half written, a
client's state half written; see :mod:`fedpeft.recovery.crash`), resumed after each kill (or
started again if no round was checkpointed yet), and finally let finish.  Each drill's
per-round records (losses, accuracies, epsilons, who failed and why, bytes) and final
adapter must equal the undisturbed run's, to the bit.

Byte counts are compared exactly on the in-process engine (its node ids come from the
seed).  Flower's engines draw node ids at random and a message's size includes them as
varints, so on Ray the array payload bytes are compared exactly and whole-message sizes
are not.  Every kind of injected failure runs on both engines (raise, hang,
drop); on Ray a hang or drop really waits out the round timeout, in process the time is
simulated.

    .venv/bin/python -m benchmarks.crash_resume [--engines inprocess,ray] [--drills 3] [--kills 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from benchmarks._common import RESULTS, table, write
from fedpeft.recovery.crash import comparable, drill, plan_kills, run_once
from fedpeft.results.records import read_rounds

BASE: dict[str, Any] = {
    "num-rounds": 4,
    "num-clients": 4,
    "min-train-clients": 2,
    "device": "cpu",
    "model.max-length": 32,
    "data.max-examples": 320,
    "data.max-test-examples": 80,
    "data.partitioner": "dirichlet",
    "train.batch-size": 8,
    "train.max-steps": 3,
    "train.learning-rate": 0.003,
}
STATEFUL: dict[str, Any] = {
    "strategy.name": "fedadam",
    "codec.name": "compeft",
    "codec.downlink": "compeft",
    "dp.mode": "local",
    "dp.noise-multiplier": 0.8,
    "dp.epsilon-budget": 7.0,
    "round-timeout": 60.0,
}
FAILURES = {
    "inprocess": {
        "failures.raise-probability": 0.15,
        "failures.hang-probability": 0.1,
        "failures.drop-probability": 0.1,
    },
    # On Ray a hung or dropped client really waits out the timeout: 45 s is several times
    # what a healthy client of this size needs even on a loaded machine.
    "ray": {
        "failures.raise-probability": 0.15,
        "failures.hang-probability": 0.1,
        "failures.drop-probability": 0.1,
        "round-timeout": 45.0,
    },
}
SETTINGS = ("dense", "stateful")


def overrides(engine: str, setting: str) -> dict[str, Any]:
    return BASE | (STATEFUL | FAILURES[engine] if setting == "stateful" else {})


def commands(engine: str, sets: dict[str, Any], run_dir: Path) -> tuple[list[str], list[str]]:
    cli = [sys.executable, "-m", "fedpeft.cli", "run"]
    extra = ["--num-cpus", "2"] if engine == "ray" else []
    start = [*cli, "--engine", engine, *(f"--set={k}={_toml(v)}" for k, v in sets.items()), *extra]
    return start, [*cli, "--resume", str(run_dir), *extra]  # the engine the run started on


def _toml(value: Any) -> str:
    return (
        json.dumps(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def adapters_equal(a: Path, b: Path) -> bool:
    x, y = (
        load_file(str(a / "adapter" / "exchanged.safetensors")),
        load_file(str(b / "adapter" / "exchanged.safetensors")),
    )
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def first_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    for ra, rb in zip(a, b, strict=False):
        for key in ra:
            if ra[key] != rb.get(key):
                return f"round {ra['round']}: {key} {str(ra[key])[:120]} != {str(rb.get(key))[:120]}"
    return "" if len(a) == len(b) else f"{len(a)} rounds vs {len(b)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="inprocess,ray")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--drills", type=int, default=3, help="kill-and-resume drills per engine and setting")
    ap.add_argument("--kills", type=int, default=2, help="kills per drill (then it runs to the end)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    ap.add_argument("--out", default="crash_resume")
    args = ap.parse_args()
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for engine in args.engines.split(","):
            for setting in args.settings.split(","):
                sets = overrides(engine, setting) | {"results-dir": str(root)}
                whole = root / f"{engine}-{setting}-whole"
                start, _ = commands(engine, sets | {"run-name": whole.name}, whole)
                _, code, duration = run_once(start, None, log=root / f"{whole.name}.log", timeout=1800)
                if code != 0:
                    raise SystemExit(
                        f"the reference run failed: {(root / f'{whole.name}.log').read_text()[-3000:]}"
                    )
                reference = comparable(read_rounds(whole), message_bytes=engine == "inprocess")
                rounds = BASE["num-rounds"]
                clients = BASE["num-clients"]
                max_nth = {
                    "train": rounds * clients // 2,
                    "aggregate": rounds,
                    "record": 3 * (rounds + 1),
                    "checkpoint-write": rounds + 1,
                }
                if setting == "stateful":  # dense FedAvg keeps no client state: nothing to write
                    max_nth["client-state-write"] = rounds * clients // 2
                for d in range(args.drills):
                    name = f"{engine}-{setting}-drill{d}"
                    run_dir = root / name
                    kills = plan_kills(f"{args.seed}-{engine}-{setting}-{d}", args.kills, duration, max_nth)
                    start, resume = commands(engine, sets | {"run-name": name}, run_dir)
                    attempts = drill(start, resume, run_dir, kills, log=root / f"{name}.log", timeout=1800)
                    got = comparable(read_rounds(run_dir), message_bytes=engine == "inprocess")
                    same_records = got == reference
                    same_adapter = adapters_equal(whole, run_dir)
                    landed = [a.kill for a in attempts if a.killed]
                    rec = {
                        "engine": engine,
                        "setting": setting,
                        "drill": d,
                        "kills_planned": [str(k) for k in kills],
                        "kills_landed": landed,
                        "processes": [vars(a) for a in attempts],
                        "same_records": same_records,
                        "same_adapter": same_adapter,
                        "first_difference": "" if same_records else first_difference(reference, got),
                        "reference_seconds": duration,
                    }
                    records.append(rec)
                    rows.append(
                        [
                            engine,
                            setting,
                            d,
                            ", ".join(landed) or "-",
                            len(attempts),
                            same_records,
                            same_adapter,
                        ]
                    )
                    print(
                        table(
                            [
                                "engine",
                                "setting",
                                "drill",
                                "kills landed",
                                "processes",
                                "records equal",
                                "adapter equal",
                            ],
                            rows[-1:],
                        ),
                        flush=True,
                    )
                    if not same_records:
                        print("  first difference:", rec["first_difference"], flush=True)
    headers = ["engine", "setting", "drill", "kills landed", "processes", "records equal", "adapter equal"]
    text = table(headers, rows)
    print(text)
    ok = all(r["same_records"] and r["same_adapter"] for r in records)
    summary = {
        "drills": len(records),
        "kills_landed": sum(len(r["kills_landed"]) for r in records),
        "all_equal": ok,
        "settings": {"base": BASE, "stateful": STATEFUL, "failures": FAILURES},
    }
    write(args.out, summary | {"drills_detail": records})
    (RESULTS / f"{args.out}.md").write_text(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
