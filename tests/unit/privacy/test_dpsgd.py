"""Local DP-SGD (Opacus) on the cached model: it trains, unwraps, and its guards name the tensor.

Every grad-sample mode (hooks, functorch, ghost clipping) and physical batches
(``dp.max-physical-batch-size``) train the same logical DP-SGD: the same parameters as
hooks in one pass, with the logical number of optimizer steps.
"""

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from peft import PeftModelForSequenceClassification
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedpeft.config import ConfigError, RunConfig
from fedpeft.models import build_model
from fedpeft.privacy import PrivacyError, RoundPlan, dpsgd
from fedpeft.privacy.settings import DPConfig
from fedpeft.tasks import build_task, get_task
from fedpeft.training import Encoded
from tests.conftest import TINY

MODES = dpsgd.GRAD_SAMPLE_MODES


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
        result = dpsgd.train_private(model, data, cfg.train, plan, cfg.dp, seed, task=get_task(cfg))
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
        dpsgd.train_private(model, data, cfg.train, plan, cfg.dp, seed=3, proximal_mu=mu, task=get_task(cfg))
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
    # Ghost clipping leaves per-sample gradient norms instead: checked the same way.
    with pytest.raises(PrivacyError, match="no per-sample gradient norm for 'bert."):
        dpsgd._check_grad_samples(model, 8, dpsgd._NORM_SAMPLE)
    for p in model.params.values():
        p._norm_sample = torch.zeros(4)
    with pytest.raises(PrivacyError, match="gradient norm of .* has batch 4, not 8"):
        dpsgd._check_grad_samples(model, 8, dpsgd._NORM_SAMPLE)
    for p in model.params.values():
        del p._norm_sample
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
        {"input_ids": data.input_ids[:4], "attention_mask": data.attention_mask[:4]},
        dpsgd._forward_params(model),
    )
    assert inputs["position_ids"].shape == inputs["input_ids"].shape
    model.module.eval()
    with torch.no_grad():
        plain = model.module(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        assert torch.equal(plain, model.module(**inputs).logits)  # the forward pass is unchanged
    result = dpsgd.train_private(
        model, data, cfg.train, RoundPlan(1.0, 0.2, 2), cfg.dp, 0, task=get_task(cfg)
    )
    assert result.steps == 2


# ---------------------------------------------------------------------- grad-sample modes, physical batches
def _dp(cfg: RunConfig, **changes) -> DPConfig:
    return dataclasses.replace(cfg.dp, **changes)


def _unwrapped(model) -> bool:
    """No Opacus attribute or hook left on the cached module."""
    attrs = ("grad_sample", "_norm_sample", "_forward_counter", "_current_grad_sample")
    leftover = [a for p in model.module.parameters() for a in attrs if getattr(p, a, None) is not None]
    hooked = any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.module.modules()
    )
    return not leftover and not hooked


@pytest.mark.parametrize("physical", [0, 3])
@pytest.mark.parametrize("mode", MODES)
def test_every_grad_sample_mode_trains_lora_privately(lora, mode, physical):
    cfg, model, data = lora
    before = model.exchange_state()
    dp = _dp(cfg, grad_sample_mode=mode, max_physical_batch_size=physical)
    result = dpsgd.train_private(model, data, cfg.train, RoundPlan(1.0, 0.2, 2), dp, 0, task=get_task(cfg))
    after = model.exchange_state()
    assert result.steps == 2 and result.num_examples > 0 and np.isfinite(result.loss)
    assert all(not np.array_equal(before[k], after[k]) for k in before)  # noise reaches every tensor
    assert _unwrapped(model)


@pytest.fixture(scope="module")
def still():
    """LoRA with every dropout off, so that runs differing only in how the batch is split
    (or in how the per-sample gradients are computed) compute the same function."""
    cfg = RunConfig.from_run_config(TINY | {"dp.mode": "local", "lora.dropout": 0.0})
    task = get_task(cfg)
    model = build_model(cfg, task.num_outputs(cfg))
    for layer in model.module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    return cfg, model, task.client_train_set(cfg, 0, 3), model.exchange_state()


@contextlib.contextmanager
def _counted(model) -> Iterator[tuple[list[int], list[str]]]:
    """Record the rows of every forward pass and the optimizer class of every step taken."""
    rows: list[int] = []
    stepped: list[str] = []
    step_hook = register_optimizer_step_post_hook(lambda opt, *_: stepped.append(type(opt).__name__))
    forward_hook = model.module.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    try:
        yield rows, stepped
    finally:
        step_hook.remove()
        forward_hook.remove()


