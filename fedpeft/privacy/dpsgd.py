"""Sample-level DP-SGD on a client with Opacus.

Each client round wraps the cached model with a fresh ``PrivacyEngine`` (Poisson sampling
at rate batch size / local dataset size, per-sample clipping, Gaussian noise), trains,
and unwraps it again so the next client on the same worker starts from a plain module
with no hooks.  What a round costs and what it spent is :mod:`fedpeft.privacy.accounting`.
A PEFT method whose tensors Opacus cannot reach brings its own per-sample-gradient hooks
through the method registry (``PeftMethod.grad_sample_hooks``); this module installs them
without naming any method.

Guards against the silent failures others hit (see KNOWLEDGE.md): the DP optimizer must
hold every trainable parameter, every trainable parameter must get a per-sample gradient
of the batch's size, and the trained tensors must have moved after the first private
step; otherwise :class:`PrivacyError` is raised, naming the parameter.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.hooks import RemovableHandle

from fedpeft.config import DPConfig, TrainConfig
from fedpeft.models import FedModel, get_method
from fedpeft.models.grad_sample import GradSampleError
from fedpeft.privacy.accounting import PrivacyError, RoundPlan
from fedpeft.training import Encoded, TrainResult

#: ``(logits, targets) -> mean loss``: the learning task's training loss.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_private(
    model: FedModel,
    data: Encoded,
    train: TrainConfig,
    plan: RoundPlan,
    dp: DPConfig,
    seed: int,
    proximal_mu: float = 0.0,
    *,
    loss: LossFn,
) -> TrainResult:
    """``plan.steps`` DP-SGD steps (Poisson batches, clipped, noised) on the exchanged params.

    ``loss(logits, targets)`` is the learning task's (:meth:`fedpeft.tasks.Task.loss`), mean
    over the batch as Opacus' ``loss_reduction="mean"`` assumes.

    ``proximal_mu > 0`` (FedProx) adds ``mu * (w - w_global)`` to the *noised* gradient:
    the term depends on no example, so it is post-processing and costs no privacy (added
    to the loss instead, Opacus' per-sample hooks would never see it).
    """
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    module = model.module
    module.train()
    params = list(model.params.values())
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    dataset = TensorDataset(data.input_ids, data.attention_mask, data.labels)
    loader = DataLoader(dataset, batch_size=train.batch_size, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off": a simulation, not production
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=False)
        try:
            made = engine.make_private(
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode="hooks",
                noise_generator=torch.Generator().manual_seed(seed + 1),
            )
        except Exception as err:  # Opacus' own validators: say so without its stack
            raise PrivacyError(f"Opacus cannot make method {model.method!r} private: {err}") from err
    dp_module, dp_optimizer, dp_loader = made[0], made[1], made[2]
    handles: list[RemovableHandle] = []
    try:
        handles = _method_grad_sample_hooks(model, dp_optimizer.loss_reduction)
        with warnings.catch_warnings():
            # Opacus' hooks on a frozen backbone: the inputs need no gradient, by design.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return _dp_steps(
                model,
                dp_module,
                dp_optimizer,
                dp_loader,
                plan.steps,
                _forward_params(model),
                loss,
                proximal_mu,
            )
    finally:
        for handle in handles:
            handle.remove()
        dp_module.to_standard_module()  # unhook, so the cached module can be wrapped again
        for p in params:
            p.grad_sample = None  # type: ignore[attr-defined]
        module.eval()


def _method_grad_sample_hooks(model: FedModel, loss_reduction: str) -> list[RemovableHandle]:
    """The trained method's own per-sample-gradient hooks (none where Opacus needs no help)."""
    hooks = get_method(model.method).grad_sample_hooks
    if hooks is None:
        return []
    try:
        return hooks(model.module, loss_reduction)
    except GradSampleError as err:
        raise PrivacyError(str(err)) from err


def _dp_steps(
    model: FedModel,
    dp_module: Any,
    dp_optimizer: Any,
    dp_loader: Any,
    num_steps: int,
    accepted: set[str],
    loss_fn: LossFn,
    proximal_mu: float = 0.0,
) -> TrainResult:
    _check_optimizer(model, dp_optimizer)
    before = {k: p.detach().clone() for k, p in model.params.items()}
    params = list(model.params.values())
    anchor = [before[k] for k in model.params]
    steps, total, seen = 0, 0.0, 0
    while steps < num_steps:
        for ids, mask, labels in dp_loader:
            if steps >= num_steps:
                break
            dp_optimizer.zero_grad(set_to_none=True)
            rows = int(labels.shape[0])
            if rows == 0:
                # An empty Poisson batch: no forward pass (BERT cannot take one), but the
                # step still adds noise, as the accounting assumes.
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
            else:
                width = int(mask.sum(dim=1).max())
                ids, mask = ids[:, :width].to(model.device), mask[:, :width].to(model.device)
                if labels.dim() == 2:  # token targets (a causal LM): trimmed like the inputs
                    labels = labels[:, :width]
                logits = dp_module(**_per_example_inputs(ids, mask, accepted)).logits
                loss = loss_fn(logits, labels.to(model.device))
                loss.backward()
                if steps == 0:
                    _check_grad_samples(model, rows)
                total += float(loss.detach())
                seen += rows
            if proximal_mu > 0:
                _proximal_step(dp_optimizer, params, anchor, proximal_mu)
            else:
                dp_optimizer.step()
            if steps == 0:
                _check_moved(model, before)
            steps += 1
    return TrainResult(seen, steps, total / max(steps, 1))


def _proximal_step(dp_optimizer: Any, params: list[Any], anchor: list[torch.Tensor], mu: float) -> None:
    """Opacus' step with FedProx's gradient added after clipping and noise."""
    if dp_optimizer.pre_step():  # clip per sample, sum, add noise, scale: p.grad is now private
        with torch.no_grad():
            for p, a in zip(params, anchor, strict=True):
                p.grad.add_(p - a, alpha=mu)
        dp_optimizer.original_optimizer.step()


def _per_example_inputs(ids: torch.Tensor, mask: torch.Tensor, accepted: set[str]) -> dict[str, torch.Tensor]:
    """Inputs with one row per example for every embedding that trains.

    BERT-style models look position and token-type embeddings up with a (1, L) buffer
    broadcast over the batch, so Opacus sees a batch of 1 for those tables ("per-sample"
    gradient of the whole batch).  Passing explicit (B, L) ids makes each example its own
    row; it changes nothing in the forward pass.
    """
    inputs = {"input_ids": ids, "attention_mask": mask}
    batch, width = ids.shape
    if "position_ids" in accepted:
        inputs["position_ids"] = torch.arange(width, device=ids.device).expand(batch, width).contiguous()
    if "token_type_ids" in accepted:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def _forward_params(model: FedModel) -> set[str]:
    """The id inputs that :func:`_per_example_inputs` passes: those of a table that trains.

    (Prompt tuning would otherwise get position ids it drops, with a warning per step.)
    """
    module: Any = model.module
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    accepted = set(inspect.signature(base.forward).parameters)
    for ids, table in (("position_ids", "position_embeddings"), ("token_type_ids", "token_type_embeddings")):
        if not any(f"{table}." in name for name in model.params):
            accepted.discard(ids)
    return accepted


def _check_optimizer(model: FedModel, dp_optimizer: torch.optim.Optimizer) -> None:
    held = {id(p) for group in dp_optimizer.param_groups for p in group["params"]}
    missing = [k for k, p in model.params.items() if id(p) not in held]
    if missing:
        raise PrivacyError(
            f"the DP optimizer does not hold trainable tensors {missing[:3]}: they would train without noise"
        )


def _check_grad_samples(model: FedModel, batch: int) -> None:
    for name, p in model.params.items():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise PrivacyError(
                f"no per-sample gradient for {name!r}: Opacus cannot handle the layer holding it"
            )
        if gs.shape[0] != batch:
            raise PrivacyError(
                f"per-sample gradient of {name!r} has batch {gs.shape[0]}, not {batch}: the layer mixes "
                "examples, so clipping would not bound one example's influence"
            )


def _check_moved(model: FedModel, before: dict[str, torch.Tensor]) -> None:
    if all(torch.equal(before[k], p.detach()) for k, p in model.params.items()):
        raise PrivacyError(
            "no trainable tensor changed after the first private step: DP-SGD is not training this model"
        )
