"""The codec in a whole federation: real apps over DirectGrid, both directions."""

import math

import numpy as np
import pytest

from fedpeft.apps import client_app as client_module
from fedpeft.apps.server_app import run_server
from fedpeft.codecs.flower import PAYLOAD_KEY, payload_record
from fedpeft.config import RunConfig
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from fedpeft.wire import ARRAYS_KEY


def _run(overrides, app=None):
    cfg = RunConfig.from_run_config(overrides)
    grid = DirectGrid(app or client_module.app, cfg.num_clients, cfg.to_run_config())
    return read_rounds(run_server(grid, cfg)), grid


@pytest.fixture(scope="module")
def dense_rounds(tmp_path_factory):
    from tests.conftest import TINY

    return _run(
        TINY | {"results-dir": str(tmp_path_factory.mktemp("d")), "run-name": "dense", "num-rounds": 3}
    )[0]


@pytest.mark.parametrize("downlink", ["none", "fp16", "compeft"])
def test_codec_both_directions(tiny_overrides, dense_rounds, downlink):
    rounds, _ = _run(tiny_overrides | {"codec.name": "compeft", "codec.downlink": downlink, "num-rounds": 3})
    dense_up = dense_rounds[1]["bytes_up"]
    for r in rounds[1:]:
        assert r["num_replied"] == 3 and r["num_failed"] == 0
        assert r["bytes_up"] < dense_up / 25  # 10% density: ~0.58 bits instead of 32 per parameter
        for c in r["clients"]:
            m = c["metrics"]
            assert m["codec-raw-bytes"] == 4 * 75_653
            assert m["codec-bits-per-param"] < 1.03 * m["codec-bound-bits-per-param"] + 0.01
            assert m["codec-ratio"] > 40
    down = [r["bytes_down"] for r in rounds[1:]]
    dense_down = dense_rounds[1]["bytes_down"]
    if downlink == "none":
        assert all(d > 0.99 * dense_down for d in down)
    else:  # round 1: every node builds the seeded initial state, only a checksum travels
        assert down[0] < dense_down / 100
    if downlink == "fp16":  # then fp16 deltas
        assert all(0.45 * dense_down < d < 0.55 * dense_down for d in down[1:])
    if downlink == "compeft":  # then coded deltas, density 1 by default: under 2 bits per entry
        assert all(d < dense_down / 16 for d in down[1:])
    assert all(math.isfinite(r["loss"]) for r in rounds)
    assert rounds[-1]["loss"] < rounds[0]["loss"]


class CorruptOne:
    """The real ClientApp, but node `bad` flips one byte of its encoded reply."""

    def __init__(self, bad_partition: int):
        self.bad = bad_partition

    def __call__(self, msg, context):
        reply = client_module.app(msg, context)
        if msg.metadata.message_type == "train" and context.node_config["partition-id"] == self.bad:
            array = reply.content.array_records[ARRAYS_KEY][PAYLOAD_KEY]
            data = bytearray(array.data)
            data[len(data) // 2] ^= 0x10
            reply.content[ARRAYS_KEY] = payload_record(bytes(data), array.stype)
        return reply


def test_a_corrupt_payload_is_rejected_recorded_and_the_run_goes_on(tiny_overrides):
    rounds, _ = _run(tiny_overrides | {"codec.name": "compeft"}, CorruptOne(bad_partition=1))
    for r in rounds[1:]:
        bad = [c for c in r["clients"] if c["partition_id"] == 1]
        assert r["num_failed"] == 1 and r["num_replied"] == 2
        assert bad[0]["error"].startswith("rejected payload (checksum)")
        assert bad[0]["num_examples"] == 0 and bad[0]["bytes_up"] > 0
        assert math.isfinite(r["loss"]) and not np.isnan(r["accuracy"])


def test_error_feedback_state_lives_in_context_state(tiny_overrides):
    _, grid = _run(tiny_overrides | {"codec.name": "compeft", "codec.downlink": "compeft"})
    for context in grid.contexts.values():
        assert "fedpeft.codec.residual" in context.state.array_records
        assert int(context.state.config_records["fedpeft.codec.meta"]["version"]) == 2
    _, grid = _run(
        tiny_overrides | {"run-name": "no-ef", "codec.name": "compeft", "codec.error-feedback": False}
    )
    assert all("fedpeft.codec.residual" not in c.state.array_records for c in grid.contexts.values())


class WrongType(CorruptOne):
    """Node `bad` labels its (intact) payload as another codec's."""

    def __call__(self, msg, context):
        reply = client_module.app(msg, context)
        if msg.metadata.message_type == "train" and context.node_config["partition-id"] == self.bad:
            array = reply.content.array_records[ARRAYS_KEY][PAYLOAD_KEY]
            reply.content[ARRAYS_KEY] = payload_record(bytes(array.data), "fedpeft.int8/2")
        return reply


def test_a_payload_of_another_codec_type_is_rejected(tiny_overrides):
    rounds, _ = _run(tiny_overrides | {"codec.name": "compeft", "num-rounds": 1}, WrongType(bad_partition=2))
    bad = [c for c in rounds[1]["clients"] if c["partition_id"] == 2]
    assert bad[0]["error"].startswith("rejected payload (codec)") and rounds[1]["num_replied"] == 2
