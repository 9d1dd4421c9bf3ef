"""Local DP-SGD (Opacus) on the cached model: it trains, unwraps, and its guards name the tensor."""

import numpy as np
import pytest
import torch

from fedpeft.config import RunConfig
from fedpeft.models import build_model
from fedpeft.privacy import PrivacyError, RoundPlan, dpsgd
from fedpeft.tasks import get_task
from tests.conftest import TINY


@pytest.fixture(scope="module")
def lora():
    cfg = RunConfig.from_run_config(TINY | {"dp.mode": "local"})
    task = get_task(cfg)
    return cfg, build_model(cfg, task.num_outputs(cfg)), task.client_train_set(cfg, 0, 3)


def test_private_training_moves_the_adapter_and_can_repeat_on_the_cached_model(lora):
    cfg, model, data = lora
    plan = RoundPlan(1.0, 0.2, 3)
    names = [n for n, _ in model.module.named_parameters()]
    for seed in range(3):  # the same module is wrapped and unwrapped again: no "hooks twice"
        before = model.exchange_state()
        result = dpsgd.train_private(model, data, cfg.train, plan, cfg.dp, seed, loss=get_task(cfg).loss)
        after = model.exchange_state()
        assert result.steps == 3
        assert all(not np.array_equal(before[k], after[k]) for k in before)  # every exchanged tensor moved
    assert [n for n, _ in model.module.named_parameters()] == names  # no "_module." prefixes
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.module.parameters())


def test_fedprox_under_dp_pulls_towards_the_global_tensors(lora):
    cfg, model, data = lora
    init = model.exchange_state()
    plan = RoundPlan(0.5, 0.2, 4)

    def distance(mu: float) -> float:
        model.load_exchange_state(init)
        dpsgd.train_private(
            model, data, cfg.train, plan, cfg.dp, seed=3, proximal_mu=mu, loss=get_task(cfg).loss
        )
        after = model.exchange_state()
        return float(sum(np.sum((after[k] - init[k]) ** 2) for k in init))

    # Same seed, same batches and noise: only the proximal term differs.
    assert 0.0 < distance(1e4) < distance(0.0)
    model.load_exchange_state(init)


def test_guards_name_the_tensor(lora):
    _, model, _ = lora
    optimizer = torch.optim.SGD(list(model.params.values())[:-1], lr=0.1)
    with pytest.raises(PrivacyError, match="classifier.weight"):
        dpsgd._check_optimizer(model, optimizer)
    for p in model.params.values():
        p.grad_sample = torch.zeros((4, *p.shape))
    with pytest.raises(PrivacyError, match="batch 4, not 8"):
        dpsgd._check_grad_samples(model, 8)
    for p in model.params.values():
        p.grad_sample = None
    with pytest.raises(PrivacyError, match="no per-sample gradient"):
        dpsgd._check_grad_samples(model, 8)
    before = {k: p.detach().clone() for k, p in model.params.items()}
    with pytest.raises(PrivacyError, match="no trainable tensor changed"):
        dpsgd._check_moved(model, before)


def test_full_fine_tuning_under_dp_gets_per_example_embedding_gradients():
    # BERT looks position / token-type embeddings up with a (1, L) buffer: without explicit
    # (B, L) ids Opacus would see a batch of 1 there, and the guard refuses to train.
    cfg = RunConfig.from_run_config(TINY | {"dp.mode": "local", "peft.method": "full"})
    task = get_task(cfg)
    model = build_model(cfg, task.num_outputs(cfg))
    data = task.client_train_set(cfg, 0, 3)
    inputs = dpsgd._per_example_inputs(
        data.input_ids[:4], data.attention_mask[:4], dpsgd._forward_params(model)
    )
    assert inputs["position_ids"].shape == inputs["input_ids"].shape
    model.module.eval()
    with torch.no_grad():
        plain = model.module(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        assert torch.equal(plain, model.module(**inputs).logits)  # the forward pass is unchanged
    result = dpsgd.train_private(
        model, data, cfg.train, RoundPlan(1.0, 0.2, 2), cfg.dp, 0, loss=get_task(cfg).loss
    )
    assert result.steps == 2
