"""A simulation on a Ray cluster the user started (``ray start --head``), kept on loopback."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedpeft.results.records import read_rounds
from fedpeft.running.deploy import free_port
from fedpeft.running.launch import RayOptions, simulate
from tests.integration.test_simulation import ListenWatcher, _is_loopback

pytestmark = pytest.mark.integration


def _wait_for(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head did not open 127.0.0.1:{port} within {seconds} s")


@pytest.fixture
def ray_head(monkeypatch):
    """``ray start --head --block`` on loopback with a private temp dir; stopped by its own PID."""
    # Ray puts socket files under its temp dir: keep the path short (AF_UNIX limit).
    tmp = tempfile.mkdtemp(prefix="fpray")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    port = free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1"]
    cmd += ["--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp}"]
    log = open(Path(tmp) / "head.log", "w")  # noqa: SIM115 - closed in the teardown
    head = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True
    )
    try:
        _wait_for(port, 90)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # what we started, not every Ray process of the user
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_simulation_runs_on_an_existing_cluster(ray_head, tmp_path):
    from tests.conftest import TINY

    watcher = ListenWatcher()
    watcher.start()
    try:
        run_dir = simulate(
            TINY | {"results-dir": str(tmp_path), "run-name": "cluster"}, RayOptions(address=ray_head)
        )
    finally:
        watcher.stop.set()
        watcher.join()
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["num_replied"] == 3 for r in rounds[1:])
    exposed = {(ip, port) for ip, port, _ in watcher.seen - watcher.before if not _is_loopback(ip)}
    assert not exposed, f"sockets listening beyond loopback: {sorted(exposed)}"
