"""Every kind of extension is one module plus one registry line, with no edit anywhere else.

Like the toy codec, strategy and task, each toy here (``tests/unit/toys``) is written as a
user writes one, registered by its one line in a fixture, and run through the real apps
(in process): a PEFT method with a settings section of its own, a central DP mechanism, a
partitioner and a data source.  Before its registry line, its name (and its keys) are
refused with the valid choices.
"""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest

from fedpeft.apps import client_app as client_module
from fedpeft.apps.server_app import run_server
from fedpeft.config import ConfigError, RunConfig
from fedpeft.data.partition import PARTITIONERS, load_partition, register_partitioner
from fedpeft.data.sources import SOURCES, load_source, split_train_test
from fedpeft.models import METHODS, build_model, register_method
from fedpeft.privacy.mechanisms import CENTRAL_MECHANISMS, register_mechanism
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from fedpeft.settings import SECTIONS
from tests.unit.codecs.test_composition import SMALL
from tests.unit.toys import declared

BASE = {k: v for k, v in SMALL.items() if not k.startswith("codec.")}  # dense: only the toy differs


def federate(tmp_path, overrides):
    """The run config and round records of a 3-client, 2-round run through the real apps."""
    cfg = RunConfig.from_run_config(BASE | overrides | {"results-dir": str(tmp_path), "run-name": "toy"})
    rounds = read_rounds(run_server(DirectGrid(client_module.app, 3, cfg.to_run_config()), cfg))
    assert [r["num_replied"] for r in rounds[1:]] == [3, 3]
    assert all(math.isfinite(r["loss"]) for r in rounds)
    return cfg, rounds


# ---------------------------------------------------------------------- PEFT method
@pytest.fixture
def toy_norms():
    with declared("tests.unit.toys.peft_method") as toy:
        register_method(
            "toy-norms", "LayerNorm tuning + the head", is_peft_adapter=False, settings=toy.NormsConfig
        )(toy.apply)  # the registry line
        try:
            yield toy
        finally:
            METHODS.pop("toy-norms")


def test_a_method_section_is_unknown_until_the_method_declares_it():
    with pytest.raises(ConfigError, match=r"unknown config key 'toy-norms\.layers'"):
        RunConfig.from_run_config({"toy-norms.layers": "last"})


def test_a_method_with_its_own_settings_runs_a_federation(toy_norms, tmp_path):
    with pytest.raises(
        ConfigError, match=r"config key 'toy-norms\.layers': unknown value 'first'.*all, last"
    ):
        RunConfig.from_run_config({"toy-norms.layers": "first"})
    cfg, _ = federate(tmp_path, {"peft.method": "toy-norms", "toy-norms.layers": "last"})
    assert toy_norms.NormsConfig.of(cfg).layers == "last"
    assert cfg.to_run_config()["toy-norms.layers"] == "last"  # saved with the run, read back the same
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg
    sent = build_model(cfg, num_labels=5).exchange_state()
    assert sent and all(("LayerNorm" in k and ".5." in k) or k.startswith("classifier.") for k in sent)
    every = build_model(RunConfig.from_run_config({"peft.method": "toy-norms", "device": "cpu"}), 5)
    assert len(every.exchange_state()) > len(sent)  # the setting reached the method


@pytest.fixture
def forget_toy_norms():
    before = dict(SECTIONS)
    yield
    for module in ("tests.unit.toys.norms_extension", "tests.unit.toys.peft_method"):
        sys.modules.pop(module, None)
    METHODS.pop("toy-norms", None)
    SECTIONS.clear()
    SECTIONS.update(before)


