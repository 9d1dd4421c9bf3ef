"""Transport settings in a whole federation (real apps over DirectGrid): the step search
on validation data, the mean over senders, small tensors apart, the density warm-up, the seeded first round,
downlink error feedback, and every registered codec on both directions."""

import math

import pytest

from fedpeft.apps import client_app as client_module
from fedpeft.apps.server_app import run_server
from fedpeft.codecs import CODECS
from fedpeft.config import ConfigError, RunConfig
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from fedpeft.server.rejections import RejectionLog


def _run(overrides):
    cfg = RunConfig.from_run_config(overrides)
    grid = DirectGrid(client_module.app, cfg.num_clients, cfg.to_run_config())
    return read_rounds(run_server(grid, cfg))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_both_ways_in_a_federation(tiny_overrides, name):
    rounds = _run(tiny_overrides | {"codec.name": name, "codec.downlink": name, "codec.density": 0.2})
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3]
    assert all(math.isfinite(r["loss"]) for r in rounds)
    if name != "none":
        ratios = [c["metrics"]["codec-ratio"] for r in rounds[1:] for c in r["clients"]]
        assert min(ratios) > (1.9 if name == "fp16" else 3.9)


def test_step_search_records_the_chosen_scale_and_keeps_the_test_set_apart(tiny_overrides):
    over = tiny_overrides | {
        "codec.name": "compeft",
        "server.step-search": "1,4",
        "data.validation-examples": 20,
    }
    rounds = _run(over)
    assert all(r["step_scale"] in (1.0, 4.0) for r in rounds[1:])
    assert rounds[0].get("step_scale") is None
    # the round's time, split: the search is server work; the parts add up to the wall time
    for r in rounds[1:]:
        split = r["time_split"]
        assert set(split) == {"clients-train", "server-evaluate", "server"}
        assert split["clients-train"] > 0 and sum(split.values()) == pytest.approx(
            r["wall_seconds"], abs=0.01
        )
    dense = RunConfig.from_run_config(tiny_overrides)
    coded = RunConfig.from_run_config(tiny_overrides | {"codec.name": "compeft"})
    searched = RunConfig.from_run_config(tiny_overrides | {"server.step-search": "1,2"})
    from fedpeft.tasks import classification as task

    # the default needs no server data, coded or not: every held-out example tests
    assert len(task.server_splits(dense)[0]) == 0 and len(task.server_splits(coded)[0]) == 0
    held_out = len(task.split(searched)[1])  # a dense run can search too
    assert len(task.server_splits(searched)[0]) == max(round(0.2 * held_out), min(32, held_out // 2))
    with pytest.raises(ConfigError, match="step-search"):
        RunConfig.from_run_config(
            tiny_overrides | {"server.step-search": "1,x", "data.validation-examples": 5}
        )


def test_sender_mean_only_changes_sparse_runs_and_refuses_central_dp(tiny_overrides):
    base = tiny_overrides | {"num-rounds": 1}
    dense = {
        mode: _run(base | {"run-name": f"dense-{mode}", "server.aggregate": mode})
        for mode in ("senders", "all")
    }
    assert dense["senders"][-1]["loss"] == dense["all"][-1]["loss"]  # a dense run is the same
    coded = {
        mode: _run(base | {"run-name": f"coded-{mode}", "codec.name": "compeft", "server.aggregate": mode})
        for mode in ("senders", "all")
    }
    assert coded["senders"][-1]["loss"] != coded["all"][-1]["loss"]
    from fedpeft.server.stack import strategy_stack

    central = base | {"codec.name": "compeft", "dp.mode": "central"}
    with pytest.raises(ConfigError, match="server.aggregate"):
        strategy_stack(RunConfig.from_run_config(central), RejectionLog())
    strategy_stack(RunConfig.from_run_config(central | {"server.aggregate": "all"}), RejectionLog())


def test_small_tensors_travel_apart_and_warmup_sends_more_early(tiny_overrides):
    base = tiny_overrides | {"codec.name": "compeft", "codec.density": 0.05, "num-rounds": 3}
    plain = _run(base | {"run-name": "plain"})
    split = _run(base | {"run-name": "split", "codec.small-tensors": 2000})
    warm = _run(base | {"run-name": "warm", "codec.warmup-rounds": 2, "codec.warmup-density": 0.5})
    up = lambda rounds, i: rounds[i]["bytes_up"]  # noqa: E731
    # the 5-class head (1,925 entries, fp16) costs ~3.9 kB more per client
    assert 3 * 3_500 < up(split, 1) - up(plain, 1) < 3 * 4_500
    assert (
        up(warm, 1) > 3 * up(plain, 1)
        and up(warm, 2) > up(plain, 2)
        and up(warm, 3) == pytest.approx(up(plain, 3), rel=0.05)
    )


def test_round_one_is_seeded_and_downlink_feedback_can_be_off(tiny_overrides):
    base = tiny_overrides | {"codec.name": "compeft", "codec.downlink": "compeft", "num-rounds": 3}
    on = _run(base | {"run-name": "ef"})
    off = _run(base | {"run-name": "no-ef", "codec.downlink-error-feedback": False})
    for rounds in (on, off):
        assert rounds[1]["bytes_down"] < 3 * 1_000  # only a checksum of the seeded initial state
        assert all(math.isfinite(r["loss"]) for r in rounds)
    assert on[3]["loss"] != off[3]["loss"]