def _run(still, plan: RoundPlan, seed: int = 5, **dp_changes):
    """One private round from the initial tensors: (tensors after, result, optimizer steps,
    rows of each forward pass)."""
    cfg, model, data, init = still
    model.load_exchange_state(init)
    with _counted(model) as (rows, stepped):
        result = dpsgd.train_private(
            model, data, cfg.train, plan, _dp(cfg, **dp_changes), seed, task=get_task(cfg)
        )
    return model.exchange_state(), result, stepped, rows


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_physical_batches_give_the_one_pass_parameters_in_logical_steps(still, mode):
    plan = RoundPlan(0.5, 0.1, 3)  # noise too: the same seeded draws, once per logical step
    whole, one_pass, stepped_whole, rows_whole = _run(still, plan, grad_sample_mode=mode)
    split, result, stepped, rows = _run(still, plan, grad_sample_mode=mode, max_physical_batch_size=3)
    assert max(rows) <= 3 < max(rows_whole) and len(rows) > len(rows_whole)  # really split
    assert sum(rows) == sum(rows_whole) == result.num_examples == one_pass.num_examples
    # Only logical batches step the optimizer (AdamW, wrapped by Opacus): 3, not one per physical batch.
    assert stepped == stepped_whole == ["AdamW"] * 3 and result.steps == one_pass.steps == 3
    assert _max_diff(whole, split) < 1e-6
    assert result.loss == pytest.approx(one_pass.loss, rel=1e-6)


def test_ghost_and_functorch_clip_like_hooks(still):
    # No noise and a clipping norm every example's gradient exceeds: the update is the
    # mean of clipped gradients.  Ghost clipping that did not clip (a plain loss instead
    # of Opacus' criterion) would match the unclipped run, not the hooks one.
    plan = RoundPlan(0.0, 0.1, 2)  # LoRA's A moves from step 2 (B starts at zero)
    clipped, *_ = _run(still, plan, grad_sample_mode="hooks", max_grad_norm=1e-3)
    unclipped, *_ = _run(still, plan, grad_sample_mode="hooks", max_grad_norm=1e6)
    init = still[3]
    assert _max_diff(clipped, init) > 1e-3  # it trained
    assert _max_diff(clipped, unclipped) > 1e-3  # and clipping shows in the tensors
    for mode in ("functorch", "ghost"):  # (ghost in physical batches: the test above)
        other, *_ = _run(still, plan, max_grad_norm=1e-3, grad_sample_mode=mode)
        assert _max_diff(other, clipped) < 1e-5, mode


@pytest.mark.parametrize("mode", MODES)
def test_empty_poisson_batches_step_in_every_mode_and_with_physical_batches(lora, mode):
    cfg, model, data = lora
    tiny = Encoded(data.input_ids[:20], data.attention_mask[:20], data.labels[:20])
    train = dataclasses.replace(cfg.train, batch_size=1)  # expected batch 1: often empty
    plan = RoundPlan(1.0, 1 / 20, 6)
    runs = []
    for physical in (0, 1):
        dp = _dp(cfg, grad_sample_mode=mode, max_physical_batch_size=physical)
        with _counted(model) as (rows, _):
            result = dpsgd.train_private(model, tiny, train, plan, dp, seed=1, task=get_task(cfg))
        runs.append((result, rows))
    (whole, rows_whole), (split, rows_split) = runs
    assert whole.steps == split.steps == 6
    assert len(rows_whole) < 6  # some logical batches were empty: no forward pass, still a step
    assert max(rows_split) == 1 and sum(rows_split) == sum(rows_whole) == split.num_examples


def test_prefix_tuning_trains_under_ghost_clipping():
    # peft looks the prefix up with an expanded (stride-0) id tensor, which ghost
    # clipping's embedding norms cannot view: train_private makes trained tables' ids contiguous.
    cfg = RunConfig.from_run_config(TINY | {"dp.mode": "local", "peft.method": "prefix"})
    task = get_task(cfg)
    model = build_model(cfg, task.num_outputs(cfg))
    before = model.exchange_state()
    dp = _dp(cfg, grad_sample_mode="ghost", max_physical_batch_size=3)
    data = task.client_train_set(cfg, 0, 3)
    result = dpsgd.train_private(model, data, cfg.train, RoundPlan(1.0, 0.2, 1), dp, 0, task=task)
    after = model.exchange_state()
    assert result.steps == 1 and all(not np.array_equal(before[k], after[k]) for k in before)
    assert _unwrapped(model)


