"""SIGKILL a real Ray-backed ``fedpeft run`` after round 1, resume it, and get the uninterrupted run."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from fedpeft.checkpoint import Checkpoint
from fedpeft.results import read_rounds
from tests.conftest import TINY

pytestmark = pytest.mark.integration

# Codec state on both sides and FedAdam's moments make the resume non-trivial.
SETTINGS = TINY | {
    "num-rounds": 3,
    "strategy.name": "fedadam",
    "codec.name": "compeft",
    "codec.downlink": "compeft",
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedpeft.cli", "run", *args]


def _sets(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out += ["--set", f"{key}={text}"]
    return out


def _comparable(rounds):
    """Per-round records minus wall time and node ids (the engine draws new ids, and a message's
    size includes its node ids as varints, so sizes may move by a byte or two per message)."""
    out = []
    for r in rounds:
        out.append(
            (
                r["round"],
                r["accuracy"],
                r["loss"],
                r["train_loss"],
                [(c["partition_id"], c["ok"], c["num_examples"], c["train_loss"]) for c in r["clients"]],
            )
        )
    return out


def test_sigkill_then_resume_gives_the_uninterrupted_run(tmp_path):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    whole = subprocess.run(
        _cli(*_sets(SETTINGS | {"results-dir": str(tmp_path), "run-name": "whole"}), "--num-cpus", "2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(*_sets(SETTINGS | {"results-dir": str(tmp_path), "run-name": "killed"}), "--num-cpus", "2"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "checkpoint.bin").is_file() and Checkpoint.load(run_dir).round >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    # SIGKILL to the whole process tree: the launcher, Flower's engine and every Ray process
    # (some run in their own sessions, so a process-group kill would miss them).
    tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=60)
    proc.wait(timeout=60)
    assert Checkpoint.load(run_dir).round in (1, 2)

    resumed = subprocess.run(
        _cli("--resume", str(run_dir), "--num-cpus", "2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after round" in resumed.stdout
    assert _comparable(read_rounds(run_dir)) == _comparable(read_rounds(tmp_path / "whole"))
    a = load_file(str(tmp_path / "whole" / "adapter" / "exchanged.safetensors"))
    b = load_file(str(run_dir / "adapter" / "exchanged.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bit-identical on the CPU
    assert json.loads((run_dir / "config.json").read_text())["num-rounds"] == 3
    assert Path(run_dir / "checkpoint.bin").is_file()
