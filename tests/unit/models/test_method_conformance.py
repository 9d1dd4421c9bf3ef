"""Every registered PEFT method honours the same contract (a new method gets this suite for free).

Exactly the ``requires_grad`` tensors travel, under canonical names, with the head; loading
is strict; a saved model comes back with the same logits; and a local DP-SGD round passes
the privacy guards.  Each method runs on every modality it declares: text methods on the
packaged MiniLM, image methods on the packaged DINOv2-S/14.  One model per (modality,
method), built once for the module, on a tiny batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

from fedpeft import privacy
from fedpeft.config import ConfigError, RunConfig
from fedpeft.models import (
    METHODS,
    ExchangeError,
    FedModel,
    build_model,
    canonical_name,
    load_saved,
    methods_for,
    resolve_model_path,
)
from fedpeft.privacy import dpsgd
from fedpeft.tasks import build_task
from fedpeft.tasks.image_classification import Pixels
from fedpeft.training import Encoded, train_local
from tests.conftest import TINY, TINY_VISION

MODALITIES = ("text", "image")
# Every (modality, method) pair a registered method declares.
ALL = [pytest.param(mod, m, id=f"{mod}-{m}") for mod in MODALITIES for m in methods_for(mod)]
HEAD = ("classifier.bias", "classifier.weight")
TASKS = {"text": build_task("sequence-classification"), "image": build_task("image-classification")}
TINIES = {"text": TINY, "image": TINY_VISION}
BASES = {"text": AutoModelForSequenceClassification, "image": AutoModelForImageClassification}
SENTENCES = ["stocks rallied on wall street", "the striker scored twice in the final"]


@pytest.fixture(scope="module")
def configs() -> dict[str, RunConfig]:
    extra = {"dp.mode": "local", "train.batch-size": 4, "train.max-steps": 2}
    return {mod: RunConfig.from_run_config(TINIES[mod] | extra) for mod in MODALITIES}


@pytest.fixture
def base_cfg(request, configs) -> RunConfig:
    return configs[request.node.callspec.params.get("modality", "text")]


@pytest.fixture
def task(request):
    return TASKS[request.node.callspec.params.get("modality", "text")]


@pytest.fixture(scope="module")
def datasets_() -> dict[str, Encoded | Pixels]:
    return {}


@pytest.fixture
def data(request, datasets_, base_cfg, task) -> Encoded | Pixels:
    """16 training examples of the test's modality."""
    modality = request.node.callspec.params.get("modality", "text")
    if modality not in datasets_:
        part = task.client_train_set(base_cfg, 0, 3)
        if isinstance(part, Pixels):
            datasets_[modality] = dataclasses.replace(part, images=part.images[:16], labels=part.labels[:16])
        else:
            datasets_[modality] = Encoded(part.input_ids[:16], part.attention_mask[:16], part.labels[:16])
    return datasets_[modality]


@pytest.fixture(scope="module")
def built() -> dict[tuple[str, str], FedModel]:
    return {}


def _cfg(base_cfg: RunConfig, method: str) -> RunConfig:
    return dataclasses.replace(base_cfg, peft=dataclasses.replace(base_cfg.peft, method=method))


@pytest.fixture
def model(request, built, base_cfg, task) -> FedModel:
    """The module's one model of the test's modality and method (built on first use)."""
    key = (request.node.callspec.params["modality"], request.node.callspec.params["method"])
    if key not in built:
        cfg = _cfg(base_cfg, key[1])
        built[key] = build_model(cfg, task.num_outputs(cfg), kind=task.model_kind)
    return built[key]


def _frozen(model: FedModel) -> dict[str, torch.Tensor]:
    """Copies of every parameter that does not train, and of every buffer."""
    out = {n: p.detach().clone() for n, p in model.module.named_parameters() if not p.requires_grad}
    return out | {f"buffer:{n}": b.clone() for n, b in model.module.named_buffers()}


def _assert_unchanged(model: FedModel, before: dict[str, torch.Tensor]) -> None:
    after = _frozen(model)
    assert after.keys() == before.keys()
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert not moved, f"frozen tensors changed: {moved[:5]}"