def test_extensions_named_in_the_config_are_imported_before_it_is_read(forget_toy_norms, tmp_path):
    # What a Ray worker or a SuperNode does: it knows nothing but the run config.
    extension = {"extensions": "tests.unit.toys.norms_extension"}
    cfg, _ = federate(tmp_path, extension | {"peft.method": "toy-norms", "toy-norms.layers": "last"})
    assert cfg.extensions == ("tests.unit.toys.norms_extension",) and "toy-norms" in METHODS
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg
    with pytest.raises(ConfigError, match=r"config key 'extensions': cannot import 'no_such_module'"):
        RunConfig.from_run_config({"extensions": "no_such_module"})


# ---------------------------------------------------------------------- central DP mechanism
@pytest.fixture
def toy_mechanism():
    with declared("tests.unit.toys.mechanism") as toy:
        register_mechanism("toy-flower-dp", toy.MECHANISM)  # the registry line
        try:
            yield toy
        finally:
            CENTRAL_MECHANISMS.pop("toy-flower-dp")


def test_a_mechanism_is_refused_until_registered():
    with pytest.raises(
        ConfigError, match=r"dp\.central-mechanism.*unknown value 'toy-flower-dp'.*gaussian, tree"
    ):
        RunConfig.from_run_config({"dp.mode": "central", "dp.central-mechanism": "toy-flower-dp"})


def test_a_mechanism_states_its_rule_and_runs_a_federation(toy_mechanism, tmp_path):
    central = {"dp.mode": "central", "dp.central-mechanism": "toy-flower-dp"}
    with pytest.raises(
        ConfigError, match=r"noises a plain mean; use strategy.name = 'fedavg', not 'fedprox'"
    ):
        RunConfig.from_run_config(central | {"strategy.name": "fedprox"})
    _, rounds = federate(tmp_path, central | {"dp.central-noise-multiplier": 0.5})
    epsilons = [r["central_epsilon"] for r in rounds[1:]]
    assert all(math.isfinite(e) and e > 0 for e in epsilons) and epsilons[1] > epsilons[0]


# ---------------------------------------------------------------------- partitioner
@pytest.fixture
def toy_partitioner():
    with declared("tests.unit.toys.partitioner") as toy:
        register_partitioner("toy-blocks", toy.SPEC)  # the registry line
        try:
            yield toy
        finally:
            PARTITIONERS.pop("toy-blocks")


def test_a_partitioner_is_refused_until_registered():
    with pytest.raises(ConfigError, match=r"data\.partitioner.*unknown value 'toy-blocks'.*dirichlet"):
        RunConfig.from_run_config({"data.partitioner": "toy-blocks"})


def test_a_partitioner_splits_and_runs_a_federation(toy_partitioner, tmp_path):
    cfg, _ = federate(tmp_path, {"data.partitioner": "toy-blocks"})
    train, _ = split_train_test(load_source(cfg.data, cfg.seed), cfg.data.test_fraction, 0, cfg.seed)
    parts = [np.asarray(load_partition(train, cfg.data, 3, pid, cfg.seed)["label"]) for pid in range(3)]
    assert sum(len(p) for p in parts) == len(train)
    assert all(a.max() <= b.min() for a, b in itertools.pairwise(parts))  # label-sorted blocks


# ---------------------------------------------------------------------- data source
@pytest.fixture
def toy_source(monkeypatch):
    with declared("tests.unit.toys.data_source") as toy:
        monkeypatch.setitem(SOURCES, "toy-stdlib-docs", toy.load)  # the registry line
        yield toy


def test_a_data_source_runs_a_federation(toy_source, tmp_path):
    cfg, rounds = federate(tmp_path, {"data.dataset": "toy-stdlib-docs"})
    loaded = load_source(cfg.data, cfg.seed)
    assert loaded.label_names == ("csv", "json", "re", "string")
    _, test = split_train_test(loaded, cfg.data.test_fraction, 0, cfg.seed)
    assert len(test) == 12  # the server scores the toy's held-out docstrings: accuracy in twelfths
    assert all(abs(r["accuracy"] * 12 - round(r["accuracy"] * 12)) < 1e-9 for r in rounds)
