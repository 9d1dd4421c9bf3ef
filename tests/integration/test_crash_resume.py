"""SIGKILL a real `fedpeft run --engine inprocess` at the moments that break resumes, then resume.

The suite's subset of ``benchmarks/crash_resume.py``: every piece of state on (FedAdam
moments, ComPEFT both ways with error feedback, local DP-SGD with a budget, injected
raises, hangs and drops), killed in round 1 while a client's state is half written (so the
resume starts from round 0), in the server's aggregation, while the checkpoint is half
written, and at a seeded random time.  The records and the adapter must equal the run
left alone's, bytes included: the in-process engine's node ids come from the seed.
"""

import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpeft.recovery.crash import Kill, comparable, drill, plan_kills, run_once
from fedpeft.results.records import read_rounds
from tests.conftest import TINY

pytestmark = pytest.mark.integration

EVERYTHING = {
    "num-rounds": 3,
    "train.max-steps": 2,
    "strategy.name": "fedadam",
    "codec.name": "compeft",
    "codec.downlink": "compeft",
    "dp.mode": "local",
    "dp.noise-multiplier": 0.8,
    "dp.epsilon-budget": 5.6,  # some clients sit out round 3 (which depends on partition size)
    "data.partitioner": "dirichlet",
    "round-timeout": 60.0,
    "failures.raise-probability": 0.2,
    "failures.hang-probability": 0.15,
    "failures.drop-probability": 0.15,
}


def _commands(sets, run_dir):
    cli = [sys.executable, "-m", "fedpeft.cli", "run"]
    start = [*cli, "--engine", "inprocess", *(f"--set={k}={v}" for k, v in sets.items())]
    return start, [*cli, "--resume", str(run_dir)]  # as a user resumes: on the engine the run started on


def test_killed_anywhere_and_resumed_equals_the_run_left_alone(tmp_path):
    sets = TINY | EVERYTHING | {"results-dir": str(tmp_path)}
    whole = tmp_path / "whole"
    _, code, seconds = run_once(
        _commands(sets | {"run-name": "whole"}, whole)[0], None, log=tmp_path / "w.log", timeout=600
    )
    assert code == 0, (tmp_path / "w.log").read_text()[-3000:]
    reference = read_rounds(whole)
    failed = {c["error"].split(":")[0] for r in reference for c in r["clients"] if not c["ok"]}
    # The seed draws injected raises, missed timeouts and clients out of privacy budget.
    assert {"error 2", "no reply before the round timeout", "sat out"} <= failed, failed

    run_dir = tmp_path / "killed"
    start, resume = _commands(sets | {"run-name": "killed"}, run_dir)
    kills = [
        Kill("client-state-write", 1),  # round 1: nothing checkpointed but round 0
        Kill("aggregate", 2),
        Kill("checkpoint-write", 2),
        *plan_kills(0, 1, seconds, {}),  # a seeded random time within the run
    ]
    attempts = drill(start, resume, run_dir, kills, log=tmp_path / "k.log", timeout=600)
    landed = [a.kill for a in attempts if a.killed]
    assert landed[:3] == ["client-state-write:1", "aggregate:2", "checkpoint-write:2"], attempts
    assert comparable(read_rounds(run_dir)) == comparable(reference)  # bytes, epsilons, failures too
    a = load_file(str(whole / "adapter" / "exchanged.safetensors"))
    b = load_file(str(run_dir / "adapter" / "exchanged.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # to the bit
    assert not list(run_dir.rglob(".*.tmp"))  # what the kills cut short was cleared