def _logits(
    model: FedModel | torch.nn.Module, tokenizer, data: Encoded | Pixels | None = None
) -> torch.Tensor:
    """Logits of two fixed inputs: sentences for a text model, ``data``'s first images else."""
    module = model.module if isinstance(model, FedModel) else model
    module.eval()
    if isinstance(data, Pixels):
        inputs = next(iter(data.batches(torch.arange(2), 2, torch.device("cpu"))))[0]
    else:
        inputs = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return module(**inputs).logits


@pytest.mark.parametrize(("modality", "method"), ALL)
def test_exactly_the_trainable_tensors_travel_and_nothing_else_trains(
    modality, method, model, data, base_cfg, task
):
    trainable = {n: p for n, p in model.module.named_parameters() if p.requires_grad}
    assert {canonical_name(n) for n in trainable} == set(model.params)
    assert {id(p) for p in trainable.values()} == {id(p) for p in model.params.values()}
    assert model.num_trainable == sum(p.numel() for p in trainable.values()) > 0

    frozen, before = _frozen(model), model.exchange_state()
    result = train_local(model, data, base_cfg.train, seed=0, task=task)
    assert result.steps == 2
    _assert_unchanged(model, frozen)
    after = model.exchange_state()
    # The head always gets a gradient; LoRA's A / an adapter's down may not in step 1.
    assert all(not np.array_equal(before[k], after[k]) for k in HEAD)
    assert any(not np.array_equal(before[k], after[k]) for k in before if k not in HEAD) or method == "head"


@pytest.mark.parametrize(("modality", "method"), ALL)
def test_exchanged_names_are_canonical_and_include_the_head(modality, method, model):
    names = list(model.params)
    assert names == sorted(names)
    assert set(HEAD) <= set(names)
    for name in names:
        assert canonical_name(name) == name
        assert not name.startswith("base_model."), name
        assert ".default." not in name and not name.endswith(".default"), name
        assert "modules_to_save" not in name and "original_module" not in name, name
    assert METHODS[method].description


@pytest.mark.parametrize(("modality", "method"), ALL)
def test_loading_is_strict(modality, method, model):
    state = model.exchange_state()
    with pytest.raises(ExchangeError, match="missing"):
        model.load_exchange_state({k: v for k, v in state.items() if k != "classifier.bias"})
    with pytest.raises(ExchangeError, match="unexpected"):
        model.load_exchange_state(state | {"not.a.parameter.weight": np.zeros(3, np.float32)})
    bad, (rows, cols) = dict(state), state["classifier.weight"].shape
    bad["classifier.weight"] = np.zeros((rows + 1, cols), np.float32)
    with pytest.raises(ExchangeError, match="shape"):
        model.load_exchange_state(bad)
    model.load_exchange_state(state)
    assert all(np.array_equal(state[k], v) for k, v in model.exchange_state().items())


@pytest.mark.parametrize(("modality", "method"), ALL)
def test_saved_model_loads_back_with_the_same_logits(modality, method, model, data, base_cfg, task, tmp_path):
    cfg = _cfg(base_cfg, method)
    train_local(model, data, dataclasses.replace(cfg.train, max_steps=1), seed=1, task=task)
    labels = task.label_names(cfg)
    model.save(tmp_path / "saved", labels, cfg=cfg)
    loaded = load_saved(tmp_path / "saved")
    assert loaded.method == method and list(loaded.params) == list(model.params)
    expected = _logits(model, model.tokenizer, data)
    assert torch.allclose(_logits(loaded, loaded.tokenizer, data), expected, atol=1e-6)
    if METHODS[method].is_peft_adapter:  # still a plain peft adapter folder
        path = resolve_model_path(cfg.model.name)
        base = BASES[modality].from_pretrained(path, num_labels=len(labels))
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "saved"))
        assert torch.allclose(_logits(peft_model, model.tokenizer, data), expected, atol=1e-5)


@pytest.mark.parametrize(("modality", "method"), ALL)
def test_a_private_round_passes_the_guards_and_trains(modality, method, model, data, base_cfg):
    names = [n for n, _ in model.module.named_parameters()]
    frozen, before = _frozen(model), model.exchange_state()
    plan = privacy.RoundPlan(noise_multiplier=1.0, sample_rate=4 / len(data), steps=2)
    result = privacy.train_private(
        model, data, base_cfg.train, plan, base_cfg.dp, seed=0, task=build_task(base_cfg.task.name)
    )
    assert result.steps == 2
    _assert_unchanged(model, frozen)
    after = model.exchange_state()
    assert all(not np.array_equal(before[k], after[k]) for k in before)  # noise reaches every tensor
    # Unwrapped again: no Opacus prefixes, per-sample gradients or hooks left behind.
    assert [n for n, _ in model.module.named_parameters()] == names
    assert all(getattr(p, "grad_sample", None) is None for p in model.module.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.module.modules())


