"""Checkpoints: atomic files, client state per round, and a resumed run equal to an uninterrupted one."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from safetensors.numpy import load_file

from fedpeft.apps import client_app
from fedpeft.apps.server_app import run_server
from fedpeft.config import RunConfig
from fedpeft.recovery.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    ClientStateStore,
    read_verified,
    write_atomic,
)
from fedpeft.recovery.crash import TIMING_FIELDS
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid, seeded_node_ids


def test_a_cut_short_or_altered_file_is_never_read(tmp_path):
    path = tmp_path / "x.bin"
    write_atomic(path, b"hello" * 100)
    assert read_verified(path) == b"hello" * 100
    raw = path.read_bytes()
    path.write_bytes(raw[:-7])  # what a crash in the middle of a plain write would leave
    with pytest.raises(CheckpointError, match="checksum"):
        read_verified(path)
    path.write_bytes(raw[:10])
    with pytest.raises(CheckpointError, match="cut short"):
        read_verified(path)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_client_state_store_keeps_two_rounds_and_loads_the_latest_usable(tmp_path):
    store = ClientStateStore(tmp_path, 3)
    for r in (1, 2, 4):
        store.save(r, RecordDict({"ledger": ConfigRecord({"round": r})}))
    assert store.rounds() == [2, 4]
    assert store.load(up_to_round=3)["ledger"]["round"] == 2
    assert store.load(up_to_round=9)["ledger"]["round"] == 4
    assert store.load(up_to_round=1) is None


class Crash(BaseException):
    """Stands in for SIGKILL: nothing in the app catches it."""


def _without_timing(rounds):
    """Records minus what differs between engines by design: wall time and node ids."""
    out = []
    for r in rounds:
        row = {k: v for k, v in r.items() if k not in TIMING_FIELDS}
        row["clients"] = [{k: v for k, v in c.items() if k != "node_id"} for c in r["clients"]]
        out.append(row)
    return out


# State everywhere: server optimizer moments (FedAdam), the codec's versions and error
# feedback on both sides, privacy ledgers on both sides and the budget.
STATEFUL = {
    "strategy.name": "fedadam",
    "codec.name": "compeft",
    "codec.downlink": "compeft",
    "dp.mode": "local",
    "dp.noise-multiplier": 0.8,
    "dp.epsilon-budget": 50.0,
}


def test_a_run_resumed_after_a_crash_equals_an_uninterrupted_one(tiny_overrides, tmp_path):
    base = tiny_overrides | STATEFUL  # 2 rounds: crash in round 2, resume after round 1
    whole_cfg = RunConfig.from_run_config(base | {"run-name": "whole"})
    whole = run_server(DirectGrid(client_app.app, 3, whole_cfg.to_run_config()), whole_cfg)

    cfg = RunConfig.from_run_config(base | {"run-name": "crashed"})
    calls = {"train": 0}

    def crashing(msg, context):
        if msg.metadata.message_type == "train":
            calls["train"] += 1
            if calls["train"] == 5:  # round 2, after one client of it trained and saved its state
                raise Crash
        return client_app.app(msg, context)

    with pytest.raises(Crash):
        run_server(DirectGrid(crashing, 3, cfg.to_run_config()), cfg)
    run_dir = tmp_path / "results" / "crashed"
    assert Checkpoint.load(run_dir).round == 1
    assert max(r["round"] for r in read_rounds(run_dir)) == 1

    resumed_cfg = RunConfig.from_run_config(base | {"run-name": "crashed", "resume": True})
    # A new engine as on Ray: new node ids, fresh contexts; state comes back from the
    # checkpoint and disk. (Ids of the same varint length as before: a message's size
    # includes its node ids.)
    new_ids = [node ^ 1 for node in seeded_node_ids(resumed_cfg.seed, 3)]
    grid = DirectGrid(client_app.app, 3, resumed_cfg.to_run_config(), node_ids=new_ids)
    run_server(grid, resumed_cfg)

    assert _without_timing(read_rounds(run_dir)) == _without_timing(read_rounds(whole))
    a, b = (
        load_file(str(whole / "adapter" / "exchanged.safetensors")),
        load_file(str(run_dir / "adapter" / "exchanged.safetensors")),
    )
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bit-identical
    assert json.loads((run_dir / "config.json").read_text())["resume"] is False  # the run's own config


def test_a_finished_run_resumed_for_more_rounds_records_its_new_length(tiny_overrides, tmp_path):
    """How a benchmark extends its runs (``benchmarks/frontier.py --rounds``): the folder's
    config says how many rounds it now holds, so reports and plots label it right."""
    short = RunConfig.from_run_config(tiny_overrides | {"run-name": "grown", "num-rounds": 1})
    run_dir = run_server(DirectGrid(client_app.app, 3, short.to_run_config()), short)
    longer = RunConfig.from_run_config(
        tiny_overrides | {"run-name": "grown", "num-rounds": 2, "resume": True}
    )
    run_server(DirectGrid(client_app.app, 3, longer.to_run_config()), longer)
    saved = json.loads((run_dir / "config.json").read_text())
    assert [r["round"] for r in read_rounds(run_dir)] == [0, 1, 2]
    assert saved["num-rounds"] == 2 and saved["resume"] is False
    assert saved == short.to_run_config() | {"num-rounds": 2}


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_overrides, tmp_path):
    from fedpeft.running.launch import preflight

    cfg = RunConfig.from_run_config(tiny_overrides | {"resume": True, "run-name": "never-ran"})
    with pytest.raises(CheckpointError, match=f"no {CHECKPOINT_FILE}"):
        preflight(cfg)


def test_resume_clears_cut_short_writes_and_refuses_a_damaged_client_state(tmp_path):
    from fedpeft.recovery.checkpoint import prepare_resume

    store = ClientStateStore(tmp_path, 0)
    for r in (1, 2):
        store.save(r, RecordDict({"ledger": ConfigRecord({"round": r})}))
    # What a kill in the middle of writing round 3's state and the checkpoint leaves behind.
    (store.folder / ".round-000003.state.123.tmp").write_bytes(b"half")
    (tmp_path / f".{CHECKPOINT_FILE}.123.tmp").write_bytes(b"half")
    prepare_resume(tmp_path, up_to_round=2)
    assert not list(tmp_path.rglob(".*.tmp"))
    assert store.load(up_to_round=2)["ledger"]["round"] == 2
    # A state file damaged at rest (not by a kill: those never reach the final name).
    path = store.folder / "round-000002.state"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="round-000002.state.*checksum"):
        prepare_resume(tmp_path, up_to_round=2)
    prepare_resume(tmp_path, up_to_round=1)  # a resume that needs only round 1's state is fine


def test_a_checkpoint_naming_a_class_that_moved_is_refused_clearly(tmp_path):
    """Checkpoints from before the server wing pickled e.g. ``fedpeft.guard.UpdateGuard``."""
    from fedpeft.recovery.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError, write_atomic

    old_class_path = b"cfedpeft.guard\nUpdateGuard\n."  # a pickle: the class by its old path
    write_atomic(tmp_path / CHECKPOINT_FILE, old_class_path)
    with pytest.raises(CheckpointError, match=r"older fedpeft whose classes moved.*start the run again"):
        Checkpoint.load(tmp_path)
