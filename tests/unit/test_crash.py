"""Crash points and the kill-and-resume drill's machinery (fedpeft.recovery.crash), on tiny processes."""

import sys
import time

import pytest

from fedpeft.recovery.crash import CRASH_POINTS, Kill, _crash_plan, comparable, plan_kills, run_once


def _passes(times: int) -> list[str]:
    body = "; ".join(
        ["from fedpeft.recovery.crash import crash_point", *["crash_point('record')"] * times, "print('end')"]
    )
    return [sys.executable, "-c", body]


def test_a_named_crash_point_freezes_the_process_until_the_drill_kills_it(tmp_path):
    log = tmp_path / "log"
    assert run_once(_passes(3), Kill("record", 2), log=log, timeout=60)[:2] == (True, -9)
    assert "end" not in log.read_text()
    assert log.with_suffix(".crashed").read_text().startswith("record:2")
    # A pass that never comes: the process runs to its end, nothing is killed.
    assert run_once(_passes(3), Kill("record", 4), log=log, timeout=60)[:2] == (False, 0)
    assert run_once(_passes(1), None, log=log, timeout=60)[:2] == (False, 0)  # no plan: a no-op
    assert log.read_text().count("end") == 2


def test_crash_plans_name_unknown_points_and_are_seeded():
    with pytest.raises(ValueError, match="unknown crash point 'chekpoint-write'.*checkpoint-write"):
        _crash_plan("chekpoint-write:1")
    assert _crash_plan("aggregate:3,train") == {"aggregate": 3, "train": 1}
    limits = dict.fromkeys(CRASH_POINTS, 4)
    assert plan_kills(7, 6, 30.0, limits) == plan_kills(7, 6, 30.0, limits)
    assert plan_kills(7, 6, 30.0, limits) != plan_kills(8, 6, 30.0, limits)
    kills = plan_kills(7, 6, 30.0, limits)
    assert all(6.0 <= k.seconds <= 22.5 for k in kills[::2])  # random times within the run
    assert all(k.point in CRASH_POINTS and 1 <= k.nth <= 4 for k in kills[1::2])


def test_comparable_keeps_bytes_only_where_node_ids_are_seeded():
    rounds = [
        {
            "round": 1,
            "wall_seconds": 3.2,
            "bytes_up": 10,
            "cum_bytes_up": 10,
            "clients": [{"node_id": 5, "partition_id": 0, "bytes_up": 10, "payload_up": 8}],
        }
    ]
    assert comparable(rounds) == [
        {
            "round": 1,
            "bytes_up": 10,
            "cum_bytes_up": 10,
            "clients": [{"partition_id": 0, "bytes_up": 10, "payload_up": 8}],
        }
    ]
    assert comparable(rounds, message_bytes=False) == [
        {"round": 1, "clients": [{"partition_id": 0, "payload_up": 8}]}
    ]


def test_a_time_kill_counts_from_the_runs_first_line(tmp_path):
    slow_start = "import time; time.sleep(1.5); print('fedpeft: ready', flush=True); time.sleep(30)"
    t0 = time.monotonic()
    outcome = run_once(
        [sys.executable, "-c", slow_start], Kill(seconds=0.5), log=tmp_path / "log", timeout=60
    )
    assert outcome.killed and time.monotonic() - t0 >= 2.0  # 1.5 s of start-up, then 0.5 s
    assert 0.5 <= outcome.active_seconds < 5