@pytest.mark.parametrize(("modality", "method"), ALL)
def test_ghost_clipping_in_physical_batches_trains_the_method_or_is_refused_by_name(
    modality, method, model, data, base_cfg
):
    """Ghost clipping (per-sample norms only: where methods break, e.g. peft's expanded
    prefix ids) in physical batches of 2, or a refusal naming the modes the method can use
    (every mode on LoRA: tests/unit/privacy/test_dpsgd.py)."""
    task = build_task(base_cfg.task.name)
    plan = privacy.RoundPlan(noise_multiplier=1.0, sample_rate=4 / len(data), steps=1)
    dp = dataclasses.replace(base_cfg.dp, grad_sample_mode="ghost", max_physical_batch_size=2)
    working = dpsgd.grad_sample_modes(method)
    if "ghost" not in working:
        with pytest.raises(privacy.PrivacyError, match=f"valid for '{method}': {', '.join(working)}"):
            privacy.train_private(model, data, base_cfg.train, plan, dp, seed=0, task=task)
        return
    before = model.exchange_state()
    result = privacy.train_private(model, data, base_cfg.train, plan, dp, seed=0, task=task)
    after = model.exchange_state()
    assert result.steps == 1
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    assert all(getattr(p, "grad_sample", None) is None for p in model.module.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.module.modules())


def test_adapters_start_as_the_pretrained_model_and_follow_placement(configs):
    base_cfg = configs["text"]
    head = build_model(_cfg(base_cfg, "head"), 5)
    cfg = _cfg(base_cfg, "adapter")
    cfg = dataclasses.replace(
        cfg, adapter=dataclasses.replace(cfg.adapter, placement="attention", bottleneck=8)
    )
    adapter = build_model(cfg, 5)
    # 6 layers x one adapter (384 -> 8 -> 384, with biases) + the head.
    assert adapter.num_trainable == 6 * (384 * 8 + 8 + 8 * 384 + 384) + 384 * 5 + 5
    assert all(".attention.output.dense.adapter." in k for k in adapter.params if k not in HEAD)
    assert torch.equal(_logits(adapter, adapter.tokenizer), _logits(head, head.tokenizer))


def test_vision_adapters_start_as_the_pretrained_model(configs):
    """DINOv2's adapters sit after attention.o_proj and mlp.fc2 (before its layer scale) and
    start as the identity: the same logits as the head-only model."""
    cfg, task = configs["image"], TASKS["image"]
    head = build_model(_cfg(cfg, "head"), 10, kind=task.model_kind)
    adapter = build_model(_cfg(cfg, "adapter"), 10, kind=task.model_kind)
    # 12 layers x two adapters (384 -> 32 -> 384, with biases) + the head over [CLS, mean patch].
    assert adapter.num_trainable == 12 * 2 * (384 * 32 + 32 + 32 * 384 + 384) + 768 * 10 + 10
    sites = {k.split(".adapter.")[0].split(".", 4)[-1] for k in adapter.params if k not in HEAD}
    assert sites == {"attention.o_proj", "mlp.fc2"}
    images = task.client_train_set(cfg, 0, 3)
    assert torch.equal(_logits(adapter, None, images), _logits(head, None, images))


@pytest.mark.parametrize(
    ("modality", "method", "valid"),
    [("image", "prompt", "vpt"), ("image", "ia3", "bitfit"), ("text", "vpt", "prefix")],
)
def test_a_method_on_a_modality_it_does_not_fit_is_refused_with_those_that_do(
    configs, modality, method, valid
):
    task = TASKS[modality]
    with pytest.raises(
        ConfigError, match=rf"'peft.method': '{method}' applies to .*valid for {modality}: .*{valid}"
    ):
        build_model(_cfg(configs[modality], method), 4, kind=task.model_kind)
