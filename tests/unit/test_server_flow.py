"""The real ServerApp logic and ClientApp, run in-process over DirectGrid (no Ray)."""

import json
import math

import pytest
from flwr.common.serde import message_to_proto

from fedpeft.apps import client_app as client_module
from fedpeft.apps.server_app import run_server
from fedpeft.config import RunConfig
from fedpeft.recovery.crash import TIMING_FIELDS
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid, seeded_node_ids
from fedpeft.server.discovery import ClientDiscoveryError


class Recording:
    """Wraps the real ClientApp and keeps every message it received and sent."""

    def __init__(self):
        self.app = client_module.app
        self.seen = []

    def __call__(self, msg, context):
        reply = self.app(msg, context)
        self.seen.append((msg, reply))
        return reply


def _run(cfg: RunConfig, app=None, fail=()):
    grid = DirectGrid(app or client_module.app, cfg.num_clients, cfg.to_run_config())
    grid.fail_nodes = {list(grid.contexts)[i] for i in fail}
    return run_server(grid, cfg), grid


def test_round_records_bytes_and_results_folder(tiny_cfg):
    recording = Recording()
    run_dir, _ = _run(tiny_cfg, recording)
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for name in (
        "config.json",
        "versions.json",
        "rounds.jsonl",
        "rounds.csv",
        "clients.csv",
        "progress.png",
        "partitions.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text()) == tiny_cfg.to_run_config()

    # Every train message's size, recomputed independently from the message itself.
    train = [(m, r) for m, r in recording.seen if m.metadata.message_type == "train"]
    assert len(train) == 2 * tiny_cfg.num_clients
    by_node = {c["node_id"]: c for c in rounds[1]["clients"]}
    for msg, reply in train[: tiny_cfg.num_clients]:
        rec = by_node[msg.metadata.dst_node_id]
        assert rec["bytes_down"] == len(message_to_proto(msg).SerializeToString())
        assert rec["bytes_up"] == len(message_to_proto(reply).SerializeToString())
        assert rec["payload_up"] == reply.content["arrays"].count_bytes()
    r1 = rounds[1]
    assert r1["num_replied"] == 3 and r1["num_failed"] == 0
    assert r1["bytes_up"] == sum(c["bytes_up"] for c in r1["clients"])
    assert rounds[2]["cum_bytes_up"] == rounds[0]["bytes_up"] + r1["bytes_up"] + rounds[2]["bytes_up"]
    assert sorted(c["partition_id"] for c in r1["clients"]) == [0, 1, 2]
    assert math.isfinite(r1["train_loss"]) and rounds[0]["train_loss"] is None


def test_evaluation_every_few_rounds_on_a_subsample_and_the_last_on_everything(tiny_cfg, capsys):
    """evaluate-every = 2 over 3 rounds: rounds 0, 2 and 3 evaluated (the last always);
    round 1 recorded as not evaluated; every evaluation before the last on the first 6
    test examples, the last on the whole test split; the report and the plot take it."""
    from fedpeft.results.report import summarize
    from fedpeft.tasks import get_task

    cfg = RunConfig.from_run_config(
        tiny_cfg.to_run_config() | {"num-rounds": 3, "evaluate-every": 2, "evaluate-examples": 6}
    )
    run_dir, _ = _run(cfg)
    rounds = read_rounds(run_dir)
    whole = len(get_task(cfg).server_test_set(cfg))
    assert whole > 6
    assert [r["evaluated_on"] for r in rounds] == [6, 0, 6, whole]
    assert rounds[1]["accuracy"] is None and rounds[1]["loss"] is None and rounds[1]["metrics"] == {}
    assert all(isinstance(rounds[i]["accuracy"], float) for i in (0, 2, 3))
    assert rounds[1]["time_split"]["server-evaluate"] < rounds[3]["time_split"]["server-evaluate"]
    assert "round  1/3 | not evaluated | up" in capsys.readouterr().out
    summary = summarize(run_dir)
    assert summary.final_accuracy == rounds[3]["accuracy"]
    assert summary.best_accuracy == max(rounds[i]["accuracy"] for i in (0, 2, 3))
    assert summary.train_seconds > 0 and summary.evaluate_seconds > 0 and summary.server_seconds >= 0
    assert (run_dir / "progress.png").stat().st_size > 0
    from fedpeft.results.report import Group, curve

    xs, mean, _, _ = curve(Group("g", {}, [summary]), "round")
    assert xs == [0.0, 2.0, 3.0] and all(math.isfinite(m) for m in mean)  # round 1 left out


def test_same_seed_same_rounds_different_seed_differs(tiny_cfg, tmp_path):
    a, _ = _run(tiny_cfg)
    b, _ = _run(RunConfig.from_run_config(tiny_cfg.to_run_config() | {"run-name": "again"}))
    c, _ = _run(RunConfig.from_run_config(tiny_cfg.to_run_config() | {"run-name": "other", "seed": 1}))
    acc = [[r["accuracy"] for r in read_rounds(d)] for d in (a, b, c)]
    loss = [[r["train_loss"] for r in read_rounds(d)] for d in (a, b, c)]
    assert acc[0] == acc[1] and loss[0] == loss[1]
    assert loss[0] != loss[2]
    # In process, the records agree to the byte, node ids included (they come from the seed).
    untimed = [
        [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_rounds(d)] for d in (a, b, c)
    ]
    assert untimed[0] == untimed[1]
    ids = [{cl["node_id"] for cl in read_rounds(d)[1]["clients"]} for d in (a, c)]
    assert ids[0] != ids[1]


def test_in_process_node_ids_are_seeded_and_as_wide_as_flowers():
    ids = seeded_node_ids(0, 1000)
    assert ids == seeded_node_ids(0, 1000) and ids != seeded_node_ids(1, 1000)
    assert len(set(ids)) == 1000 and all(1 < node < 2**64 for node in ids)
    # Uniform 64-bit draws, as Flower's: about half need the 10-byte varint.
    assert 400 < sum(node >= 2**63 for node in ids) < 600
    grid = DirectGrid(client_module.app, 3, {"seed": 5})
    assert list(grid.contexts) == seeded_node_ids(5, 3)
    assert [grid.contexts[n].node_config["partition-id"] for n in grid.contexts] == [0, 1, 2]


def test_client_sampling_is_seeded(tiny_cfg):
    cfg = RunConfig.from_run_config(
        tiny_cfg.to_run_config()
        | {"num-clients": 4, "fraction-train": 0.5, "num-rounds": 3, "train.max-steps": 1}
    )
    runs = []
    for name in ("s1", "s2"):
        run_dir, _ = _run(RunConfig.from_run_config(cfg.to_run_config() | {"run-name": name}))
        runs.append([sorted(c["partition_id"] for c in r["clients"]) for r in read_rounds(run_dir)[1:]])
    assert runs[0] == runs[1]
    assert all(len(parts) == 2 for parts in runs[0])


def test_a_client_that_never_replies_is_recorded_and_the_run_goes_on(tiny_cfg):
    cfg = RunConfig.from_run_config(tiny_cfg.to_run_config() | {"round-timeout": 0.5, "connect-timeout": 0.5})
    grid = DirectGrid(client_module.app, cfg.num_clients, cfg.to_run_config())
    run_dir = None
    # Discovery needs everyone; failures start afterwards.
    original = grid.pull_messages

    def pull(ids):
        out = original(ids)
        grid.fail_nodes = {next(iter(grid.contexts))}
        return out

    grid.pull_messages = pull
    run_dir = run_server(grid, cfg)
    r1 = read_rounds(run_dir)[1]
    failed = [c for c in r1["clients"] if not c["ok"]]
    assert r1["num_failed"] == 1 and r1["num_replied"] == 2
    assert failed[0]["error"] == "no reply before the round timeout" and failed[0]["bytes_up"] == 0
    assert failed[0]["bytes_down"] > 0


def test_discovery_fails_clearly_when_clients_are_missing(tiny_cfg):
    cfg = RunConfig.from_run_config(tiny_cfg.to_run_config() | {"connect-timeout": 0.3})
    grid = DirectGrid(client_module.app, 2, cfg.to_run_config())  # config says 3
    with pytest.raises(ClientDiscoveryError, match="num-clients=3"):
        run_server(grid, cfg)


def test_discovery_asks_in_batches_and_finds_every_node(tiny_cfg, monkeypatch):
    from fedpeft.server import discovery
    from fedpeft.server.meter import MeteredGrid

    monkeypatch.setattr(discovery, "DISCOVERY_BATCH", 2)  # 3 nodes: batches of 2 and 1
    grid = MeteredGrid(DirectGrid(client_module.app, tiny_cfg.num_clients, tiny_cfg.to_run_config()))
    pushed = []
    push = grid.push_messages
    monkeypatch.setattr(
        grid, "push_messages", lambda msgs: pushed.append(len(msgs := list(msgs))) or push(msgs)
    )
    described = discovery.describe_nodes(grid, tiny_cfg)
    assert pushed == [2, 1]
    assert sorted(int(m["partition-id"]) for m in described.values()) == [0, 1, 2]
