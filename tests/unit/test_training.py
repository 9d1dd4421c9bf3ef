import numpy as np
import pytest

from fedpeft.config import ConfigError, RunConfig
from fedpeft.models import build_model
from fedpeft.tasks import build_task
from fedpeft.tasks.settings import TrainConfig
from fedpeft.training import train_local

TASK = build_task("sequence-classification")


@pytest.fixture(scope="module")
def setup(request):
    from fedpeft.config import RunConfig
    from tests.conftest import TINY

    cfg = RunConfig.from_run_config(TINY)
    model = build_model(cfg, TASK.num_outputs(cfg))
    return cfg, model, TASK.client_train_set(cfg, 0, cfg.num_clients)


def test_local_training_is_reproducible_per_seed(setup):
    _cfg, model, data = setup
    init = model.exchange_state()
    tcfg = TrainConfig(batch_size=8, max_steps=3, learning_rate=0.003)
    runs = []
    for seed in (5, 5, 6):
        model.load_exchange_state(init)
        res = train_local(model, data, tcfg, seed=seed, task=TASK)
        runs.append((res, model.exchange_state()))
    (r1, s1), (r2, s2), (_r3, s3) = runs
    assert r1 == r2 and all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert r1.steps == 3 and r1.num_examples == 24
    assert any(not np.array_equal(s1[k], s3[k]) for k in s1)
    # Only the exchanged tensors moved; the head and LoRA B (zero at init) in particular.
    assert not np.array_equal(s1["classifier.weight"], init["classifier.weight"])
    model.load_exchange_state(init)


def test_training_lowers_the_loss_on_its_own_data(setup):
    _cfg, model, data = setup
    init = model.exchange_state()
    before = TASK.evaluate(model, data, 32).loss
    train_local(
        model, data, TrainConfig(batch_size=8, local_epochs=3, learning_rate=0.003), seed=0, task=TASK
    )
    after = TASK.evaluate(model, data, 32)
    assert after.loss < before and 0.0 <= after.metrics["accuracy"] <= 1.0
    model.load_exchange_state(init)


def test_the_optimizer_is_the_configured_one(setup):
    """train.optimizer: AdamW's first step moves every coordinate by at most lr (it
    normalises per coordinate); plain SGD's step is lr x the gradient, whose entries are
    far smaller here and differ in size."""
    _cfg, model, data = setup
    init = {k: v.copy() for k, v in model.exchange_state().items()}
    steps = {}
    for name in ("adamw", "sgd"):
        model.load_exchange_state(init)
        train_local(
            model,
            data,
            TrainConfig(batch_size=8, max_steps=1, learning_rate=0.01, optimizer=name),
            0,
            task=TASK,
        )
        head = model.exchange_state()["classifier.weight"]
        steps[name] = np.abs(head - init["classifier.weight"]).ravel()
    assert steps["adamw"].max() <= 0.01 * 1.001 and np.median(steps["adamw"]) > 0.005
    moved = steps["sgd"][steps["sgd"] > 0]
    # SGD steps by lr x gradient: entries far below Adam's ~lr, and spread over magnitudes
    assert (
        moved.size
        and np.median(moved) < 0.1 * np.median(steps["adamw"])
        and moved.max() > 3 * np.median(moved)
    )
    with pytest.raises(ConfigError, match="'train.optimizer'.*adamw, sgd"):
        RunConfig.from_run_config({"train.optimizer": "lion"})
    model.load_exchange_state(init)


def test_fedprox_term_keeps_the_update_near_the_global_tensors(setup):
    _cfg, model, data = setup
    init = model.exchange_state()
    tcfg = TrainConfig(batch_size=8, max_steps=4, learning_rate=0.01)

    def distance(mu: float) -> float:
        model.load_exchange_state(init)
        train_local(model, data, tcfg, seed=1, proximal_mu=mu, task=TASK)
        after = model.exchange_state()
        return float(sum(np.sum((after[k] - init[k]) ** 2) for k in init))

    free, prox = distance(0.0), distance(500.0)
    assert 0.0 < prox < free
    model.load_exchange_state(init)


def test_the_proximal_term_is_fedprox_formula():
    import torch

    from fedpeft.training import proximal_term

    w, anchor = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])], [torch.zeros(2), torch.ones(1, 1)]
    assert float(proximal_term(w, anchor, mu=0.5)) == pytest.approx(0.25 * (1 + 4 + 4))
