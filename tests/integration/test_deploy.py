"""A real Flower deployment: SuperLink + 2 SuperNodes as processes on loopback, with TLS.

One deployment (2 rounds, ~3-4 min on 2 busy cores: every message starts a fresh
ClientApp process) shared by the checks: the run completes, the adapter is saved, our
byte accounting equals the messages rebuilt from what crossed the Fleet API, nothing
listened beyond loopback, and every process is gone afterwards.
"""

import psutil
import pytest

from fedpeft.results.records import read_rounds
from fedpeft.running.deploy import Deployment, deploy
from tests.integration.test_simulation import ListenWatcher, _is_loopback

pytestmark = pytest.mark.integration

SMALL = {
    "num-clients": 2,
    "num-rounds": 2,
    "min-train-clients": 2,
    "device": "cpu",
    "model.max-length": 32,
    "data.max-examples": 160,
    "data.partitioner": "iid",
    "train.batch-size": 8,
    "train.max-steps": 4,
}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    started: list[int] = []
    original = Deployment._spawn

    def spawn(self, name, argv):  # records every PID we start, to check they are gone
        s = original(self, name, argv)
        started.append(s.proc.pid)
        return s

    Deployment._spawn = spawn  # type: ignore[method-assign]
    watcher = ListenWatcher()
    watcher.start()
    try:
        result = deploy(
            SMALL | {"results-dir": str(out / "results"), "run-name": "tls"},
            tls=True,
            work_dir=out / "work",
            timeout=600,
        )
    finally:
        watcher.stop.set()
        watcher.join()
        Deployment._spawn = original  # type: ignore[method-assign]
    return result, watcher, started


def test_the_run_completes_with_every_round_and_reply(deployed):
    result = deployed[0]
    assert result.status == "finished:completed"
    rounds = read_rounds(result.run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["num_replied"] == 2 and r["num_failed"] == 0 for r in rounds[1:])
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (result.work_dir / "certs" / "ca.pem").is_file()


def test_our_bytes_equal_the_messages_rebuilt_from_the_fleet_api(deployed):
    traffic = deployed[0].traffic
    print(traffic.summary())
    assert traffic.exact, traffic.mismatches
    assert traffic.messages == 2 * 3 * 2  # 2 nodes x (describe + 2 trains) x both ways
    assert traffic.accounted_bytes > 4 * 2 * 75_653 * 4  # 4 fp32 LoRA+head exchanges per node
    # What crossed: every object once, plus per-RPC ids; heartbeats, registration and the
    # app bundle (GetFab) come on top.
    assert traffic.object_bytes < traffic.message_rpc_bytes < traffic.fleet_rpc_bytes


def test_nothing_listened_beyond_loopback(deployed):
    watcher = deployed[1]
    new = watcher.seen - watcher.before
    assert new, "the watcher saw no Flower sockets at all"
    exposed = {s for s in new if not _is_loopback(s[0])}
    assert not exposed, f"sockets listening beyond loopback: {sorted(exposed)}"


def test_every_process_is_gone(deployed):
    started = deployed[2]
    assert len(started) == 1 + 2  # SuperLink, 2 SuperNodes (`flwr run` is waited for in place)
    alive = [pid for pid in started if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive, alive
    home = str(deployed[0].work_dir / "flwr-home")  # also what they started (ServerApp, ClientApps)
    ours = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME") == home:
                ours.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    assert not ours, ours
