"""Adding a codec is one module and one registry line: the toy codec gets the codec
contract and a whole federated run, without touching anything else."""

from __future__ import annotations

import math

import pytest

from fedpeft.apps import client_app as client_module
from fedpeft.apps.server_app import run_server
from fedpeft.codecs import CODECS, CodecSpec, build_codec
from fedpeft.codecs.conformance import check_codec
from fedpeft.config import RunConfig
from fedpeft.results import read_rounds
from fedpeft.testing import DirectGrid
from tests.unit.codecs.test_composition import SMALL
from tests.unit.codecs.toy_codec import Bf16Codec, bf16_reference


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(CODECS, "toy-bf16", CodecSpec(Bf16Codec, None))  # the registry line


def test_toy_codec_keeps_the_codec_contract(toy_registered):
    check_codec(build_codec("toy-bf16", 1.0, {}), bf16_reference)


def test_toy_codec_runs_a_federation_both_ways(toy_registered, tmp_path):
    cfg = RunConfig.from_run_config(
        SMALL
        | {
            "codec.name": "toy-bf16",
            "codec.downlink": "same",
            "codec.alpha-search": "",
            "results-dir": str(tmp_path),
            "run-name": "toy",
        }
    )
    rounds = read_rounds(run_server(DirectGrid(client_module.app, 3, cfg.to_run_config()), cfg))
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3]
    assert all(math.isfinite(r["loss"]) for r in rounds)
    # 16 of every 32 bits travel: the codec's own size figure, read off each payload.
    ratios = [c["metrics"]["codec-ratio"] for r in rounds[1:] for c in r["clients"]]
    assert all(1.9 < ratio <= 2.0 for ratio in ratios)


def test_an_unregistered_codec_name_names_the_choices():
    with pytest.raises(Exception, match="toy-bf16|compeft"):
        RunConfig.from_run_config({"codec.name": "toy-bf16"})
