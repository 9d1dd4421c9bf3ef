from pathlib import Path

import pytest
import tomllib
from flwr.common.config import flatten_dict

from fedpeft.config import ConfigError, RunConfig, config_schema

ROOT = Path(__file__).resolve().parents[2]


def pyproject_defaults() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return flatten_dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_match_the_dataclasses():
    # One source of truth in spirit: the two copies of the defaults are kept in step.
    assert pyproject_defaults() == RunConfig().to_run_config()
    assert RunConfig.from_run_config(pyproject_defaults()) == RunConfig()


def test_every_key_round_trips():
    cfg = RunConfig.from_run_config({"lora.r": 4, "lora.target-modules": "query, key ,value", "seed": 7})
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ("query", "key", "value") and cfg.seed == 7
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg
    assert set(cfg.to_run_config()) == set(config_schema())


def test_unknown_key_names_it_suggests_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({"lora.alpah": 4})
    msg = str(err.value)
    assert "'lora.alpah'" in msg and "did you mean 'lora.alpha'" in msg and "data.partitioner" in msg


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("data.partitioner", "diriclet", "did you mean 'dirichlet'"),
        ("data.partitioner", "x", "valid: dirichlet, iid, pathological, shard"),
        ("lora.r", 0, "must be >= 1"),
        ("fraction-train", 0.0, "must be > 0.0"),
        ("fraction-train", 1.5, "must be <= 1.0"),
        ("num-rounds", "3", "expects an integer"),
        ("num-rounds", True, "expects an integer"),
        ("train.learning-rate", "fast", "expects a number"),
        ("device", "gpu", "valid: auto, cpu, cuda, cuda:N, mps"),
        ("lora.target-modules", 3, "comma-separated"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(key, value, needle):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({key: value})
    assert f"'{key}'" in str(err.value) and needle in str(err.value)


def test_ints_are_accepted_for_floats_and_cross_field_checks():
    assert RunConfig.from_run_config({"lora.alpha": 32}).lora.alpha == 32.0
    with pytest.raises(ConfigError, match="min-train-clients"):
        RunConfig.from_run_config({"num-clients": 2, "min-train-clients": 3})
    with pytest.raises(ConfigError, match="lora.target-modules"):
        RunConfig.from_run_config({"lora.target-modules": " , "})
    assert RunConfig.from_run_config({"device": "cuda:1"}).device == "cuda:1"


def test_strategy_kwargs_are_typed_name_value_pairs():
    cfg = RunConfig.from_run_config({"strategy.kwargs": "proximal-mu=0.01, eta=1e-2, flag=true, tag=abc"})
    assert cfg.strategy.kwarg_dict() == {"proximal_mu": 0.01, "eta": 0.01, "flag": True, "tag": "abc"}
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg
    with pytest.raises(ConfigError, match="name=value pairs"):
        RunConfig.from_run_config({"strategy.kwargs": "proximal-mu"})


@pytest.mark.parametrize(
    ("ranks", "needle"),
    [
        ("4,x", "cannot read 'x'"),
        ("4:0.5,8:0.4", "sum to"),
        ("4:0.5,8", "mix of plain ranks"),
        ("0", "rank >= 1"),
    ],
)
def test_bad_rank_specs_are_named(ranks, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config({"lora.ranks": ranks})


def test_lora_only_keys_need_the_lora_method():
    with pytest.raises(ConfigError, match="peft.method = 'lora'"):
        RunConfig.from_run_config({"peft.method": "head", "lora.ranks": "2,4"})
    with pytest.raises(ConfigError, match="peft.method = 'lora'"):
        RunConfig.from_run_config({"peft.method": "bitfit", "strategy.name": "ffa-lora"})
