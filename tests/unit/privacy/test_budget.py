"""Privacy through whole runs: the server's budget cut-off, the reported epsilon, central DP."""

import math

import pytest
from opacus.accountants import RDPAccountant

from fedpeft.apps import client_app as client_module
from fedpeft.apps.server_app import run_server
from fedpeft.config import ConfigError, RunConfig
from fedpeft.privacy import Ledger
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from tests.conftest import TINY


def _run(tmp_path, **extra):
    cfg = RunConfig.from_run_config(TINY | extra | {"results-dir": str(tmp_path), "run-name": "dp"})
    grid = DirectGrid(client_module.app, 3, cfg.to_run_config())
    return read_rounds(run_server(grid, cfg)), grid


def test_budget_cut_off_sits_clients_out_and_records_it(tmp_path):
    # Each round of these clients costs eps ~3.7, then ~4.5 after two: a budget of 4.8
    # allows two rounds and refuses the third.
    rounds, grid = _run(tmp_path, **{"dp.mode": "local", "dp.epsilon-budget": 4.8, "num-rounds": 3})
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3, 0]
    third = rounds[3]["clients"]
    assert len(third) == 3 and all(c["error"].startswith("sat out: epsilon would reach") for c in third)
    assert all(c["bytes_down"] == 0 for c in third)
    assert rounds[3]["max_epsilon"] == rounds[2]["max_epsilon"] <= 4.8
    # the clients' own ledgers agree with the server's mirror
    for context in grid.contexts.values():
        ledger = Ledger.from_columns(context.state.config_records["fedpeft.dp.ledger"])
        assert len(ledger.history) == 2
        eps = ledger.epsilon(1e-5)
        assert eps == pytest.approx(
            rounds[2]["epsilon_by_partition"][str(context.node_config["partition-id"])]
        )


def test_reported_epsilon_matches_an_independent_accountant(tmp_path):
    rounds, _ = _run(tmp_path, **{"dp.mode": "local"})
    c = rounds[2]["clients"][0]["metrics"]
    reference = RDPAccountant()
    for _ in range(2 * int(c["dp-steps"])):
        reference.step(noise_multiplier=c["dp-noise-multiplier"], sample_rate=c["dp-sample-rate"])
    assert c["dp-epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5))


@pytest.mark.parametrize(
    ("side", "clipping"), [("server", "fixed"), ("client", "fixed"), ("server", "adaptive")]
)
def test_central_dp_runs_and_accounts(tmp_path, side, clipping):
    extra = {
        "dp.mode": "central",
        "dp.central-side": side,
        "dp.central-clipping": clipping,
        "dp.central-noise-multiplier": 0.1 if clipping == "adaptive" else 1.0,
    }
    rounds, _ = _run(tmp_path, **extra)
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3]
    assert rounds[1]["central_epsilon"] < rounds[2]["central_epsilon"] and rounds[2]["max_epsilon"] is None
    assert all(math.isfinite(r["loss"]) for r in rounds)


def test_impossible_central_settings_fail_before_training():
    from fedpeft.running.launch import preflight

    cfg = RunConfig.from_run_config(TINY | {"dp.mode": "central", "dp.central-clipping": "adaptive"})
    with pytest.raises(ConfigError, match="dp.central"):
        preflight(cfg)
