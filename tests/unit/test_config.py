import dataclasses
from pathlib import Path

import pytest
import tomllib
from flwr.common.config import flatten_dict

from fedpeft.codecs.settings import CodecConfig
from fedpeft.config import ConfigError, RunConfig, config_schema
from fedpeft.data.settings import DataConfig
from fedpeft.models.settings import LoraConfig
from fedpeft.privacy.settings import DPConfig
from fedpeft.recovery.settings import FailureConfig
from fedpeft.server.settings import ServerConfig, StrategyConfig
from fedpeft.tasks.settings import TrainConfig

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
        ("data.partitioner", "x", "valid: dirichlet, iid, natural, pathological, shard"),
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


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: TrainConfig(learning_rate=-1), "config key 'train.learning-rate' must be > 0.0, got -1.0"),
        (lambda: TrainConfig(batch_size=0), "config key 'train.batch-size' must be >= 1, got 0"),
        (lambda: TrainConfig(batch_size=8.0), "config key 'train.batch-size' expects an integer"),
        (lambda: DataConfig(partitioner="diriclet"), "did you mean 'dirichlet'"),
        (lambda: LoraConfig(target_modules=()), "config key 'lora.target-modules' must name at least one"),
        (lambda: LoraConfig(target_modules="query"), "config key 'lora.target-modules' expects a tuple"),
        (lambda: LoraConfig(ranks=("4:0.5", "8:0.4")), "sum to"),
        (lambda: CodecConfig(name="zip"), "config key 'codec.name': unknown value 'zip'"),
        (lambda: ServerConfig(step_search=("1", "x")), "server.step-search"),
        (lambda: ServerConfig(aggregate="median"), "config key 'server.aggregate': unknown value 'median'"),
        (lambda: StrategyConfig(kwargs=("mu",)), "name=value pairs"),
        (lambda: FailureConfig(raise_probability=0.6, drop_probability=0.6), "sum to at most 1"),
        (lambda: DPConfig(mode="on"), "config key 'dp.mode': unknown value 'on'"),
        (lambda: RunConfig(num_clients=2, min_train_clients=3), "config key 'min-train-clients' (3)"),
        (lambda: RunConfig(device="gpu"), "config key 'device': unknown value 'gpu'"),
        (lambda: RunConfig(seed=True), "config key 'seed' expects an integer"),
    ],
)
def test_dataclasses_built_in_code_get_the_run_config_checks(build, needle):
    with pytest.raises(ConfigError) as err:
        build()
    assert needle in str(err.value)


def test_codec_settings_are_checked_inside_the_codec_section():
    from fedpeft.codecs.compeft import CompeftSettings

    options = dict(CodecConfig().options) | {"compeft": CompeftSettings(scale="median")}
    with pytest.raises(ConfigError, match="config key 'codec.compeft.scale': unknown value 'median'"):
        CodecConfig(options=tuple(options.items()))


def test_both_paths_build_the_same_object():
    # Ints given for floats (and lists for tuples) are stored as the run config stores them.
    built = RunConfig(
        lora=LoraConfig(alpha=32, target_modules=["query", "key"]), train=TrainConfig(learning_rate=1)
    )
    assert built.lora.alpha == 32.0 and isinstance(built.lora.alpha, float)
    assert built.lora.target_modules == ("query", "key") and isinstance(built.train.learning_rate, float)
    read = RunConfig.from_run_config(
        {"lora.alpha": 32, "lora.target-modules": "query,key", "train.learning-rate": 1}
    )
    assert read == built and read.to_run_config() == built.to_run_config()
    with pytest.raises(ConfigError, match="'lora.r' must be >= 1"):
        dataclasses.replace(built.lora, r=0)  # replace builds anew: the checks run again


def test_every_section_knows_its_key_prefix():
    # The prefix an error names is declared on the class; it must be the section's field name.
    for key, (owner, _) in config_schema().items():
        if key.count(".") < 2:  # codec.<name>.<key>: the codec's own settings, checked by CodecConfig
            assert owner._section == key.rpartition(".")[0], key


def test_gradient_checkpointing_auto_is_for_long_llm_batches_without_local_dp():
    from fedpeft.models.settings import checkpoints_activations

    def resolved(kind="causal-lm", **sets):
        return checkpoints_activations(RunConfig.from_run_config(sets), kind)

    long = {"train.batch-size": 8, "model.max-length": 192}
    assert resolved(**long) == "true"
    assert resolved(**{"train.batch-size": 8, "model.max-length": 96}) == "false"
    assert resolved("image-classification", **long) == "false"
    assert resolved(**long, **{"dp.mode": "local"}) == "false"  # Opacus' hooks would see layers twice
    assert resolved(**{"model.gradient-checkpointing": True}) == "true"  # a TOML boolean is accepted
    assert resolved(**long, **{"model.gradient-checkpointing": "false"}) == "false"
    with pytest.raises(ConfigError, match="gradient-checkpointing.*local DP-SGD"):
        RunConfig.from_run_config({"model.gradient-checkpointing": True, "dp.mode": "local"})
