"""The codec wrapper composes with every registered strategy and with Flower's DP wrapper.

Conformance-style: adding a strategy to the registry adds a case here for free.
"""

import math

import pytest
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedpeft.apps import client_app as client_module
from fedpeft.apps.server_app import run_server
from fedpeft.config import RunConfig
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from strategies import STRATEGIES, build_strategy, resolve_strategy
from strategies.traits import declared_traits

SMALL = {
    "num-clients": 3,
    "num-rounds": 2,
    "min-train-clients": 3,
    "device": "cpu",
    "model.max-length": 16,
    "data.max-examples": 90,
    "data.test-fraction": 0.2,
    "data.partitioner": "iid",
    "train.batch-size": 8,
    "train.max-steps": 1,
    "codec.name": "compeft",
    "codec.downlink": "compeft",
}


def small_run(tmp_path, overrides):
    """The round records of a SMALL run with ``overrides``, in process through the real apps."""
    cfg = RunConfig.from_run_config(SMALL | overrides | {"results-dir": str(tmp_path), "run-name": "small"})
    return cfg, read_rounds(run_server(DirectGrid(client_module.app, 3, cfg.to_run_config()), cfg))


# FlexLoRA and FLoRA send per-node / merged layouts, which the codec refuses up front
# (tests/unit/test_lora_strategies_flow.py); every other strategy composes with it.
COMPOSABLE = sorted(n for n in STRATEGIES if not declared_traits(resolve_strategy(n)).rewrites_arrays)


@pytest.mark.parametrize("name", COMPOSABLE)
def test_codec_wraps_every_registered_strategy(name, tmp_path):
    cfg = RunConfig.from_run_config(
        SMALL | {"strategy.name": name, "results-dir": str(tmp_path), "run-name": name}
    )
    rounds = read_rounds(run_server(DirectGrid(client_module.app, 3, cfg.to_run_config()), cfg))
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3]
    assert all(math.isfinite(r["loss"]) for r in rounds)
    assert all(c["metrics"]["codec-ratio"] > 10 for r in rounds[1:] for c in r["clients"])


def test_codec_outside_flowers_server_side_dp(tmp_path, monkeypatch):
    import fedpeft.server.stack as stack

    def dp_fedavg(name, **settings):
        inner = build_strategy(name, **settings)
        return DifferentialPrivacyServerSideFixedClipping(
            inner, noise_multiplier=0.1, clipping_norm=1.0, num_sampled_clients=3
        )

    monkeypatch.setattr(stack, "build_strategy", dp_fedavg)
    cfg = RunConfig.from_run_config(SMALL | {"results-dir": str(tmp_path), "run-name": "dp"})
    rounds = read_rounds(run_server(DirectGrid(client_module.app, 3, cfg.to_run_config()), cfg))
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3] and all(math.isfinite(r["loss"]) for r in rounds)
