import os
from pathlib import Path

import pytest

from fedpeft.config import ConfigError, RunConfig
from fedpeft.results.sweep import Sweep
from fedpeft.running.launch import (
    RAY_WORKER_NICENESS,
    Launch,
    RayOptions,
    _resumed_launch,
    engine_environment,
    load_experiment,
    parse_set,
    preflight,
    ray_backend_config,
    resolve_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_set_values_parse_as_toml_scalars_or_strings():
    assert parse_set(
        ["lora.r=4", "fraction-train=0.5", "data.dataset=wordnet-nouns", 'device="cpu"', "x=true"]
    ) == {
        "lora.r": 4,
        "fraction-train": 0.5,
        "data.dataset": "wordnet-nouns",
        "device": "cpu",
        "x": True,
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["lora.r"])


@pytest.mark.parametrize("path", sorted((ROOT / "simulations").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_experiment_is_a_valid_config(path):
    """Experiment files and sweep files alike: every point validates; the head says how to launch
    it and (sweeps) how long it takes here."""
    text = path.read_text()
    head = text.split("\n\n")[0]
    if "[sweep]" in text:
        assert text.startswith("#") and "fedpeft sweep" in head and "fedpeft report" in head
        assert "minutes here" in text.split("[sweep]")[0]
        assert len(Sweep.load(path).resolve()) > 1
        return
    assert text.startswith("#") and ("fedpeft run" in head or "fedpeft deploy" in head)  # how to launch it
    cfg, _ = resolve_config(load_experiment(path))
    preflight(cfg)


def test_unknown_keys_fail_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'num-rounds'"):
        resolve_config({"num-round": 3})


def test_results_folder_is_pinned_and_local_files_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("text,label\na,x\nb,y\n")
    cfg, final = resolve_config({"results-dir": "out", "data.dataset": "d.csv"})
    assert Path(final["results-dir"]) == tmp_path / "out" and final["run-name"]
    assert final["data.dataset"] == str(tmp_path / "d.csv") and cfg.data.dataset == final["data.dataset"]


def test_preflight_names_bad_registry_entries():
    with pytest.raises(ConfigError, match="peft.method"):
        preflight(RunConfig.from_run_config({"peft.method": "adapterz"}))
    with pytest.raises(ValueError, match="strategy.name"):
        preflight(RunConfig.from_run_config({"strategy.name": "fedsgd"}))


def test_ray_workers_get_the_drivers_priority_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv(RAY_WORKER_NICENESS, raising=False)
    engine_environment()
    assert os.environ[RAY_WORKER_NICENESS] == "0"  # added to the niceness they inherit
    monkeypatch.setenv(RAY_WORKER_NICENESS, "5")
    engine_environment()
    assert os.environ[RAY_WORKER_NICENESS] == "5"


def test_a_resumed_run_continues_on_the_engine_and_threads_it_started_with(tmp_path, capsys):
    default = Launch("ray", 1)
    assert _resumed_launch(tmp_path, None, default) == default  # a run from before launches were kept
    Launch("inprocess", 2).save(tmp_path / "not-yet")  # written before the results folder exists
    assert Launch.load(tmp_path / "not-yet") == Launch("inprocess", 2)
    Launch("inprocess", 2).save(tmp_path)
    assert Launch.load(tmp_path) == Launch("inprocess", 2)
    assert _resumed_launch(tmp_path, None, default) == Launch("inprocess", 2)
    assert _resumed_launch(tmp_path, "inprocess", Launch("inprocess", 1)) == Launch("inprocess", 2)
    assert capsys.readouterr().out == ""
    assert _resumed_launch(tmp_path, "ray", default) == default  # asked for: honoured, and said
    assert "started on the inprocess engine and resumes on ray" in capsys.readouterr().out


def test_ray_resources_are_explicit_and_local_by_default():
    backend = ray_backend_config(
        RunConfig(device="cpu"), RayOptions(cpus_per_client=1, num_cpus=2, object_store_mb=300)
    )
    init = backend["init_args"]
    assert backend["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert init["address"] == "local" and init["num_cpus"] == 2 and not init["include_dashboard"]
    assert init["object_store_memory"] == 300 * 1024 * 1024
    cluster = ray_backend_config(RunConfig(device="cpu"), RayOptions(address="127.0.0.1:6379"))["init_args"]
    assert cluster["address"] == "127.0.0.1:6379" and "num_cpus" not in cluster


def _linkstate_with_messages(num_nodes: int, dst_index: list[int]):
    """Flower's in-memory LinkState as the simulation engine sets it up, with queued messages."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = _register_nodes(num_nodes, factory)
    state = factory.state()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run.run_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    nodes = list(mapping)
    msgs = [
        Message(RecordDict({"c": ConfigRecord({"i": i})}), nodes[d], "train") for i, d in enumerate(dst_index)
    ]
    ids = list(grid.push_messages(msgs))
    return factory, mapping, nodes, ids


def test_one_pass_delivery_hands_out_what_flowers_sweep_does_one_message_per_node_at_a_time():
    import uuid

    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.server.superlink.fleet.vce.vce_api import add_messages_to_queue

    from fedpeft.flower_compat import deliver_pending

    dst = [0, 3, 3, 5, 9, 0]  # two nodes with two messages each: one per node per sweep
    factory, mapping, nodes, _ = _linkstate_with_messages(10, dst)
    ours = [deliver_pending(factory.state(), mapping) for _ in range(3)]

    factory2, mapping2, nodes2, _ = _linkstate_with_messages(10, dst)
    state2 = factory2.state()
    theirs = []
    for _ in range(3):  # Flower's sweep, as add_messages_to_queue runs it
        theirs.append([m for node in mapping2 for m in state2.get_message_ins(node_id=node, limit=1)])

    def shape(sweeps, order):
        return [sorted((order.index(m.metadata.dst_node_id), m.content["c"]["i"]) for m in s) for s in sweeps]

    # Flower hands node 0 and 3 their second message while the first is still running; we
    # wait for each node's reply first (as a SuperNode does), then hand out the same ones.
    assert shape(theirs, nodes2) == [[(0, 0), (3, 1), (5, 3), (9, 4)], [(0, 5), (3, 2)], []]
    assert shape(ours, nodes) == [[(0, 0), (3, 1), (5, 3), (9, 4)], [], []]
    state = factory.state()
    for m in ours[0]:
        reply = Message(RecordDict({"r": ConfigRecord({"i": 0})}), reply_to=m)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        assert state.store_message_res(reply)
    later = [deliver_pending(state, mapping) for _ in range(2)]
    assert shape(later, nodes) == [[(0, 5), (3, 2)], []]
    assert all(m.metadata.delivered_at for s in ours + later for m in s)
    assert add_messages_to_queue.__module__ == "flwr.server.superlink.fleet.vce.vce_api"


def test_one_pass_delivery_skips_expired_messages_and_restores_flowers_loop():
    from flwr.server.superlink.fleet.vce import vce_api

    from fedpeft.flower_compat import deliver_pending, one_pass_delivery

    factory, mapping, _, ids = _linkstate_with_messages(4, [1, 2])
    state = factory.state()
    state.message_ins_store[ids[0]].metadata.__dict__["_ttl"] = 1e-9  # expired
    got = deliver_pending(state, mapping)
    assert [m.content["c"]["i"] for m in got] == [1]
    assert ids[0] not in state.message_ins_store  # dropped, as Flower's check does

    original = vce_api.add_messages_to_queue
    with one_pass_delivery():
        assert vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original


def test_one_pass_delivery_is_one_scan_not_one_per_node():
    import time

    from fedpeft.flower_compat import deliver_pending

    factory, mapping, _, _ = _linkstate_with_messages(5000, list(range(10)))
    state = factory.state()
    t = time.perf_counter()
    for _ in range(20):
        deliver_pending(state, mapping)
    ours = (time.perf_counter() - t) / 20
    t = time.perf_counter()
    for node in mapping:
        state.get_message_ins(node_id=node, limit=1)
    flowers = time.perf_counter() - t
    assert ours < flowers / 5, (ours, flowers)


def test_shared_run_config_registers_what_flower_does_with_one_config():
    import copy

    from flwr.app import ConfigRecord
    from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.supercore.run import Run

    from fedpeft.flower_compat import register_node_info_stores, shared_run_config
    from fedpeft.running.launch import app_dir

    mapping = {101: 0, 205: 1, 309: 2, 412: 3}
    run = Run.create_empty(run_id=77)
    run.override_config = {"num-clients": 4, "num-rounds": 3}
    theirs = vce_api._register_node_info_stores(mapping, run, str(app_dir()))
    original = vce_api._register_node_info_stores
    with shared_run_config():
        assert vce_api._register_node_info_stores is not original
        ours = vce_api._register_node_info_stores(mapping, run, str(app_dir()))  # as start_vce calls it
    assert vce_api._register_node_info_stores is original
    assert ours.keys() == theirs.keys() == mapping.keys()
    configs = set()
    for node_id, partition_id in mapping.items():
        mine, flowers = ours[node_id].retrieve_context(77), theirs[node_id].retrieve_context(77)
        assert (
            mine.node_config == flowers.node_config == {PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: 4}
        )
        assert ours[node_id].node_config == mine.node_config and ours[node_id].node_id == node_id
        assert (mine.run_id, mine.node_id, mine.series_id) == (
            flowers.run_id,
            flowers.node_id,
            flowers.series_id,
        )
        assert mine.run_config == flowers.run_config and mine.run_config["num-rounds"] == 3
        assert len(mine.state) == len(flowers.state) == 0
        assert (
            ours[node_id].run_infos[77].initial_run_config == theirs[node_id].run_infos[77].initial_run_config
        )
        configs |= {id(mine.run_config), id(ours[node_id].run_infos[77].initial_run_config)}
    assert len(configs) == 1  # one dict for every node, context and initial config alike
    # a Context as a ClientApp returns it (deserialized: its own copies) is accepted, as with
    # Flower's, and then points at the shared dicts again; a changed run_config still raises
    returned = copy.deepcopy(ours[101].retrieve_context(77))
    returned.state["x"] = ConfigRecord({"a": 1})
    assert returned.run_config is not ours[205].retrieve_context(77).run_config
    ours[101].update_context(77, returned)
    got = ours[101].retrieve_context(77)
    assert got is returned and "x" in got.state
    assert got.run_config is ours[205].retrieve_context(77).run_config
    assert got.node_config is ours[101].node_config
    changed = copy.deepcopy(got)
    changed.run_config["num-rounds"] = 9
    with pytest.raises(ValueError, match="cannot be modified"):
        ours[101].update_context(77, changed)
    assert ours[101].retrieve_context(77).run_config["num-rounds"] == 3
    assert register_node_info_stores.__module__ == "fedpeft.flower_compat"


def test_shared_run_config_falls_back_to_flower_without_an_app_folder():
    from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.supercore.run import Run

    from fedpeft.flower_compat import shared_run_config

    run = Run.create_empty(run_id=5)
    with shared_run_config():
        stores = vce_api._register_node_info_stores({1: 0, 2: 1}, run, None)  # is_app false
    assert {type(s) for s in stores.values()} == {DeprecatedRunInfoStore}  # Flower's own stores
    # Flower's get_fused_config(run) for an empty Run (no installed FAB): an empty config
    assert stores[1].retrieve_context(5).run_config == {}
