"""The door to Flower's internals: version check, patches undone on error, where they apply."""

import logging

import flwr
import pytest

from fedpeft import cli, flower_compat
from fedpeft.config import RunConfig
from fedpeft.flower_compat import UnsupportedFlowerVersion, check_flower_version
from fedpeft.recovery.settings import FailureConfig
from fedpeft.running import inprocess, launch


def test_the_installed_flower_is_supported():
    assert check_flower_version() == flwr.__version__
    assert ".".join(flwr.__version__.split(".")[:2]) in flower_compat.SUPPORTED_FLWR


def test_an_unknown_flower_stops_fedpeft_run_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    assert cli.main(["run", "--engine", "inprocess", "--set", "num-rounds=1"]) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fedpeft: error: flwr 1.99.0 is installed") and "1.41.x" in err
    with pytest.raises(UnsupportedFlowerVersion, match=r"^flwr 1\.99\.0 .*1\.41\.x"):
        launch.simulate({})  # the Python entry checks first too, before any config is read


def _engine_functions():
    from flwr.server.superlink.fleet.vce import vce_api

    return vce_api.add_messages_to_queue, vce_api._register_node_info_stores


def test_every_patch_is_undone_when_the_block_raises():
    from flwr.supernode.fleet_http_connection import FleetHttpClient

    before = _engine_functions()
    assert "from_server_address" not in vars(FleetHttpClient)  # inherited: it must stay so
    factory = FleetHttpClient.from_server_address
    with (
        pytest.raises(RuntimeError, match="inside"),
        flower_compat.engine_patches(one_pass=True, shared_config=True),
        flower_compat.fleet_interceptor(object()),
    ):
        assert all(a is not b for a, b in zip(_engine_functions(), before, strict=True))
        assert FleetHttpClient.from_server_address != factory
        raise RuntimeError("inside")
    assert _engine_functions() == before
    assert (
        "from_server_address" not in vars(FleetHttpClient) and FleetHttpClient.from_server_address == factory
    )


def test_small_runs_use_flowers_own_engine_code():
    assert launch.engine_patches_for(RunConfig(num_clients=10)) == launch.EnginePatches(False, False)
    big = RunConfig(num_clients=launch.LARGE_RUN_CLIENTS, fraction_train=0.05, min_train_clients=10)
    assert launch.engine_patches_for(big) == launch.EnginePatches(True, True)
    # a client kept past the round timeout must not get its next message while still busy
    hangs = RunConfig(num_clients=10, round_timeout=60.0, failures=FailureConfig(hang_probability=0.2))
    assert launch.engine_patches_for(hangs) == launch.EnginePatches(one_pass=True, shared_config=False)
    before = _engine_functions()
    with flower_compat.engine_patches(one_pass=False, shared_config=False):
        assert _engine_functions() == before


@pytest.fixture
def flower_log_level():
    """Flower's logger at its own default (DEBUG) for the test, as before quiet_flower; restored after."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield
    logger.setLevel(level)


def test_a_run_shows_no_flower_notes_without_verbose(monkeypatch, caplog, tmp_path, flower_log_level):
    """``fraction-evaluate = 0`` (the default) makes FedAvg warn when preflight builds it."""
    monkeypatch.setattr(inprocess, "run_inprocess", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="without writing"):
        launch.simulate({"results-dir": str(tmp_path), "fraction-evaluate": 0.0}, engine="inprocess")
    flower = [r for r in caplog.records if r.name.startswith("flwr")]
    assert not [r for r in flower if r.levelno < logging.ERROR], [r.getMessage() for r in flower]
    assert logging.getLogger("flwr").isEnabledFor(logging.ERROR)  # client failures still show
