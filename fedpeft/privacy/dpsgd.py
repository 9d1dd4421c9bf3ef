"""Sample-level DP-SGD on a client with Opacus.

Each client round wraps the cached model with a fresh ``PrivacyEngine`` (Poisson sampling
at rate batch size / local dataset size, per-sample clipping, Gaussian noise), trains,
and unwraps it again so the next client on the same worker starts from a plain module
with no hooks.  What a round costs and what it spent is :mod:`fedpeft.privacy.accounting`.
A PEFT method whose tensors Opacus cannot reach brings its own per-sample-gradient hooks
through the method registry (``PeftMethod.grad_sample_hooks``); this module installs them
without naming any method.

``dp.grad-sample-mode`` picks Opacus' per-sample engine: ``hooks`` and ``functorch``
materialise each example's gradient (``param.grad_sample``); ``ghost`` (ghost clipping)
computes only each example's gradient norm (``param._norm_sample``) and gets the clipped
sum from a second backward pass of the per-example losses reweighted by their clipping
factors, so the loss must go through the criterion Opacus returns: a plain loss would
train with no clipping at all.  ``dp.max-physical-batch-size`` splits each logical
(Poisson) batch into physical batches (Opacus' ``BatchMemoryManager``): the optimizer
clips and sums every physical batch and adds noise and steps once per logical batch, so
steps, noise and the accounting are those of the logical batches.

Guards against the silent failures others hit (see KNOWLEDGE.md): the DP optimizer must
hold every trainable parameter, every trainable parameter must get per-sample
information (gradient, or gradient norm under ghost clipping) of the physical batch's
size, and the trained tensors must have moved after the first private step with
examples; otherwise :class:`PrivacyError` is raised, naming the parameter.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.hooks import RemovableHandle

from fedpeft.models import FedModel, get_method
from fedpeft.models.grad_sample import GradSampleError
from fedpeft.privacy.accounting import PrivacyError, RoundPlan
from fedpeft.privacy.settings import DPConfig
from fedpeft.settings import ConfigError
from fedpeft.tasks.base import Examples, Task, model_outputs
from fedpeft.tasks.settings import TrainConfig
from fedpeft.training import TrainResult, make_optimizer

#: ``(logits, targets) -> mean loss``: the learning task's training loss.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: ``dp.grad-sample-mode`` values (Opacus' ``grad_sample_mode``), as the config declares them.
GRAD_SAMPLE_MODES: tuple[str, ...] = next(
    f.metadata["choices"] for f in dataclasses.fields(DPConfig) if f.name == "grad_sample_mode"
)
#: The modes that materialise each example's gradient in ``param.grad_sample``, which is
#: what a method's own per-sample-gradient hooks fill (ghost clipping reads norms only).
MATERIALISING_MODES = ("hooks", "functorch")


def grad_sample_modes(method: str) -> tuple[str, ...]:
    """The ``dp.grad-sample-mode`` values that can train PEFT method ``method`` privately.

    Opacus reaches every registered method's tensors in every mode, except where a method
    computes its own per-sample gradients (``PeftMethod.grad_sample_hooks``, e.g. ia3):
    those fill ``grad_sample``, which ghost clipping never reads.
    """
    if get_method(method).grad_sample_hooks is not None:
        return MATERIALISING_MODES
    return GRAD_SAMPLE_MODES


def check_grad_sample_mode(method: str, mode: str) -> None:
    """Refuse a ``dp.grad-sample-mode`` that cannot train ``method``, naming the ones that can.

    Raises :class:`ConfigError`: the launcher's preflight calls this before a run starts;
    :func:`train_private` calls it too (as :class:`PrivacyError`) for runs started otherwise.
    """
    working = grad_sample_modes(method)
    if mode not in working:
        raise ConfigError(
            f"config key 'dp.grad-sample-mode': {mode!r} cannot train peft.method {method!r}, which "
            f"computes its own per-sample gradients ({mode} clipping reads only Opacus' own); "
            f"valid for {method!r}: {', '.join(working)}"
        )


def train_private(
    model: FedModel,
    data: Examples,
    train: TrainConfig,
    plan: RoundPlan,
    dp: DPConfig,
    seed: int,
    proximal_mu: float = 0.0,
    *,
    task: Task,
) -> TrainResult:
    """``plan.steps`` DP-SGD steps (Poisson batches, clipped, noised) on the exchanged params.

    The loss is the learning task's (:meth:`fedpeft.tasks.Task.loss` of its outputs,
    :func:`fedpeft.tasks.base.model_outputs`), mean over the batch as Opacus'
    ``loss_reduction="mean"`` assumes.  ``plan.steps`` counts
    logical batches (of expected size ``train.batch-size``), whatever
    ``dp.max-physical-batch-size`` splits them into.  The result's loss is the mean over
    the examples seen (Poisson batches vary in size; an empty one adds nothing).

    ``proximal_mu > 0`` (FedProx) adds ``mu * (w - w_global)`` to the *noised* gradient:
    the term depends on no example, so it is post-processing and costs no privacy (added
    to the loss instead, Opacus' per-sample hooks would never see it).

    Three steps: make the private objects (:func:`_private_training`, which also undoes
    them), run the logical steps (:func:`_dp_steps`); the accounting is the caller's, from
    ``plan`` (:mod:`fedpeft.privacy.accounting`).
    """
    mode = _Mode.of(model.method, dp.grad_sample_mode)
    torch.manual_seed(seed)
    with _private_training(model, len(data), train, plan, dp, seed, mode, task.loss) as private:
        return _dp_steps(model, data, private, plan.steps, _forward_params(model), task, proximal_mu)


@dataclass(frozen=True)
class _Mode:
    """What differs between Opacus' per-sample modes (``dp.grad-sample-mode``), in one place."""

    name: str

    @classmethod
    def of(cls, method: str, name: str) -> _Mode:
        """The mode, refused (:class:`PrivacyError`) where it cannot train ``method``."""
        try:
            check_grad_sample_mode(method, name)
        except ConfigError as err:
            raise PrivacyError(str(err)) from err
        return cls(name)

    @property
    def ghost(self) -> bool:
        return self.name == "ghost"

    @property
    def per_sample(self) -> str:
        """What a backward pass leaves on each parameter, one row per example."""
        return _NORM_SAMPLE if self.ghost else _GRAD_SAMPLE

    def make_private_kwargs(self, loss: LossFn) -> dict[str, Any]:
        # Ghost clipping's loss must be the criterion make_private returns (a plain loss
        # would not be clipped at all); it wraps the task's loss, given per example.
        return {"criterion": TaskCriterion(loss)} if self.ghost else {}

    def unpack(self, made: tuple[Any, ...], loss: LossFn) -> _Private:
        """``make_private``'s result: (module, optimizer, loader), plus the criterion that
        runs both backward passes (the clipping itself) under ghost clipping."""
        if self.ghost:
            module, optimizer, criterion, loader = made
            return _Private(module, optimizer, loader, criterion, self.per_sample)
        module, optimizer, loader = made
        return _Private(module, optimizer, loader, loss, self.per_sample)


@dataclass(frozen=True)
class _Private:
    """The private objects of one client round: Opacus' module, optimizer and loader."""

    module: Any  # GradSampleModule
    optimizer: Any  # DPOptimizer
    loader: Any  # Poisson batches (split into physical batches when asked)
    loss: LossFn
    per_sample: str


@contextmanager
def _private_training(
    model: FedModel,
    rows: int,
    train: TrainConfig,
    plan: RoundPlan,
    dp: DPConfig,
    seed: int,
    mode: _Mode,
    loss: LossFn,
) -> Iterator[_Private]:
    """Opacus' private module, optimizer and loader over ``rows`` examples for this round;
    undone on the way out, so the cached model can be wrapped again by the next client on
    this worker."""
    from opacus import PrivacyEngine

    module = model.module
    module.train()
    params = list(model.params.values())
    # Opacus samples row numbers (Poisson); the task's examples turn them into a batch, so
    # any task's data (token ids, images) goes through the same loop.
    loader = DataLoader(
        TensorDataset(torch.arange(rows)),
        batch_size=train.batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off": a simulation, not production
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=False)
        try:
            made = engine.make_private(
                module=module,
                optimizer=make_optimizer(train, params),
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=mode.name,
                noise_generator=torch.Generator().manual_seed(seed + 1),
                **mode.make_private_kwargs(loss),
            )
        except Exception as err:  # Opacus' own validators: say so without its stack
            module.eval()
            raise PrivacyError(
                f"Opacus cannot make method {model.method!r} private with dp.grad-sample-mode {mode.name!r}: {err}"
            ) from err
    private = mode.unpack(made, loss)
    handles: list[RemovableHandle] = []
    try:
        handles = _method_grad_sample_hooks(model, private.optimizer.loss_reduction)
        if mode.ghost:
            handles += _contiguous_embedding_ids(module)
        with _physical_batches(private, dp.max_physical_batch_size) as batched, warnings.catch_warnings():
            # Opacus' hooks on a frozen backbone: the inputs need no gradient, by design.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            # functorch mode on an embedding table: Opacus asks autocast for the ids' int
            # dtype, which autocast declines (and computes in float32, as it should).
            warnings.filterwarnings("ignore", message="CPU Autocast only supports")
            yield batched
    finally:
        for handle in handles:
            handle.remove()
        private.module.to_standard_module()  # unhook, so the cached module can be wrapped again
        for p in params:
            p.grad_sample = None  # type: ignore[attr-defined]
        module.eval()


@contextmanager
def _physical_batches(private: _Private, max_physical: int) -> Iterator[_Private]:
    """``private`` with each logical batch split into physical ones of at most
    ``max_physical`` examples (Opacus' ``BatchMemoryManager``); 0 leaves it as it is."""
    if not max_physical:
        yield private
        return
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with BatchMemoryManager(
        data_loader=private.loader, max_physical_batch_size=max_physical, optimizer=private.optimizer
    ) as loader:
        yield dataclasses.replace(private, loader=loader)


class TaskCriterion:
    """The task's mean loss as a torch-style criterion, for Opacus' ghost clipping.

    Ghost clipping needs each example's loss (it sets ``reduction = "none"`` for its two
    backward passes); a task defines only the mean over a batch (:meth:`Task.loss`), whose
    value on a batch of one *is* that example's loss, so ``vmap`` over the examples gives
    them all in one call, for any task.
    """

    def __init__(self, loss: LossFn) -> None:
        self.loss = loss
        self.reduction = "mean"  # Opacus reads and switches this

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.reduction == "mean":
            return self.loss(logits, targets)
        per_example = torch.func.vmap(lambda x, y: self.loss(x.unsqueeze(0), y.unsqueeze(0)))(logits, targets)
        return per_example if self.reduction == "none" else per_example.sum()


def _method_grad_sample_hooks(model: FedModel, loss_reduction: str) -> list[RemovableHandle]:
    """The trained method's own per-sample-gradient hooks (none where Opacus needs no help)."""
    hooks = get_method(model.method).grad_sample_hooks
    if hooks is None:
        return []
    try:
        return hooks(model.module, loss_reduction)
    except GradSampleError as err:
        raise PrivacyError(str(err)) from err


def _contiguous_embedding_ids(module: torch.nn.Module) -> list[RemovableHandle]:
    """Make the ids a trained embedding table looks up contiguous (forward values unchanged).

    Ghost clipping's embedding norms ``view`` the ids, and peft's prefix tuning passes an
    expanded (stride-0) id tensor, which cannot be viewed; Opacus' hooks see the ids after
    these pre-hooks.
    """
    return [
        layer.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
        for layer in module.modules()
        if isinstance(layer, torch.nn.Embedding) and layer.weight.requires_grad
    ]


# What each mode leaves on a parameter after a backward pass, one row per example.
_GRAD_SAMPLE = "grad_sample"  # hooks, functorch: each example's gradient
_NORM_SAMPLE = "_norm_sample"  # ghost: each example's gradient norm (Opacus 1.6's attribute)


def _dp_steps(
    model: FedModel,
    data: Examples,
    private: _Private,
    num_steps: int,
    accepted: set[str],
    task: Task,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train until ``num_steps`` logical steps are done; each loader item is a physical batch.

    Opacus' optimizer decides when a logical batch ends: ``pre_step`` clips and sums a
    physical batch, and returns True (noised, scaled: ``p.grad`` is private) only on the
    last physical batch of a logical one, which is when the optimizer steps and a step
    counts.
    """
    dp_module, dp_optimizer, per_sample = private.module, private.optimizer, private.per_sample
    _check_optimizer(model, dp_optimizer)
    before = {k: p.detach().clone() for k, p in model.params.items()}
    params = list(model.params.values())
    anchor = [before[k] for k in model.params]
    steps, total, seen = 0, 0.0, 0
    checked_samples = checked_moved = False
    while steps < num_steps:
        for (order,) in private.loader:
            if steps >= num_steps:
                break
            dp_optimizer.zero_grad(set_to_none=True)
            rows = int(order.shape[0])
            if rows == 0:
                # An empty Poisson batch: no forward pass (BERT cannot take one), but the
                # step still adds noise, as the accounting assumes.
                _empty_batch(params, per_sample)
            else:
                inputs, labels = next(iter(data.batches(order, rows, model.device)))
                outputs, targets = model_outputs(
                    task, dp_module, _per_example_inputs(inputs, accepted), labels
                )
                loss = private.loss(outputs, targets)
                loss.backward()
                if not checked_samples:
                    _check_grad_samples(model, rows, per_sample)
                    checked_samples = True
                total += float(loss.detach()) * rows
                seen += rows
            if dp_optimizer.pre_step():  # the logical batch ended: p.grad is clipped, summed, noised
                if proximal_mu > 0:
                    with torch.no_grad():
                        for p, a in zip(params, anchor, strict=True):
                            cast(torch.Tensor, p.grad).add_(p - a, alpha=proximal_mu)
                dp_optimizer.original_optimizer.step()
                steps += 1
                if not checked_moved and seen:
                    _check_moved(model, before)
                    checked_moved = True
    return TrainResult(seen, steps, total / max(seen, 1))


def _empty_batch(params: Sequence[torch.Tensor], per_sample: str) -> None:
    """What a backward pass over no examples would leave: zero rows per sample (hooks,
    functorch), a zero clipped sum (ghost, whose optimizer sums ``p.grad``)."""
    for p in params:
        if per_sample == _NORM_SAMPLE:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]


def _per_example_inputs(inputs: dict[str, torch.Tensor], accepted: set[str]) -> dict[str, torch.Tensor]:
    """A batch's inputs with one row per example for every embedding that trains.

    BERT-style models look position and token-type embeddings up with a (1, L) buffer
    broadcast over the batch, so Opacus sees a batch of 1 for those tables ("per-sample"
    gradient of the whole batch).  Passing explicit (B, L) ids makes each example its own
    row; it changes nothing in the forward pass.  Inputs without token ids (images) pass as
    they are.
    """
    if "input_ids" not in inputs or "position_ids" in inputs:
        return inputs
    ids = inputs["input_ids"]
    inputs = dict(inputs)
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


def _check_grad_samples(model: FedModel, batch: int, per_sample: str = _GRAD_SAMPLE) -> None:
    """Every trainable tensor got per-sample information (``per_sample``: the attribute the
    mode fills) with one row per example of the physical batch of ``batch`` rows."""
    what = "gradient norm" if per_sample == _NORM_SAMPLE else "gradient"
    for name, p in model.params.items():
        gs = getattr(p, per_sample, None)
        if gs is None:
            raise PrivacyError(
                f"no per-sample {what} for {name!r}: Opacus cannot handle the layer holding it"
            )
        if gs.dim() == 0 or gs.shape[0] != batch:
            rows = "a scalar" if gs.dim() == 0 else f"batch {gs.shape[0]}"
            raise PrivacyError(
                f"per-sample {what} of {name!r} has {rows}, not {batch}: the layer mixes "
                "examples, so clipping would not bound one example's influence"
            )


def _check_moved(model: FedModel, before: dict[str, torch.Tensor]) -> None:
    if all(torch.equal(before[k], p.detach()) for k, p in model.params.items()):
        raise PrivacyError(
            "no trainable tensor changed after the first private step: DP-SGD is not training this model"
        )
