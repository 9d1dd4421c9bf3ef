import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedpeft.config import ConfigError, RunConfig
from fedpeft.models import (
    ExchangeError,
    build_model,
    canonical_name,
    get_model,
    model_key,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def lora():
    return build_model(RunConfig(device="cpu"), num_labels=5)


def test_lora_trains_and_exchanges_only_adapter_and_head(lora):
    # r=8 on query,value of 6 layers: 6*2*(8*384*2) = 73,728; head 384*5+5 = 1,925.
    assert lora.num_trainable == 73_728 + 1_925
    assert list(lora.params) == sorted(lora.params)
    assert all(("lora_" in k) or k.startswith("classifier.") for k in lora.params)
    trainable = {n for n, p in lora.module.named_parameters() if p.requires_grad}
    assert {canonical_name(n) for n in trainable} == set(lora.params)
    frozen = sum(p.numel() for p in lora.module.parameters() if not p.requires_grad)
    assert frozen > 22_000_000  # the whole MiniLM backbone stays frozen


def test_canonical_names_drop_peft_wrapper_segments():
    assert canonical_name(
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    ) == ("bert.encoder.layer.0.attention.self.query.lora_A.weight")
    assert canonical_name("base_model.model.classifier.modules_to_save.default.bias") == "classifier.bias"
    assert (
        canonical_name("bert.embeddings.word_embeddings.weight") == "bert.embeddings.word_embeddings.weight"
    )


def test_loading_is_strict(lora):
    state = lora.exchange_state()
    with pytest.raises(ExchangeError, match="missing"):
        lora.load_exchange_state({k: v for k, v in state.items() if k != "classifier.bias"})
    with pytest.raises(ExchangeError, match="unexpected"):
        lora.load_exchange_state(state | {"bert.pooler.dense.weight": np.zeros((384, 384), np.float32)})
    bad = dict(state)
    bad["classifier.weight"] = np.zeros((4, 384), np.float32)
    with pytest.raises(ExchangeError, match="shape"):
        lora.load_exchange_state(bad)


def test_exchange_state_round_trips_into_the_live_parameters(lora):
    state = lora.exchange_state()
    changed = {k: v + 0.5 for k, v in state.items()}
    lora.load_exchange_state(changed)
    assert all(np.allclose(lora.exchange_state()[k], changed[k]) for k in state)
    lora.load_exchange_state(state)


def test_saved_adapter_loads_with_peft_and_predicts_the_same(lora, tmp_path):
    state = {k: v + np.float32(0.01) * np.sign(v + 1e-3) for k, v in lora.exchange_state().items()}
    lora.load_exchange_state(state)  # a non-trivial adapter (B is zero at init)
    lora.save(tmp_path / "adapter", ("a", "b", "c", "d", "e"))
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=5)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    batch = lora.tokenizer(
        ["stocks rallied on wall street", "the striker scored twice"], return_tensors="pt", padding=True
    )
    lora.module.eval()
    with torch.no_grad():
        assert torch.allclose(lora.module(**batch).logits, loaded(**batch).logits, atol=1e-5)


def test_full_method_exchanges_every_parameter():
    full = build_model(RunConfig(device="cpu", peft=RunConfig().peft.__class__(method="full")), num_labels=5)
    assert full.num_trainable == sum(p.numel() for p in full.module.parameters())
    assert (
        full.num_trainable == 22_713_216 - 384 * 384 - 384 + 384 * 384 + 384 + 1_925
    )  # backbone + pooler + head


def test_model_is_built_once_per_process():
    cfg = RunConfig(device="cpu", seed=11)
    assert get_model(cfg, 5) is get_model(RunConfig(device="cpu", seed=11, num_rounds=9), 5)


def test_the_cache_key_keeps_what_shapes_the_model_and_drops_the_rest():
    cfg = RunConfig.from_run_config(
        {
            "seed": 3,
            "lora.r": 4,
            "adapter.bottleneck": 8,
            "num-rounds": 9,
            "codec.name": "sign",
            "device": "cpu",
        }
    )
    shaping = ("seed", "model", "peft", "lora", "prompt", "prefix", "ia3", "adapter")
    assert model_key(cfg) == RunConfig(**{name: getattr(cfg, name) for name in shaping})
    assert model_key(cfg) != model_key(RunConfig.from_run_config({"lora.r": 4, "adapter.bottleneck": 8}))


def test_unknown_method_and_target_module_are_config_errors():
    with pytest.raises(ConfigError, match="peft.method.*did you mean 'lora'"):
        build_model(RunConfig.from_run_config({"peft.method": "loar"}), 5)
    with pytest.raises(ConfigError, match="lora.target-modules"):
        build_model(RunConfig.from_run_config({"lora.target-modules": "qkv_proj"}), 5)
