"""Injected client failures: seeded, recorded with their reason, and the run completes."""

import math
from collections import Counter

import pytest

from fedpeft.apps import client_app
from fedpeft.apps.server_app import run_server
from fedpeft.config import ConfigError, RunConfig
from fedpeft.recovery.faults import draw
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid

THIRTY_PERCENT = {
    "failures.raise-probability": 0.1,
    "failures.hang-probability": 0.1,
    "failures.drop-probability": 0.1,
}


def test_draws_are_seeded_and_follow_the_probabilities():
    cfg = RunConfig.from_run_config(THIRTY_PERCENT | {"round-timeout": 5.0})
    kinds = Counter(draw(cfg, r, p) for r in range(1, 101) for p in range(100))
    assert all(abs(kinds[k] / 10_000 - 0.1) < 0.015 for k in ("raise", "hang", "drop"))
    assert [draw(cfg, 3, p) for p in range(50)] == [draw(cfg, 3, p) for p in range(50)]
    other = RunConfig.from_run_config(THIRTY_PERCENT | {"round-timeout": 5.0, "seed": 1})
    assert [draw(cfg, 3, p) for p in range(50)] != [draw(other, 3, p) for p in range(50)]


def test_a_run_with_thirty_percent_failures_completes_and_records_who_and_why(tiny_overrides):
    cfg = RunConfig.from_run_config(
        tiny_overrides | THIRTY_PERCENT | {"num-clients": 10, "round-timeout": 2.5, "train.max-steps": 2}
    )
    grid = DirectGrid(client_app.app, cfg.num_clients, cfg.to_run_config(), reply_timeout=cfg.round_timeout)
    rounds = read_rounds(run_server(grid, cfg))
    assert len(rounds) == cfg.num_rounds + 1
    failed = 0
    for r in rounds[1:]:
        assert math.isfinite(r["loss"]) and len(r["clients"]) == 10
        for c in r["clients"]:
            kind = draw(cfg, r["round"], c["partition_id"])
            assert c["ok"] == (kind == "ok"), (r["round"], c)
            if kind == "raise":
                assert "injected failure" in c["error"]
            elif kind in ("hang", "drop"):
                assert c["error"] == "no reply before the round timeout" and c["bytes_up"] == 0
            failed += kind != "ok"
    assert failed >= 3  # this seed draws a few of each; the rest aggregated
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


def test_too_few_replies_leave_the_global_model_as_it_was(tiny_overrides):
    cfg = RunConfig.from_run_config(tiny_overrides | {"failures.raise-probability": 1.0})
    rounds = read_rounds(run_server(DirectGrid(client_app.app, cfg.num_clients, cfg.to_run_config()), cfg))
    assert all(r["num_replied"] == 0 for r in rounds[1:])
    assert all(r["loss"] == rounds[0]["loss"] for r in rounds)
    cfg = RunConfig.from_run_config(tiny_overrides | {"min-replies": 4, "run-name": "min"})
    rounds = read_rounds(run_server(DirectGrid(client_app.app, cfg.num_clients, cfg.to_run_config()), cfg))
    assert all(r["num_replied"] == 3 for r in rounds[1:]) and all(
        r["loss"] == rounds[0]["loss"] for r in rounds
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"failures.raise-probability": 0.6, "failures.hang-probability": 0.6}, "sum to at most 1"),
        ({"failures.hang-probability": 0.1}, "round-timeout"),
    ],
)
def test_impossible_failure_settings_are_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config(overrides)


@pytest.mark.parametrize("kind", ["hang", "drop"])
def test_a_hung_or_dropped_client_leaves_its_state_as_it_was(kind):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedpeft.recovery.faults import failure_mod, simulated_time

    cfg = RunConfig.from_run_config({f"failures.{kind}-probability": 1.0, "round-timeout": 30.0})
    DirectGrid(client_app.app, 1, cfg.to_run_config())  # gives Message() a run identity, as in a run
    context = Context(1, 7, {"partition-id": 0, "num-partitions": 1}, RecordDict(), {})
    context.state["ledger"] = ConfigRecord({"steps": 4})
    trained = []

    def train(msg, ctx):  # stands in for the codec mod and training: they change the state
        trained.append(msg)
        ctx.state["ledger"] = ConfigRecord({"steps": 8})
        return Message(RecordDict(), reply_to=msg)

    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 3})}), 7, "train")
    with simulated_time() as clock:
        failure_mod(lambda _: cfg)(msg, context, train)
    assert clock.elapsed > cfg.round_timeout  # late, in simulated time: nothing slept
    assert len(trained) == (kind == "drop")  # a hung client never trains that round
    assert context.state["ledger"]["steps"] == 4  # and neither keeps anything of it
