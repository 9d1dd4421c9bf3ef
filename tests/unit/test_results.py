"""Tests of the run-folder writer: files, running totals, failures, plot, helpers."""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime
from pathlib import Path

import pytest

from fedpeft.results.records import (
    CLIENTS_CSV_COLUMNS,
    ROUNDS_CSV_COLUMNS,
    VERSIONED_PACKAGES,
    ClientRecord,
    ResultsWriter,
    RoundRecord,
    default_run_name,
    format_round_line,
    human_bytes,
    mean_train_loss,
    read_rounds,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _client(node: int, *, ok: bool = True, down: int = 1000, up: int = 400) -> ClientRecord:
    return ClientRecord(
        node_id=node,
        partition_id=node % 10,
        bytes_down=down,
        bytes_up=up if ok else 0,
        payload_down=down - 100,
        payload_up=(up - 50) if ok else 0,
        num_examples=10 * (node + 1) if ok else 0,
        train_loss=0.5 + 0.1 * node if ok else None,
        ok=ok,
        error="" if ok else "timeout",
    )


def _three_rounds() -> list[RoundRecord]:
    r0 = RoundRecord(round=0, accuracy=0.25, loss=1.38, train_loss=None, clients=[], wall_seconds=0.5)
    c1 = [_client(0), _client(1), _client(2)]
    r1 = RoundRecord(1, 0.6, 1.0, mean_train_loss(c1), c1, 2.0)
    c2 = [_client(0, down=2000, up=800), _client(1, ok=False, down=2000)]
    r2 = RoundRecord(2, 0.7, 0.8, mean_train_loss(c2), c2, 3.0)
    return [r0, r1, r2]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    return header, [dict(zip(header, r, strict=True)) for r in rows[1:]]


@pytest.fixture
def written(tmp_path: Path) -> tuple[ResultsWriter, Path]:
    run_dir = tmp_path / "runs" / "r1"
    w = ResultsWriter(run_dir)
    for rec in _three_rounds():
        w.add_round(rec)
    return w, run_dir


def test_writer_creates_folder_and_files(written: tuple[ResultsWriter, Path]) -> None:
    w, run_dir = written
    w.write_config({"seed": 0, "lora.r": 8, "a": [1, 2]})
    w.write_versions()
    for name in ("rounds.jsonl", "rounds.csv", "clients.csv", "config.json", "versions.json"):
        assert (run_dir / name).is_file(), name
    text = (run_dir / "config.json").read_text()
    assert json.loads(text) == {"seed": 0, "lora.r": 8, "a": [1, 2]}
    assert text.index('"a"') < text.index('"lora.r"') < text.index('"seed"')  # sorted keys
    assert '\n  "a"' in text  # indent 2


def test_cumulative_sums(written: tuple[ResultsWriter, Path]) -> None:
    w, _ = written
    recs = w.records
    assert [r.round for r in recs] == [0, 1, 2]
    assert [r.bytes_down for r in recs] == [0, 3000, 4000]
    assert [r.bytes_up for r in recs] == [0, 1200, 800]
    assert [r.cum_bytes_down for r in recs] == [0, 3000, 7000]
    assert [r.cum_bytes_up for r in recs] == [0, 1200, 2000]


def test_failed_client_counts(written: tuple[ResultsWriter, Path]) -> None:
    w, _ = written
    r2 = w.records[2]
    assert (r2.num_replied, r2.num_failed) == (1, 1)
    assert r2.bytes_down == 4000  # the failed client was still sent its message
    assert r2.bytes_up == 800  # ... but contributed nothing up
    assert r2.bytes_up_per_client_mean == 800.0  # mean over repliers
    assert r2.bytes_down_per_client_mean == 2000.0  # mean over all sent to
    assert r2.train_loss == pytest.approx(0.5)  # only client 0's loss


def test_jsonl_round_trips(written: tuple[ResultsWriter, Path]) -> None:
    w, run_dir = written
    rows = read_rounds(run_dir)
    assert len(rows) == 3
    for row, rec in zip(rows, w.records, strict=True):
        assert row == json.loads(json.dumps(rec.to_dict()))
        assert RoundRecord.from_dict(row) == rec
    assert rows[2]["num_failed"] == 1
    assert rows[2]["clients"][1]["ok"] is False
    assert rows[2]["clients"][1]["train_loss"] is None
    assert rows[0]["train_loss"] is None
    assert {"bytes_up", "bytes_down", "num_replied", "num_failed"} <= rows[1].keys()


def test_jsonl_non_finite_is_null_and_truncated_line_skipped(tmp_path: Path) -> None:
    w = ResultsWriter(tmp_path)
    w.add_round(RoundRecord(0, math.nan, math.inf, None, [], 0.1))
    line = (tmp_path / "rounds.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    with (tmp_path / "rounds.jsonl").open("a") as f:
        f.write('{"round": 1, "accu')  # a crash mid-write
    rows = read_rounds(tmp_path)
    assert len(rows) == 1 and rows[0]["accuracy"] is None
    assert math.isnan(RoundRecord.from_dict(rows[0]).accuracy)
    assert read_rounds(tmp_path / "missing") == []


def test_rounds_csv(written: tuple[ResultsWriter, Path]) -> None:
    _, run_dir = written
    text = (run_dir / "rounds.csv").read_text()
    assert text.count("round,accuracy") == 1  # header once
    header, rows = _read_csv(run_dir / "rounds.csv")
    assert tuple(header) == ROUNDS_CSV_COLUMNS
    assert len(rows) == 3
    assert rows[0]["train_loss"] == ""
    assert [int(r["cum_bytes_down"]) for r in rows] == [0, 3000, 7000]
    assert [int(r["num_failed"]) for r in rows] == [0, 0, 1]
    assert float(rows[1]["bytes_down_per_client_mean"]) == 1000.0
    assert float(rows[2]["wall_seconds"]) == 3.0


def test_clients_csv(written: tuple[ResultsWriter, Path]) -> None:
    _, run_dir = written
    header, rows = _read_csv(run_dir / "clients.csv")
    assert tuple(header) == CLIENTS_CSV_COLUMNS
    assert header[0] == "round" and "payload_up" in header and "error" in header
    assert [int(r["round"]) for r in rows] == [1, 1, 1, 2, 2]
    failed = rows[-1]
    assert failed["ok"] == "False" and failed["error"] == "timeout"
    assert failed["bytes_up"] == "0" and failed["bytes_down"] == "2000"
    assert failed["train_loss"] == ""


def test_new_writer_starts_files_afresh(written: tuple[ResultsWriter, Path]) -> None:
    _, run_dir = written
    w2 = ResultsWriter(run_dir)
    w2.add_round(_three_rounds()[1])
    assert len(read_rounds(run_dir)) == 1
    _, rows = _read_csv(run_dir / "rounds.csv")
    assert len(rows) == 1 and rows[0]["cum_bytes_down"] == "3000"


def test_plot_writes_png(written: tuple[ResultsWriter, Path], tmp_path: Path) -> None:
    w, run_dir = written
    out = w.plot()
    assert out == run_dir / "progress.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    other = w.plot(tmp_path / "elsewhere.png")
    assert other.read_bytes().startswith(PNG_MAGIC)
    assert not list(run_dir.glob("*.tmp*"))


def test_plot_log_scale_and_empty(tmp_path: Path) -> None:
    w = ResultsWriter(tmp_path / "empty")
    assert w.plot().read_bytes().startswith(PNG_MAGIC)
    w = ResultsWriter(tmp_path / "wide")
    for i in range(1, 4):
        w.add_round(RoundRecord(i, 0.5, 1.0, 0.5, [_client(0, down=10 ** (2 * i), up=1)], 1.0))
    assert w.plot().read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (812, "812 B"),
        (999, "999 B"),
        (1000, "1.00 kB"),
        (1234, "1.23 kB"),
        (999_999, "1.00 MB"),
        (1_230_000, "1.23 MB"),
        (2_460_000_000, "2.46 GB"),
        (-1234, "-1.23 kB"),
    ],
)
def test_human_bytes(n: int, expected: str) -> None:
    assert human_bytes(n) == expected


