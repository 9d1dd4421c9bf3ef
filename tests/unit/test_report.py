"""fedpeft.results.report: the figures of a run, grouping over seeds, and the files written.

The run folders here are written by the real ResultsWriter with chosen numbers, so each
figure can be checked exactly; tests/unit/test_sweep.py reports over real runs.
"""

import csv
import math

import pytest

from fedpeft.cli import main
from fedpeft.results.records import ClientRecord, ResultsWriter, RoundRecord
from fedpeft.results.report import find_runs, group_runs, summarize


def _client(up, down, codec=None):
    metrics = {"codec-raw-bytes": codec[0], "codec-encoded-bytes": codec[1]} if codec else {}
    return ClientRecord(1, 0, down, up, down - 50, up - 50, 10, 0.5, ok=True, metrics=metrics)


def _run(folder, accs, *, seed=0, density=0.1, codec=None, eps=None):
    """A run folder with one client per round: 1,000 B up, 2,000 B down per trained round."""
    w = ResultsWriter(folder)
    w.write_config({"seed": seed, "codec.density": density, "run-name": folder.name, "results-dir": "x"})
    for i, acc in enumerate(accs):
        clients = [_client(1000, 2000, codec)] if i else []
        w.add_round(
            RoundRecord(i, acc, 1.0, None, clients, wall_seconds=2.0, max_epsilon=eps * i if eps else None)
        )
    return folder


def test_figures_of_one_run(tmp_path):
    run = _run(tmp_path / "a", [0.2, 0.5, 0.85, 0.8], codec=(4000, 100), eps=1.5)
    s = summarize(run, target=0.8)
    assert (s.final_accuracy, s.best_accuracy, s.rounds_to_target) == (0.8, 0.85, 2)
    assert (s.bytes_up, s.bytes_down, s.bytes_to_target) == (3000, 6000, 2 * 3000)
    assert s.compression_ratio == 40.0 and s.max_epsilon == 4.5 and s.wall_seconds == 8.0
    never = summarize(run, target=0.9)
    assert never.rounds_to_target is None and never.bytes_to_target is None


def test_round_zero_never_counts_as_reaching_the_target(tmp_path):
    assert summarize(_run(tmp_path / "a", [0.9, 0.95]), target=0.9).rounds_to_target == 1


def test_seeds_are_averaged_and_groups_labelled_by_what_differs(tmp_path):
    for seed, accs in ((0, [0.2, 0.6, 0.8]), (1, [0.2, 0.7, 0.9])):
        _run(tmp_path / "sw" / f"d01-{seed}", accs, seed=seed, density=0.1)
    _run(tmp_path / "sw" / "d05-0", [0.2, 0.4, 0.5], density=0.5)
    runs = [summarize(p, 0.75) for p in find_runs([tmp_path])]
    assert len(runs) == 3
    groups = group_runs(runs)
    assert [(g.label, len(g.runs)) for g in groups] == [("codec.density=0.1", 2), ("codec.density=0.5", 1)]
    mean, std, n = groups[0].stat("final_accuracy")
    assert mean == pytest.approx(0.85) and std == pytest.approx(math.sqrt(0.005)) and n == 2
    assert groups[0].stat("rounds_to_target") == (2.0, 0.0, 2)
    assert groups[1].stat("rounds_to_target") == (None, None, 0)  # never reached


def test_report_files_and_cli(tmp_path, capsys):
    for seed, accs in ((0, [0.2, 0.6, 0.8]), (1, [0.2, 0.7, 0.9])):
        _run(tmp_path / "runs" / f"s{seed}", accs, seed=seed)
    _run(tmp_path / "runs" / "s2", [0.2, 0.5, 0.7], seed=2)
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--target", "0.75"]) == 0
    out = capsys.readouterr().out
    assert "Target accuracy: 75.0%" in out and "| 3 |" in out
    assert "2.0 (2/3)" in out  # two of three seeds reached the target, in round 2
    with (tmp_path / "rep" / "report.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["final_accuracy_mean"]) == pytest.approx(0.8) and row["seeds"] == "3"
    with (tmp_path / "rep" / "runs.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 3
    for name in ("report.md", "accuracy_vs_rounds.png", "accuracy_vs_bytes.png", "frontier.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0


def test_report_of_nothing_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such results folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no run folders" in capsys.readouterr().err


def test_strategy_metrics_are_offered_per_run_and_per_group(tmp_path):
    for seed, value in ((0, 2.0), (1, 4.0)):
        w = ResultsWriter(tmp_path / f"s{seed}")
        w.write_config({"seed": seed, "run-name": f"s{seed}", "results-dir": "x"})
        w.add_round(RoundRecord(0, 0.2, 1.0, None, [], wall_seconds=1.0))
        metrics = {"train.server-lr": value, "train.history": [1.0, 2.0]}
        w.add_round(RoundRecord(1, 0.5, 1.0, None, [_client(1000, 2000)], 1.0, strategy_metrics=metrics))
    runs = [summarize(p) for p in find_runs([tmp_path])]
    assert [r.strategy_metrics for r in runs] == [{"train.server-lr": 2.0}, {"train.server-lr": 4.0}]
    (group,) = group_runs(runs)
    assert group.metric_stat("train.server-lr") == (3.0, pytest.approx(math.sqrt(2.0)), 2)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    with (tmp_path / "rep" / "runs.csv").open() as fh:
        assert [row["strategy.train.server-lr"] for row in csv.DictReader(fh)] == ["2.0", "4.0"]
    assert "train.server-lr" in (tmp_path / "rep" / "report.md").read_text()
    header = (tmp_path / "s0" / "rounds.csv").read_text().splitlines()[0]
    assert header.split(",")[-1] == "strategy_metrics"


def test_folders_written_before_strategy_metrics_still_report(tmp_path):
    run = _run(tmp_path / "old", [0.2, 0.6])
    lines = (run / "rounds.jsonl").read_text().splitlines()
    import json

    old = [
        json.dumps({k: v for k, v in json.loads(line).items() if k != "strategy_metrics"}) for line in lines
    ]
    (run / "rounds.jsonl").write_text("\n".join(old) + "\n")
    assert summarize(run).strategy_metrics == {}


def test_task_metrics_are_reported_next_to_accuracy(tmp_path):
    """A causal LM's perplexity and exact match: per run, mean ± std per group, their own table."""
    for seed, ppl in ((0, 4.0), (1, 6.0)):
        w = ResultsWriter(tmp_path / f"s{seed}")
        w.write_config({"seed": seed, "run-name": f"s{seed}", "results-dir": "x"})
        w.add_round(RoundRecord(0, 0.0, 3.0, None, [], wall_seconds=1.0, metrics={"perplexity": 20.0}))
        rec = RoundRecord(1, 0.8, 1.5, None, [_client(1000, 2000)], 1.0, metrics={"perplexity": ppl})
        w.add_round(rec)
    runs = [summarize(p) for p in find_runs([tmp_path])]
    assert [r.task_metrics for r in runs] == [{"perplexity": 4.0}, {"perplexity": 6.0}]
    (group,) = group_runs(runs)
    assert group.metric_stat("perplexity", "task") == (5.0, pytest.approx(math.sqrt(2.0)), 2)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    with (tmp_path / "rep" / "runs.csv").open() as fh:
        assert [row["task.perplexity"] for row in csv.DictReader(fh)] == ["4.0", "6.0"]
    assert "The task's other metrics" in (tmp_path / "rep" / "report.md").read_text()
