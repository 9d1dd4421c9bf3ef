"""Real Flower simulations on Ray, through our launcher (slow: ~1 min each)."""

import ipaddress
import os
import re
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForSequenceClassification

from fedpeft.models import resolve_model_path
from fedpeft.recovery.crash import Kill, comparable, drill
from fedpeft.results.records import read_rounds
from fedpeft.running.launch import RayOptions, simulate

pytestmark = pytest.mark.integration


class ListenWatcher(threading.Thread):
    """Samples every listening TCP socket of this machine while a simulation runs, and the
    niceness of the Ray workers that run the clients."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.before = self._listening()
        self.seen: set[tuple[str, int, int | None]] = set()
        self.worker_niceness: set[int] = set()

    @staticmethod
    def _client_workers():
        for proc in psutil.process_iter(["cmdline", "nice"]):
            if any("ClientAppActor" in part for part in proc.info["cmdline"] or ()):
                yield proc.info["nice"]

    @staticmethod
    def _listening():
        return {
            (c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet") if c.status == "LISTEN"
        }

    def run(self):
        while not self.stop.is_set():
            self.seen |= self._listening()
            self.worker_niceness |= set(self._client_workers())
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


def test_the_in_process_engine_gives_the_same_run_and_bytes_up_to_flowers_random_ids(ray_run, tmp_path):
    """Same seed, in process: the same records and adapter; each message's size equals the
    Ray run's up to the varints of the four random 64-bit ids it carries (run, task, source
    and destination node: 9 or 10 bytes each), payloads to the byte."""
    from tests.conftest import TINY

    run_dir = simulate(TINY | {"results-dir": str(tmp_path), "run-name": "inprocess"}, engine="inprocess")
    ours, theirs = read_rounds(run_dir), read_rounds(ray_run[0])
    assert _comparable(ours) == _comparable(theirs)
    assert comparable(ours, message_bytes=False) == comparable(theirs, message_bytes=False)
    gaps = [
        (a[key] - b[key])
        for r, q in zip(ours, theirs, strict=True)
        for a, b in zip(r["clients"], q["clients"], strict=True)
        for key in ("bytes_down", "bytes_up")
    ]
    assert gaps and all(abs(g) <= 4 for g in gaps), gaps
    a = load_file(str(ray_run[0] / "adapter" / "exchanged.safetensors"))
    b = load_file(str(run_dir / "adapter" / "exchanged.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_ray_workers_run_at_the_drivers_priority(ray_run):
    # Ray would start them at nice 15: beside any normal-priority process they starve.
    watcher = ray_run[1]
    assert watcher.worker_niceness == {os.nice(0)}, f"client workers at nice {watcher.worker_niceness}"


def test_nothing_listened_beyond_loopback(ray_run):
    watcher = ray_run[1]
    new = watcher.seen - watcher.before
    assert new, "the watcher saw no Ray sockets at all"
    exposed = {s for s in new if not _is_loopback(s[0])}
    assert not exposed, f"sockets listening beyond loopback: {sorted(exposed)}"


def _comparable(rounds):
    """Per-round records minus wall time and node ids (a new engine draws new ids, and a
    message's size includes its node ids as varints, so sizes may move by a byte)."""
    return [
        (
            r["round"],
            r["accuracy"],
            r["loss"],
            r["train_loss"],
            [(c["partition_id"], c["ok"], c["num_examples"], c["train_loss"]) for c in r["clients"]],
        )
        for r in rounds
    ]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedpeft.cli", "run", *args, "--num-cpus", "2"]


def test_sigkill_then_resume_gives_the_same_run_as_without_a_crash(ray_run, tmp_path):
    """The same seed through `fedpeft run`, SIGKILLed inside a Ray worker right after a
    client trained, then resumed, equals `ray_run`.

    The kill takes the whole process tree (launcher, Flower's engine, every Ray process).
    This also shows same-seed determinism on Ray. State that is not trivial (FedAdam
    moments, ComPEFT both ways, DP ledgers, failures) is drilled in process in
    tests/integration/test_crash_resume.py and on both engines by benchmarks/crash_resume.py.
    """
    from tests.conftest import TINY

    sets = [
        f"--set={k}={v}" for k, v in (TINY | {"results-dir": str(tmp_path), "run-name": "killed"}).items()
    ]
    run_dir = tmp_path / "killed"
    # 3 clients on 2 workers over 2 rounds: some worker trains its 2nd client (in round 1 if
    # it served two of round 1's three, else in round 2).
    attempts = drill(
        _cli(*sets),
        _cli("--resume", str(run_dir)),
        run_dir,
        [Kill("train", 2)],
        log=tmp_path / "log",
        timeout=600,
    )
    assert [a.killed for a in attempts] == [True, False], attempts
    assert attempts[1].command == "resume"
    assert re.search(r"resuming after round [01]\b", (tmp_path / "log").read_text())
    # Node ids are Flower's random ones: whole-message sizes may move by a byte, payloads not.
    assert comparable(read_rounds(run_dir), message_bytes=False) == comparable(
        read_rounds(ray_run[0]), message_bytes=False
    )
    assert _comparable(read_rounds(run_dir)) == _comparable(read_rounds(ray_run[0]))
    a = load_file(str(ray_run[0] / "adapter" / "exchanged.safetensors"))
    b = load_file(str(run_dir / "adapter" / "exchanged.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bit-identical on the CPU


def test_codec_on_both_directions_on_ray(tmp_path):
    from tests.conftest import TINY

    codec = {"codec.name": "compeft", "codec.downlink": "compeft", "num-rounds": 3}
    run_dir = simulate(
        TINY | codec | {"results-dir": str(tmp_path), "run-name": "codec"}, RayOptions(num_cpus=2)
    )
    rounds = read_rounds(run_dir)
    assert all(r["num_replied"] == 3 and r["num_failed"] == 0 for r in rounds[1:])
    # uplink coded every round; downlink: round 1 only a checksum of the seeded initial
    # state every Ray worker builds itself, then coded deltas (density 1 by default: a sign
    # per entry plus the entropy-coded zeros, under two bits per entry: 18.9 kB per client)
    assert all(c["bytes_up"] < 20_000 for r in rounds[1:] for c in r["clients"])
    assert rounds[1]["bytes_down"] < 3 * 1_500 and rounds[2]["bytes_down"] < 3 * 18_900
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


def test_a_vision_federation_on_ray_loads_back_and_predicts(tmp_path):
    """FedPEFT's setting on Ray: DINOv2-S/14 with deep visual prompts, 3 clients on
    Fashion-MNIST; the saved model is rebuilt and gives the server's last accuracy."""
    from fedpeft.config import RunConfig
    from fedpeft.models import load_saved
    from fedpeft.tasks import get_task
    from tests.conftest import TINY_VISION

    overrides = TINY_VISION | {"peft.method": "vpt", "vpt.depth": "deep", "train.learning-rate": 3e-3}
    run_dir = simulate(
        overrides | {"results-dir": str(tmp_path), "run-name": "vision"}, RayOptions(num_cpus=2)
    )
    rounds = read_rounds(run_dir)
    assert all(r["num_replied"] == 3 and r["num_failed"] == 0 for r in rounds[1:])
    assert rounds[-1]["accuracy"] > 1 / 10  # above chance on 10 classes
    cfg = RunConfig.from_run_config(overrides)
    task = get_task(cfg)
    model = load_saved(run_dir / "adapter")
    assert task.evaluate(model, task.server_test_set(cfg), 64).metrics["accuracy"] == rounds[-1]["accuracy"]
