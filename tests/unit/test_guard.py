"""Broken or hostile dense updates never reach aggregation; the round goes on and records them."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp.strategy import FedAvg

from fedpeft.apps import client_app
from fedpeft.apps.server_app import run_server
from fedpeft.config import RunConfig
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from fedpeft.server.guard import UpdateGuard
from fedpeft.server.rejections import RejectionLog
from strategies.conformance import ToyGrid, make_reply

GLOBAL = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def _raw_reply(node, arrays):
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    return Message(content, reply_to=Message(RecordDict(), node, MessageType.TRAIN))


@pytest.fixture
def guarded():
    log = RejectionLog()
    guard = UpdateGuard(FedAvg(min_available_nodes=2, min_train_nodes=2), log, max_update_norm=10.0)
    nodes = list(range(1, 9))
    list(
        guard.configure_train(
            1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord(), ToyGrid(nodes)
        )
    )
    return guard, log


def test_only_sound_updates_are_aggregated_and_each_refusal_is_recorded(guarded):
    guard, log = guarded
    bad_w = GLOBAL["w"].copy()
    bad_w[0, 0] = np.nan
    replies = [
        make_reply(1, {k: v + 0.1 for k, v in GLOBAL.items()}, 1),
        make_reply(2, {k: v + 0.3 for k, v in GLOBAL.items()}, 1),
        make_reply(3, {"w": bad_w, "b": GLOBAL["b"]}, 1),
        make_reply(4, {"w": np.ones((2, 3), np.float32), "b": GLOBAL["b"]}, 1),
        make_reply(5, GLOBAL | {"extra": np.ones(1, np.float32)}, 1),
        make_reply(6, {"w": GLOBAL["w"] + 100.0, "b": GLOBAL["b"]}, 1),
        _raw_reply(7, {"w": np.ones((3, 2), np.int64), "b": GLOBAL["b"]}),
        make_reply(8, {"w": GLOBAL["w"] * np.inf, "b": GLOBAL["b"]}, 1),
    ]
    arrays, _ = guard.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), GLOBAL["w"] + 0.2, rtol=1e-6)
    reasons = log.drain()
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8]
    assert "NaN or Inf" in reasons[3] and "NaN or Inf" in reasons[8]
    assert "shape (2, 3)" in reasons[4]
    assert "unexpected ['extra']" in reasons[5]
    assert "exceeds strategy.max-update-norm" in reasons[6]
    assert "not floating point" in reasons[7]


def test_without_a_bound_large_but_finite_updates_pass():
    log = RejectionLog()
    guard = UpdateGuard(FedAvg(min_available_nodes=2, min_train_nodes=2), log)
    list(
        guard.configure_train(
            1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord(), ToyGrid([1, 2])
        )
    )
    arrays, _ = guard.aggregate_train(
        1, [make_reply(n, {k: v + 100.0 for k, v in GLOBAL.items()}, 1) for n in (1, 2)]
    )
    assert arrays is not None and not log.drain()


def test_a_poisoned_client_is_refused_and_the_run_goes_on(tiny_overrides):
    cfg = RunConfig.from_run_config(tiny_overrides | {"strategy.max-update-norm": 1e3})

    def poisoned(msg, context):
        reply = client_app.app(msg, context)
        if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 0:
            record = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord(
                {k: Array(np.full_like(v.numpy(), np.nan)) for k, v in record.items()}
            )
        return reply

    rounds = read_rounds(run_server(DirectGrid(poisoned, cfg.num_clients, cfg.to_run_config()), cfg))
    for r in rounds[1:]:
        by_pid = {c["partition_id"]: c for c in r["clients"]}
        assert not by_pid[0]["ok"] and "rejected update" in by_pid[0]["error"] and "NaN" in by_pid[0]["error"]
        assert by_pid[1]["ok"] and by_pid[2]["ok"]
        assert math.isfinite(r["loss"])
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