def test_ghost_criterion_gives_each_examples_loss():
    for name, logits, targets in (
        ("sequence-classification", torch.randn(4, 5), torch.tensor([0, 3, 1, 4])),
        # The causal LM's outputs are its per-token losses (CausalLM.forward), not logits.
        ("causal-lm", torch.rand(3, 6), torch.tensor([[-100] * 3 + [1, 2, 3], [-100] * 6, [4] * 6])),
    ):
        loss = build_task(name).loss
        criterion = dpsgd.TaskCriterion(loss)
        assert torch.equal(criterion(logits, targets), loss(logits, targets))  # "mean": the task's loss
        criterion.reduction = "none"  # what Opacus sets for its two backward passes
        each = torch.stack([loss(logits[i : i + 1], targets[i : i + 1]) for i in range(len(targets))])
        assert torch.allclose(criterion(logits, targets), each)


@pytest.fixture(scope="module")
def mixing():
    """Prompt tuning with peft's own lookup (one prompt row repeated over the batch) and
    only the prompt training: nothing crashes, but one gradient covers the whole batch."""
    cfg = RunConfig.from_run_config(TINY | {"dp.mode": "local", "peft.method": "prompt"})
    task = get_task(cfg)
    model = build_model(cfg, task.num_outputs(cfg))
    model.module.__class__ = PeftModelForSequenceClassification  # undo the per-row lookup
    prompt = {k: p for k, p in model.params.items() if k.startswith("prompt_encoder.")}
    for name, p in model.params.items():
        p.requires_grad_(name in prompt)
    return cfg, dataclasses.replace(model, params=prompt), task.client_train_set(cfg, 0, 3)


@pytest.mark.parametrize("mode", MODES)
def test_a_layer_that_mixes_examples_is_caught_in_every_mode(mixing, mode):
    cfg, model, data = mixing
    what = "gradient norm" if mode == "ghost" else "gradient"
    with pytest.raises(
        PrivacyError, match=f"per-sample {what} of 'prompt_encoder.embedding.weight' has batch 1"
    ):
        dpsgd.train_private(
            model,
            data,
            cfg.train,
            RoundPlan(1.0, 0.2, 2),
            _dp(cfg, grad_sample_mode=mode),
            0,
            task=get_task(cfg),
        )
    assert _unwrapped(model)


def test_a_method_with_its_own_per_sample_gradients_refuses_ghost_naming_the_modes_that_work():
    from fedpeft.running.launch import preflight

    cfg = RunConfig.from_run_config(
        TINY | {"dp.mode": "local", "peft.method": "ia3", "dp.grad-sample-mode": "ghost"}
    )
    expected = (
        r"'dp.grad-sample-mode': 'ghost' cannot train peft.method 'ia3'.*valid for 'ia3': hooks, functorch"
    )
    with pytest.raises(ConfigError, match=expected):
        preflight(cfg)  # before any run starts
    task = get_task(cfg)
    model = build_model(cfg, task.num_outputs(cfg))
    data = task.client_train_set(cfg, 0, 3)
    with pytest.raises(PrivacyError, match=expected):  # and where a run is started otherwise
        dpsgd.train_private(model, data, cfg.train, RoundPlan(1.0, 0.2, 1), cfg.dp, 0, task=task)
    assert dpsgd.grad_sample_modes("ia3") == ("hooks", "functorch")
    result = dpsgd.train_private(  # a mode it names does train it
        model,
        data,
        cfg.train,
        RoundPlan(1.0, 0.2, 1),
        _dp(cfg, grad_sample_mode="functorch"),
        0,
        task=task,
    )
    assert result.steps == 1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "dp.grad-sample-mode",
            "ew",
            r"'dp.grad-sample-mode': unknown value 'ew'.*valid: functorch, ghost, hooks",
        ),
        ("dp.grad-sample-mode", 1, r"'dp.grad-sample-mode' expects a string"),
        ("dp.max-physical-batch-size", -1, r"'dp.max-physical-batch-size' must be >= 0, got -1"),
        ("dp.max-physical-batch-size", 2.5, r"'dp.max-physical-batch-size' expects an integer"),
    ],
)
def test_bad_values_of_the_new_keys_name_the_key_and_what_is_valid(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config({key: value})
