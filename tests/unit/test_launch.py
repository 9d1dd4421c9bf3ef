from pathlib import Path

import pytest

from fedpeft.config import ConfigError, RunConfig
from fedpeft.launch import (
    RayOptions,
    load_experiment,
    parse_set,
    preflight,
    ray_backend_config,
    resolve_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_set_values_parse_as_toml_scalars_or_strings():
    assert parse_set(
        ["lora.r=4", "fraction-train=0.5", "data.dataset=wordnet-nouns", 'device="cpu"', "x=true"]
    ) == {
        "lora.r": 4,
        "fraction-train": 0.5,
        "data.dataset": "wordnet-nouns",
        "device": "cpu",
        "x": True,
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["lora.r"])


@pytest.mark.parametrize("path", sorted((ROOT / "simulations").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_experiment_is_a_valid_config(path):
    text = path.read_text()
    assert text.startswith("#") and "fedpeft run" in text.split("\n\n")[0]  # says how to launch it
    cfg, _ = resolve_config(load_experiment(path))
    preflight(cfg)


def test_unknown_keys_fail_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'num-rounds'"):
        resolve_config({"num-round": 3})


def test_results_folder_is_pinned_and_local_files_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("text,label\na,x\nb,y\n")
    cfg, final = resolve_config({"results-dir": "out", "data.dataset": "d.csv"})
    assert Path(final["results-dir"]) == tmp_path / "out" and final["run-name"]
    assert final["data.dataset"] == str(tmp_path / "d.csv") and cfg.data.dataset == final["data.dataset"]


def test_preflight_names_bad_registry_entries():
    with pytest.raises(ConfigError, match="peft.method"):
        preflight(RunConfig.from_run_config({"peft.method": "adapterz"}))
    with pytest.raises(ValueError, match="strategy.name"):
        preflight(RunConfig.from_run_config({"strategy.name": "fedsgd"}))


def test_ray_resources_are_explicit_and_local_by_default():
    backend = ray_backend_config(
        RunConfig(device="cpu"), RayOptions(cpus_per_client=1, num_cpus=2, object_store_mb=300)
    )
    init = backend["init_args"]
    assert backend["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert init["address"] == "local" and init["num_cpus"] == 2 and not init["include_dashboard"]
    assert init["object_store_memory"] == 300 * 1024 * 1024
    cluster = ray_backend_config(RunConfig(device="cpu"), RayOptions(address="127.0.0.1:6379"))["init_args"]
    assert cluster["address"] == "127.0.0.1:6379" and "num_cpus" not in cluster
