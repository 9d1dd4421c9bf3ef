"""Registry of parameter-efficient fine-tuning methods, keyed by name.

Each method takes a freshly loaded backbone + head and returns the module to train, with
``requires_grad`` set on exactly the tensors that the method trains and that travel
between server and clients.  Modelled on HF peft's tuner registry: one entry per method,
one config dataclass per method in :mod:`fedpeft.config`.

* ``lora``  -- LoRA (Hu et al., 2021) through HF peft's ``LoraConfig`` + the head.
* ``full``  -- every parameter trains and travels: the baseline of FedPEFT (Sun et al.,
  2022) that byte ratios are measured against.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from peft import LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from fedpeft.config import RunConfig, unknown_choice

ApplyFn = Callable[[PreTrainedModel, RunConfig], nn.Module]


@dataclass(frozen=True)
class PeftMethod:
    """One registered method: how to wrap a backbone, and a one-line description."""

    name: str
    apply: ApplyFn
    description: str
    # Whether ``save_pretrained`` writes a peft adapter (else a whole HF model).
    is_peft_adapter: bool


METHODS: dict[str, PeftMethod] = {}


def register_method(name: str, description: str, *, is_peft_adapter: bool) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator: add ``apply`` to the registry under ``name``."""

    def wrap(fn: ApplyFn) -> ApplyFn:
        if name in METHODS:
            raise ValueError(f"PEFT method {name!r} is already registered")
        METHODS[name] = PeftMethod(name, fn, description, is_peft_adapter)
        return fn

    return wrap


def get_method(name: str) -> PeftMethod:
    """The registered method ``name``; an unknown name names the key and the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise unknown_choice("peft.method", name, METHODS) from None


_PEFT_WRAPPER = re.compile(r"^base_model\.model\.")
_ADAPTER_SEGMENTS = re.compile(r"\.(modules_to_save\.default|default)(?=\.)")


def canonical_name(param_name: str) -> str:
    """The exchanged name of a parameter: peft's wrapper and adapter segments removed.

    ``base_model.model.bert...query.lora_A.default.weight`` becomes
    ``bert...query.lora_A.weight`` and the trained copy of the head
    (``classifier.modules_to_save.default.weight``) becomes ``classifier.weight`` -- the
    names peft itself uses in a saved adapter, and independent of the adapter's name.
    """
    return _ADAPTER_SEGMENTS.sub("", _PEFT_WRAPPER.sub("", param_name))


@register_method("lora", "LoRA adapters (HF peft) on the target modules + the head", is_peft_adapter=True)
def _lora(model: PreTrainedModel, cfg: RunConfig) -> nn.Module:
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # keeps the classification head trainable (modules_to_save)
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # peft annotates int; a float scale works
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
    )
    try:
        wrapped = get_peft_model(model, lora)
    except ValueError as err:
        raise unknown_choice(
            "lora.target-modules", ",".join(cfg.lora.target_modules), _leaf_module_names(model)
        ) from err
    if cfg.lora.freeze_a:  # FFA-LoRA: A stays at the shared seeded init, so it never travels
        for name, p in wrapped.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return wrapped


@register_method("full", "full fine-tuning: every parameter trains and travels", is_peft_adapter=False)
def _full(model: PreTrainedModel, cfg: RunConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _leaf_module_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if not list(mod.children())}
