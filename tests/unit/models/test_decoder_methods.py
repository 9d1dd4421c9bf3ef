"""PEFT methods on a real decoder (the packaged SmolLM2-135M-Instruct, a Llama): which
apply, what they train, and that Opacus reaches every tensor they exchange."""

from __future__ import annotations

import pytest

from fedpeft import privacy
from fedpeft.config import ConfigError, RunConfig
from fedpeft.models import build_model
from fedpeft.tasks import build_task
from fedpeft.tasks.settings import TrainConfig
from tests.conftest import TINY_LLM

TASK = build_task("causal-lm")
DECODER_METHODS = ("lora", "prompt", "prefix", "ia3", "adapter")


def _build(**overrides):
    cfg = RunConfig.from_run_config(TINY_LLM | overrides)
    return cfg, build_model(cfg, TASK.num_outputs(cfg), kind="causal-lm")


def test_lora_targets_default_to_the_architectures_own():
    _, model = _build()
    layers = {k.split(".self_attn.")[1].split(".")[0] for k in model.params}
    assert layers == {"q_proj", "v_proj"}
    assert model.num_trainable == 460_800  # 30 layers x (q: 8*(576+576) + v: 8*(576+192))
    _, every = _build(**{"lora.target-modules": "all-linear"})
    kinds = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[1] for k in every.params}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_adapters_sit_after_attention_and_feed_forward_outputs():
    _, model = _build(**{"peft.method": "adapter", "adapter.bottleneck": 8})
    sites = {k.split(".adapter.")[0].split("layers.0.")[-1] for k in model.params if ".layers.0." in k}
    assert sites == {"self_attn.o_proj", "mlp.down_proj"}


@pytest.mark.parametrize("method", ["bitfit", "head"])
def test_methods_with_nothing_to_train_on_a_llama_are_refused(method):
    with pytest.raises(ConfigError, match=f"peft.method '{method}'.*choose lora"):
        _build(**{"peft.method": method})


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_method_trains_privately_and_exchanges_its_tensors(method):
    cfg, model = _build(**{"peft.method": method, "dp.mode": "local", "dp.noise-multiplier": 1.0})
    state = model.exchange_state()
    assert state and not any(k.startswith("lm_head") or "embed_tokens" in k for k in state)
    data = TASK.client_train_set(cfg, 0, cfg.num_clients)
    train = TrainConfig(batch_size=4, max_steps=1)
    plan = privacy.plan_round(cfg.dp, train, len(data), 1)
    # train_private's guards: every exchanged tensor gets a per-example gradient and moves.
    result = privacy.train_private(model, data, train, plan, cfg.dp, seed=0, task=TASK)
    assert result.steps == 1
    moved = model.exchange_state()
    model.load_exchange_state(state)
    assert all((model.exchange_state()[k] == state[k]).all() for k in state)
    assert any((moved[k] != state[k]).any() for k in state)
