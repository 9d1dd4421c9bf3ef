"""The custom strategy shown in README.md runs as written (docs that cannot go stale)."""

import re
import sys
from pathlib import Path

from fedpeft.apps import client_app
from fedpeft.apps.server_app import run_server
from fedpeft.config import RunConfig
from fedpeft.results import read_rounds
from fedpeft.testing import DirectGrid

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_strategy_runs(tmp_path, monkeypatch, tiny_overrides):
    blocks = re.findall(r"```python\n(# mystrategies\.py.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    (tmp_path / "mystrategies.py").write_text(blocks[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mystrategies", None)
    cfg = RunConfig.from_run_config(tiny_overrides | {"strategy.name": "mystrategies:DampedFedAvg"})
    run_dir = run_server(DirectGrid(client_app.app, cfg.num_clients, cfg.to_run_config()), cfg)
    damped = read_rounds(run_dir)
    assert len(damped) == 3 and all(r["num_replied"] == 3 for r in damped[1:])
    plain_cfg = RunConfig.from_run_config(tiny_overrides | {"run-name": "plain"})
    plain = read_rounds(run_server(DirectGrid(client_app.app, 3, plain_cfg.to_run_config()), plain_cfg))
    # Round 1 has nothing to damp towards; from round 2 on the global model differs.
    assert damped[1]["loss"] == plain[1]["loss"]
    assert damped[2]["loss"] != plain[2]["loss"]
