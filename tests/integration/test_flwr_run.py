"""`flwr run .` works on this app: Flower's own CLI, its local SuperLink, our config keys."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedpeft.results.records import read_rounds

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _stop_superlinks_of(flwr_home: str) -> None:
    """Stop the detached SuperLink that `flwr run` started for *this* FLWR_HOME only."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("flower-superlink" in part for part in proc.info["cmdline"] or []) and (
                proc.environ().get("FLWR_HOME") == flwr_home
            ):
                for child in proc.children(recursive=True):
                    child.kill()
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def test_flwr_run_dot(tmp_path):
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent))
    assert flwr, "the flwr CLI is installed next to this Python"
    home = str(tmp_path / "flwr-home")
    env = os.environ | {
        "FLWR_HOME": home,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    out = tmp_path / "results"
    overrides = (
        "num-clients=2 num-rounds=2 device='cpu' model.max-length=32 data.max-examples=160 "
        f"data.partitioner='iid' train.batch-size=8 train.max-steps=4 results-dir='{out}' run-name='flwr'"
    )
    try:
        proc = subprocess.run(
            [
                flwr,
                "run",
                ".",
                "--stream",
                "--federation-config",
                "num-supernodes=2 client-resources-num-cpus=1",
                "-c",
                overrides,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        _stop_superlinks_of(home)
    log = proc.stdout + proc.stderr
    # `flwr run --stream` exits 0 even when the run failed: check what the run wrote.
    assert proc.returncode == 0, log[-3000:]
    rounds = read_rounds(out / "flwr")
    assert [r["round"] for r in rounds] == [0, 1, 2], log[-3000:]
    assert all(r["num_replied"] == 2 for r in rounds[1:])
    assert (out / "flwr" / "adapter" / "adapter_model.safetensors").is_file()
    assert "round  2/2" in log