def test_format_round_line() -> None:
    clients = [_client(i, down=246_000, up=123_000) for i in range(10)]
    rec = RoundRecord(3, 0.8123, 0.5123, 0.4, clients, 12.34)
    assert format_round_line(rec, 10) == (
        "round  3/10 | acc 0.8123 | loss 0.5123 | up 1.23 MB | down 2.46 MB | 10 ok 0 failed | 12.3 s"
    )
    rec0 = RoundRecord(0, 0.1, 2.0, None, [], 0.5)
    assert format_round_line(rec0, 5).startswith("round  0/5 | acc 0.1000")
    assert "0 ok 0 failed" in format_round_line(rec0, 5)


def test_mean_train_loss() -> None:
    assert mean_train_loss([]) is None
    assert mean_train_loss([_client(0, ok=False)]) is None
    # client 0: 10 examples, loss 0.5; client 1: 20 examples, loss 0.6
    assert mean_train_loss([_client(0), _client(1)]) == pytest.approx((5 + 12) / 30)


def test_default_run_name() -> None:
    now = datetime(2024, 3, 5, 7, 8, 9)
    cfg = {"seed": 0, "lora.r": 8}
    name = default_run_name(cfg, now)
    stamp, date_time, digest = name.split("-")
    assert (stamp, date_time) == ("20240305", "070809")
    assert len(digest) == 8 and int(digest, 16) >= 0
    assert default_run_name({"lora.r": 8, "seed": 0}, now) == name  # key order irrelevant
    assert default_run_name({"seed": 1, "lora.r": 8}, now) != name
    assert len(default_run_name(cfg)) == len(name)


def test_versions_json(tmp_path: Path) -> None:
    w = ResultsWriter(tmp_path)
    data = json.loads(w.write_versions().read_text())
    assert {"python", "platform", *VERSIONED_PACKAGES} <= data.keys()
    assert data["python"].startswith("3.")
    assert data["numpy"] is not None and data["fedpeft"] is not None
    for name in VERSIONED_PACKAGES:
        assert data[name] is None or isinstance(data[name], str)


def test_error_reasons_read_the_same_on_every_engine():
    from fedpeft.server.meter import describe_error

    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=26338, "
        'actor_id=285bc7d8)\n  File "faults.py", line 80, in mod\n    raise InjectedFailure(...)\n'
        "fedpeft.recovery.faults.InjectedFailure: injected failure: client raised in round 2\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "ray::ClientAppActor.run() (pid=26338)\nflwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: injected failure: client raised in round 2'>"
    )
    plain = "<class 'fedpeft.recovery.faults.InjectedFailure'>:<'injected failure: client raised in round 2'>"
    expected = "error 2: InjectedFailure: injected failure: client raised in round 2"
    assert describe_error(2, ray) == describe_error(2, plain) == expected
    assert describe_error(5, "node unavailable") == "error 5: node unavailable"  # other forms as they are
