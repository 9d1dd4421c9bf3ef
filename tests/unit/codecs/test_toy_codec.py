"""Adding a codec is one module and one registry line: the toy codec gets the codec
contract and a whole federated run, without touching anything else."""

from __future__ import annotations

import math

import pytest

from fedpeft.codecs import CODECS, CodecSpec, build_codec
from fedpeft.codecs.conformance import check_codec
from fedpeft.config import ConfigError, RunConfig
from tests.unit.codecs.test_composition import small_run
from tests.unit.codecs.toy_codec import Bf16Codec, bf16_reference


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(CODECS, "toy-bf16", CodecSpec(Bf16Codec, None))  # the registry line


def test_toy_codec_keeps_the_codec_contract(toy_registered):
    check_codec(build_codec("toy-bf16", 1.0, {}), bf16_reference)


def test_toy_codec_runs_a_federation_both_ways(toy_registered, tmp_path):
    _, rounds = small_run(tmp_path, {"codec.name": "toy-bf16", "codec.downlink": "same"})
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3]
    assert all(math.isfinite(r["loss"]) for r in rounds)
    # 16 of every 32 bits travel: the codec's own size figure, read off each payload.
    ratios = [c["metrics"]["codec-ratio"] for r in rounds[1:] for c in r["clients"]]
    assert all(1.9 < ratio <= 2.0 for ratio in ratios)


def test_an_unregistered_codec_name_names_the_choices():
    with pytest.raises(ConfigError, match=r"codec\.name.*compeft"):
        RunConfig.from_run_config({"codec.name": "toy-bf16"})
