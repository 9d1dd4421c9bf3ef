"""Per-sample gradients that a PEFT method computes itself, where Opacus' hooks cannot.

A method registers such hooks with ``register_method(..., grad_sample_hooks=...)``;
:mod:`fedpeft.privacy.dpsgd` installs them (after Opacus wrapped the module) without
knowing which method it trains.  A hook sets ``param.grad_sample`` on the scale Opacus
uses, so Opacus clips and noises it like its own; it needs nothing from Opacus (only
``fedpeft.privacy`` imports it) but the loss reduction, passed in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# (the model's module, Opacus' loss reduction "mean" | "sum") -> the handles to remove after training
GradSampleHooks = Callable[[nn.Module, str], list[RemovableHandle]]


class GradSampleError(RuntimeError):
    """The method's per-sample gradients are not implemented for this layer layout."""


def ia3_grad_sample_hooks(module: nn.Module, loss_reduction: str) -> list[RemovableHandle]:
    """Per-sample gradients of the (IA)^3 vectors, which Opacus' hooks cannot reach.

    peft keeps each vector in a ``ParameterDict`` that the layer reads but never calls,
    so Opacus hooks a module that never runs ("Per sample gradient is not initialized").
    A forward hook on each (IA)^3 layer (found by its ``ia3_l`` vectors) computes
    ``grad_sample`` itself, on the scale Opacus uses (per-example loss, so times the batch
    size for a mean loss).  The privacy guards check the result like any other per-sample
    gradient.
    """
    handles = []
    for layer in module.modules():
        vectors = getattr(layer, "ia3_l", None)
        if not isinstance(vectors, nn.ParameterDict) or not any(p.requires_grad for p in vectors.values()):
            continue
        base = getattr(layer, "base_layer", None)
        if (
            len(vectors) != 1
            or not isinstance(base, nn.Linear)
            or not hasattr(layer, "is_feedforward")
            or getattr(layer, "fan_in_fan_out", False)
            or getattr(layer, "merged", False)
        ):
            raise GradSampleError(
                "method 'ia3': per-sample gradients are implemented for one unmerged (IA)^3 "
                f"adapter on nn.Linear layers, not on {type(layer).__name__} over {type(base).__name__}"
            )
        (vector,) = vectors.values()
        hook = functools.partial(_ia3_forward_hook, vector=vector, per_example=loss_reduction == "mean")
        handles.append(layer.register_forward_hook(hook))
    return handles


def _ia3_forward_hook(
    layer: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    output: torch.Tensor,
    *,
    vector: nn.Parameter,
    per_example: bool,
) -> None:
    if not (torch.is_grad_enabled() and output.requires_grad):
        return
    x = inputs[0].detach()

    def on_grad(grad: torch.Tensor) -> None:
        batch = grad.shape[0]
        g = grad.detach() * batch if per_example else grad.detach()
        base: Any = layer.base_layer
        with torch.no_grad():
            if layer.is_feedforward:  # out = base(x * v): d out / d v = x * (dL/d(x * v))
                act, back = x.to(vector.dtype), g @ base.weight
            else:  # out = base(x) * v: d out / d v = base(x) * dL/d out
                act, back = base(x), g
            sample = (act * back).reshape(batch, -1, act.shape[-1]).sum(dim=1).reshape(batch, *vector.shape)
        previous = getattr(vector, "grad_sample", None)
        vector.grad_sample = sample if previous is None else previous + sample  # type: ignore[attr-defined]

    output.register_hook(on_grad)
