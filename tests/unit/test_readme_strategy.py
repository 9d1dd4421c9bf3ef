"""The custom strategies shown in README.md run as written (docs that cannot go stale)."""

import re
import sys
from pathlib import Path

import pytest

from fedpeft.apps import client_app
from fedpeft.apps.server_app import run_server
from fedpeft.config import RunConfig
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from strategies.conformance import main as conformance_main

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def readme_modules(tmp_path, monkeypatch):
    """Write each ``# <module>.py`` block of README.md to an importable module."""
    for name in ("mystrategies", "myaggregators"):
        blocks = re.findall(rf"```python\n(# {name}\.py.*?)```", README.read_text(), flags=re.S)
        assert len(blocks) == 1, name
        (tmp_path / f"{name}.py").write_text(blocks[0])
        sys.modules.pop(name, None)
    monkeypatch.syspath_prepend(str(tmp_path))


def _rounds(overrides):
    cfg = RunConfig.from_run_config(overrides)
    return read_rounds(run_server(DirectGrid(client_app.app, cfg.num_clients, cfg.to_run_config()), cfg))


def test_readme_strategy_runs(readme_modules, tiny_overrides):
    damped = _rounds(tiny_overrides | {"strategy.name": "mystrategies:DampedFedAvg"})
    assert len(damped) == 3 and all(r["num_replied"] == 3 for r in damped[1:])
    plain = _rounds(tiny_overrides | {"run-name": "plain"})
    # Round 1 has nothing to damp towards; from round 2 on the global model differs.
    assert damped[1]["loss"] == plain[1]["loss"]
    assert damped[2]["loss"] != plain[2]["loss"]


def test_readme_function_and_init_apply_strategies_run(readme_modules, tiny_overrides):
    median = _rounds(tiny_overrides | {"strategy.name": "myaggregators:median", "run-name": "median"})
    momentum = _rounds(
        tiny_overrides
        | {
            "strategy.name": "myaggregators:ServerMomentum",
            "strategy.kwargs": "momentum=0.5",
            "run-name": "m",
        }
    )
    for rounds in (median, momentum):
        assert all(r["num_replied"] == 3 for r in rounds[1:]) and rounds[2]["accuracy"] >= 0.0
    assert median[2]["loss"] != momentum[2]["loss"]


def test_readme_strategies_pass_the_conformance_suite(readme_modules, capsys):
    targets = ["myaggregators:median", "myaggregators:ServerMomentum", "mystrategies:DampedFedAvg"]
    assert conformance_main(targets) == 0
    assert "conformance: all passed" in capsys.readouterr().out
