"""Real Flower simulations on Ray, through our launcher (slow: ~1 min each)."""

import ipaddress
import threading
import time

import psutil
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedpeft.launch import RayOptions, simulate
from fedpeft.models import resolve_model_path
from fedpeft.results import read_rounds

pytestmark = pytest.mark.integration


class ListenWatcher(threading.Thread):
    """Samples every listening TCP socket of this machine while a simulation runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.before = self._listening()
        self.seen: set[tuple[str, int, int | None]] = set()

    @staticmethod
    def _listening():
        return {
            (c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet") if c.status == "LISTEN"
        }

    def run(self):
        while not self.stop.is_set():
            self.seen |= self._listening()
            time.sleep(0.5)


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback
    return (mapped or addr).is_loopback


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    """One tiny simulation (3 clients, 2 rounds) shared by the checks below."""
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("sim")
    watcher = ListenWatcher()
    watcher.start()
    try:
        run_dir = simulate(TINY | {"results-dir": str(out), "run-name": "ray"}, RayOptions(num_cpus=2))
    finally:
        watcher.stop.set()
        watcher.join()
    return run_dir, watcher


def test_accuracy_rises_above_chance(ray_run):
    rounds = read_rounds(ray_run[0])
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["num_replied"] == 3 and r["num_failed"] == 0 for r in rounds[1:])
    assert rounds[-1]["accuracy"] > 1 / 5 + 0.1, rounds[-1]["accuracy"]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


def test_results_folder_is_complete_and_the_adapter_loads_with_peft(ray_run):
    run_dir = ray_run[0]
    for name in ("config.json", "versions.json", "rounds.jsonl", "rounds.csv", "clients.csv", "progress.png"):
        assert (run_dir / name).stat().st_size > 0, name
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=5)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    assert torch.isfinite(model.classifier.modules_to_save["default"].weight).all()


def test_bytes_are_recorded_per_client_both_ways(ray_run):
    r1 = read_rounds(ray_run[0])[1]
    downs = {c["bytes_down"] for c in r1["clients"]}
    assert len(r1["clients"]) == 3 and min(downs) > 75_653 * 4  # fp32 LoRA + head, plus framing
    assert max(downs) - min(downs) < 16  # same content; node ids differ by a few varint bytes
    assert all(c["bytes_up"] > 75_653 * 4 for c in r1["clients"])


def test_nothing_listened_beyond_loopback(ray_run):
    watcher = ray_run[1]
    new = watcher.seen - watcher.before
    assert new, "the watcher saw no Ray sockets at all"
    exposed = {s for s in new if not _is_loopback(s[0])}
    assert not exposed, f"sockets listening beyond loopback: {sorted(exposed)}"


def test_same_seed_gives_the_same_rounds_on_ray(ray_run, tmp_path):
    from tests.conftest import TINY

    again = simulate(TINY | {"results-dir": str(tmp_path), "run-name": "again"}, RayOptions(num_cpus=2))
    a = [r["accuracy"] for r in read_rounds(ray_run[0])]
    b = [r["accuracy"] for r in read_rounds(again)]
    assert a == pytest.approx(b, abs=1e-6)
    la = [r["train_loss"] for r in read_rounds(ray_run[0])[1:]]
    lb = [r["train_loss"] for r in read_rounds(again)[1:]]
    assert la == pytest.approx(lb, abs=1e-6)


def test_codec_on_both_directions_on_ray(tmp_path):
    from tests.conftest import TINY

    codec = {"codec.name": "compeft", "codec.downlink": "compeft", "num-rounds": 3}
    run_dir = simulate(
        TINY | codec | {"results-dir": str(tmp_path), "run-name": "codec"}, RayOptions(num_cpus=2)
    )
    rounds = read_rounds(run_dir)
    assert all(r["num_replied"] == 3 and r["num_failed"] == 0 for r in rounds[1:])
    # uplink coded every round; downlink dense once (resync), then coded deltas
    assert all(c["bytes_up"] < 20_000 for r in rounds[1:] for c in r["clients"])
    assert rounds[1]["bytes_down"] > 900_000 and rounds[2]["bytes_down"] < 30_000
    assert rounds[-1]["accuracy"] > 1 / 5


@pytest.mark.parametrize(
    "dp",
    [
        {"dp.mode": "local", "dp.target-epsilon": 8.0},
        {"dp.mode": "central", "dp.central-side": "client", "dp.central-noise-multiplier": 0.5},
    ],
    ids=["local", "central"],
)
def test_differential_privacy_on_ray(tmp_path, dp):
    from tests.conftest import TINY

    rounds = read_rounds(
        simulate(TINY | dp | {"results-dir": str(tmp_path), "run-name": "dp"}, RayOptions(num_cpus=2))
    )
    assert all(r["num_replied"] == 3 for r in rounds[1:])
    if dp["dp.mode"] == "local":
        assert 0 < rounds[1]["max_epsilon"] < rounds[2]["max_epsilon"] <= 8.0 + 0.1
        assert all(c["metrics"]["dp-epsilon"] > 0 for c in rounds[2]["clients"])
    else:
        assert 0 < rounds[1]["central_epsilon"] < rounds[2]["central_epsilon"]
