"""The model side of LoRA-exact aggregation: where each LoRA module's frozen base weight is.

FLoRA (Wang et al., 2024) does not send averaged factors back: it merges the clients'
stacked products into the base weights and every client restarts from a fresh adapter.
The server therefore sends, per LoRA module ``M``, the accumulated global update in
factored form -- ``M.base_delta.A`` [R, in] and ``M.base_delta.B`` [out, R], scale
folded in (or, once that is the larger, the product itself as ``M.base_delta.W``) -- and
the client loads it as ``W = W0 + B @ A`` into the frozen base layer,
with its own adapter reset to the run's seeded initialisation (B = 0).  This module finds
the LoRA modules of a built model and applies that "merged form"; the aggregation maths
lives in ``strategies.lora_exact``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from fedpeft.models.methods import canonical_name
from strategies.lora_exact import BASE_A, BASE_B, BASE_W


@dataclass
class LoraModule:
    """One LoRA-adapted layer: its frozen base weight and that weight as loaded."""

    name: str  # canonical module name, e.g. bert.encoder.layer.0.attention.self.query
    base_weight: torch.Tensor  # the live frozen weight [out, in]
    pretrained: torch.Tensor  # W0, a copy
    layer: LoraLayer  # for the live adapter factors and their scale

    def adapter_delta(self) -> torch.Tensor:
        """``s * B @ A`` of the live adapter (float64)."""
        layer: Any = self.layer  # peft types these ModuleDicts loosely
        adapter = layer.active_adapters[0]
        a = layer.lora_A[adapter].weight.detach().to(torch.float64)
        b = layer.lora_B[adapter].weight.detach().to(torch.float64)
        return float(layer.scaling[adapter]) * (b @ a)


@dataclass
class LoraLayout:
    """Every LoRA module of a model, and whether a merged update sits in the base weights."""

    modules: dict[str, LoraModule]
    merged: bool = False

    @classmethod
    def of(cls, module: nn.Module) -> LoraLayout | None:
        """The layout of a peft LoRA model (None for any other method)."""
        found: dict[str, LoraModule] = {}
        for path, mod in module.named_modules():
            if isinstance(mod, LoraLayer):
                weight = mod.get_base_layer().weight
                assert isinstance(weight, torch.Tensor)
                name = canonical_name(path)
                found[name] = LoraModule(name, weight, weight.detach().clone(), mod)
        return cls(dict(sorted(found.items()))) if found else None

    def merged_keys(self, tensors: Mapping[str, object]) -> set[str]:
        """The merged-form names ``tensors`` must hold: per module ``W``, or else ``A`` and ``B``."""
        return {
            m + suffix
            for m in self.modules
            for suffix in ((BASE_W,) if m + BASE_W in tensors else (BASE_A, BASE_B))
        }

    @staticmethod
    def is_merged(tensors: Mapping[str, object]) -> bool:
        """Whether ``tensors`` are in merged form."""
        return any(k.endswith((BASE_A, BASE_W)) for k in tensors)

    def is_factor_key(self, key: str) -> bool:
        """Whether ``key`` is a LoRA factor (lora_A / lora_B) of one of the modules."""
        return any(key.startswith(m + ".lora_") for m in self.modules)

    def load_merged(self, tensors: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Set each base weight to ``W0 + B @ A`` from the merged-form tensors."""
        with torch.no_grad():
            for name, mod in self.modules.items():
                delta = _delta(name, tensors, tuple(mod.pretrained.shape))
                mod.base_weight.copy_(mod.pretrained + delta.to(mod.pretrained.device, mod.pretrained.dtype))
        self.merged = True

    def merged_state(self) -> dict[str, np.ndarray]:
        """The whole LoRA update in merged form, ``W = (base - W0) + s B @ A`` per module.

        Loading it (with the adapter at its init, B = 0) gives the same function: how a
        model that holds a merged update is saved.
        """
        out = {}
        for name, mod in self.modules.items():
            merged = (mod.base_weight.detach().to(torch.float64) - mod.pretrained.to(torch.float64)).cpu()
            out[name + BASE_W] = (merged + mod.adapter_delta().cpu()).to(torch.float32).numpy()
        return out

    def restore(self) -> None:
        """Put the pretrained base weights back (after a run that merged into them)."""
        if not self.merged:
            return
        with torch.no_grad():
            for mod in self.modules.values():
                mod.base_weight.copy_(mod.pretrained)
        self.merged = False


def _delta(
    name: str, tensors: Mapping[str, np.ndarray | torch.Tensor], shape: tuple[int, ...]
) -> torch.Tensor:
    """Module ``name``'s merged update as a dense float64 matrix of the base weight's ``shape``."""
    if name + BASE_W in tensors:
        w = torch.as_tensor(tensors[name + BASE_W], dtype=torch.float64)
        if tuple(w.shape) != shape:
            raise ValueError(
                f"merged update of {name!r}: W {tuple(w.shape)} is not the base weight's {shape}"
            )
        return w
    a = torch.as_tensor(tensors[name + BASE_A], dtype=torch.float64)
    b = torch.as_tensor(tensors[name + BASE_B], dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1]) != shape or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"merged update of {name!r}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not give "
            f"the base weight's shape {shape}"
        )
    return b @ a
