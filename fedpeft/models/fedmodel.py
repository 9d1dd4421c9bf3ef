"""A run's model: a frozen pretrained backbone + a PEFT method + a head, cached per process.

:func:`get_model` is what the apps call.  It builds the model once per worker process
(loading the backbone is the expensive part) and afterwards only hands the same object
back: switching a worker from one client to the next swaps the exchanged tensors in
place (:meth:`FedModel.load_exchange_state`), never reloads weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from fedpeft.config import RunConfig
from fedpeft.models.backbone import (
    MODEL_KINDS,
    backbone_dtype,
    load_pretrained,
    load_processor,
)
from fedpeft.models.lora_layout import LoraLayout
from fedpeft.models.methods import (
    canonical_name,
    check_modality,
    get_method,
)
from fedpeft.models.output_layer import check_output_layer
from fedpeft.models.settings import checkpoints_activations
from fedpeft.models.vision import interpolate_always
from fedpeft.runtime import resolve_device
from fedpeft.settings import ConfigError

__all__ = [
    "EXCHANGED_FILE",
    "ExchangeError",
    "FedModel",
    "build_model",
    "get_model",
    "load_saved",
    "model_key",
]


EXCHANGED_FILE = "exchanged.safetensors"


class ExchangeError(ValueError):
    """Exchanged tensors do not match the model: missing / unexpected keys, shapes, dtypes."""


@dataclass
class FedModel:
    """A trainable model and the canonical, sorted set of tensors it exchanges."""

    module: nn.Module
    # The tokenizer, or an image model's image processor: what save() writes beside the weights.
    tokenizer: Any
    method: str
    device: torch.device
    # What the backbone was loaded as (``MODEL_KINDS``): the learning task's model.
    kind: str
    # canonical name -> the live parameter (sorted by name); exactly what trains and travels
    params: dict[str, nn.Parameter]
    # The exchanged tensors as built (seeded init): where every run starts, even when a
    # cached model was trained by an earlier run in the same process.
    initial_state: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # LoRA modules and their base weights (None for other methods): FLoRA's merged form.
    lora: LoraLayout | None = None

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def exchange_state(self) -> dict[str, np.ndarray]:
        """Copies of the exchanged tensors as float32 NumPy arrays, sorted by name."""
        return {k: p.detach().to("cpu", torch.float32).numpy().copy() for k, p in self.params.items()}

    def load_exchange_state(self, tensors: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Copy ``tensors`` into the live parameters; strict about names and shapes.

        Unlike peft's ``set_peft_model_state_dict`` (which loads with ``strict=False`` and
        silently drops renamed keys) a missing or unexpected key is an error.  A LoRA model
        also accepts FLoRA's merged form (see :mod:`fedpeft.models.lora_layout`): the update
        goes into the base weights and the adapter restarts from its seeded initialisation.
        """
        if self.lora is not None and self.lora.is_merged(tensors):
            self._load_merged(tensors)
            return
        if self.lora is not None:
            self.lora.restore()
        self._load_params(tensors)

    def _load_merged(self, tensors: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        assert self.lora is not None
        expected = {k for k in self.params if not self.lora.is_factor_key(k)} | self.lora.merged_keys(tensors)
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ExchangeError(
                f"merged (FLoRA) tensors do not match the model: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        try:
            self.lora.load_merged(tensors)
        except ValueError as err:
            raise ExchangeError(str(err)) from err
        fresh = {k: v for k, v in self.initial_state.items() if self.lora.is_factor_key(k)}
        self._load_params({k: v for k, v in tensors.items() if k in self.params} | fresh)

    def _load_params(self, tensors: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        missing = sorted(set(self.params) - set(tensors))
        unexpected = sorted(set(tensors) - set(self.params))
        if missing or unexpected:
            raise ExchangeError(
                f"exchanged tensors do not match method {self.method!r}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
            )
        with torch.no_grad():
            for name, param in self.params.items():
                value = torch.as_tensor(tensors[name])
                if tuple(value.shape) != tuple(param.shape):
                    raise ExchangeError(
                        f"tensor {name!r}: shape {tuple(value.shape)} != expected {tuple(param.shape)}"
                    )
                if not value.is_floating_point():
                    raise ExchangeError(f"tensor {name!r}: dtype {value.dtype} is not floating point")
                param.copy_(value.to(param.device, param.dtype))

    def saved_state(self) -> dict[str, np.ndarray]:
        """What :meth:`save` writes: the exchanged tensors, or (FLoRA) the merged form.

        A model holding a merged update in its base weights saves that update too; the
        peft adapter folder alone would lose it.
        """
        if self.lora is None or not self.lora.merged:
            return self.exchange_state()
        state = self.exchange_state()
        return {k: v for k, v in state.items() if not self.lora.is_factor_key(k)} | self.lora.merged_state()

    def save(self, path: str | Path, label_names: tuple[str, ...] = (), cfg: RunConfig | None = None) -> Path:
        """Write the model the HF way: a peft adapter folder (or a full model) + tokenizer.

        A peft adapter loads back with ``PeftModel.from_pretrained(base, path)`` where
        ``base`` is ``AutoModelForSequenceClassification.from_pretrained(<model>,
        num_labels=<K>)`` (a causal LM: ``AutoModelForCausalLM.from_pretrained(<model>)``,
        ``<model>`` from :func:`resolve_model_path`; an image model:
        ``AutoModelForImageClassification``, with its image processor saved in place of a
        tokenizer).  Next to it: the exchanged tensors (``exchanged.safetensors``) and, given
        ``cfg``, the run config that rebuilds the model (:func:`load_saved`).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.module.save_pretrained(str(path))  # type: ignore[operator]
        self.tokenizer.save_pretrained(str(path))
        save_file(self.saved_state(), str(path / EXCHANGED_FILE), metadata={"method": self.method})
        config: Any = getattr(self.module, "config", None)
        meta = {
            "method": self.method,
            "kind": self.kind,
            "label_names": list(label_names),
            "num_labels": int(config.num_labels) if config is not None else len(label_names),
            "exchanged": list(self.params),
            "cfg": cfg.to_run_config() if cfg is not None else None,
        }
        (path / "fedpeft.json").write_text(json.dumps(meta, indent=2))
        return path


def build_model(
    cfg: RunConfig, num_labels: int, device: str | None = None, kind: str = "sequence-classification"
) -> FedModel:
    """Load the backbone as ``kind`` (the task's model), apply ``cfg.peft.method`` and
    freeze everything else.

    The frozen backbone is in ``model.dtype``.  peft's adapters and the bottleneck
    adapters train in float32 whatever that dtype, so a bfloat16 backbone never rounds
    their updates away; ``bitfit`` and ``full`` train the backbone's own tensors, in its dtype.
    """
    method = get_method(cfg.peft.method)
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r} (valid: {', '.join(MODEL_KINDS)})")
    check_modality(method, kind)
    dev = resolve_device(device or cfg.device)
    base = load_pretrained(
        cfg.model.name, kind, num_labels, seed=cfg.seed, dtype=backbone_dtype(cfg.model.dtype, dev)
    )
    for p in base.parameters():
        p.requires_grad_(False)
    if kind == "causal-lm":
        # Training and scoring never reuse keys and values (generate() turns the cache on
        # itself); without a cache, packed rows get their block-diagonal masks.
        base.config.use_cache = False
    if kind == "image-classification":
        interpolate_always(base)  # any model.image-size, for every ViT family
    checkpointing = checkpoints_activations(cfg, kind)
    if checkpointing == "true" and base.supports_gradient_checkpointing:
        # Non-reentrant: gradients reach adapters inside checkpointed blocks even though
        # the frozen embeddings' outputs need none.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.model.gradient_checkpointing == "true":
        raise ConfigError(
            f"config key 'model.gradient-checkpointing': {type(base).__name__} does not support it"
        )
    torch.manual_seed(cfg.seed)  # adapter initialisation
    module = method.apply(base, cfg)
    module.to(dev)
    if kind == "causal-lm":
        check_output_layer(module)  # the output layer may then run on scored positions only
    params: dict[str, nn.Parameter] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            key = canonical_name(name)
            if key in params:
                raise ExchangeError(f"two trainable parameters share the exchanged name {key!r}")
            params[key] = p
    model = FedModel(
        module, load_processor(cfg.model.name, kind), method.name, dev, kind, dict(sorted(params.items()))
    )
    model.initial_state = model.exchange_state()
    model.lora = LoraLayout.of(module)
    return model


# A few entries: a worker that serves clients of different LoRA ranks keeps one model per rank.
@functools.lru_cache(maxsize=4)
def _cached(cfg_key: RunConfig, num_labels: int, device: str, kind: str) -> FedModel:
    return build_model(cfg_key, num_labels, device, kind)


# RunConfig fields that cannot change the model :func:`build_model` builds (the device
# is keyed on its own, resolved).  Every other field is part of the cache key, so a field
# added to RunConfig later costs at worst a rebuild, never a stale model.
_NOT_MODEL_FIELDS = frozenset(
    {
        "num_rounds",
        "num_clients",
        "fraction_train",
        "min_train_clients",
        "min_replies",
        "fraction_evaluate",
        "evaluate_every",
        "evaluate_examples",
        "round_timeout",
        "device",
        "results_dir",
        "run_name",
        "resume",
        "connect_timeout",
        "data",
        "train",
        "codec",
        "dp",
        "strategy",
        "failures",
    }
)


def model_key(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the fields that cannot change the model at their defaults: the cache key."""
    return dataclasses.replace(cfg, **_not_model_defaults())


@functools.cache
def _not_model_defaults() -> dict[str, Any]:
    """The defaults :func:`model_key` resets, built once (it runs on every client message)."""
    default = RunConfig()
    return {name: getattr(default, name) for name in _NOT_MODEL_FIELDS}


def get_model(cfg: RunConfig, num_labels: int, kind: str = "sequence-classification") -> FedModel:
    """The per-process model for ``cfg`` (built on first use, then reused)."""
    key = model_key(cfg)
    # The one model setting that depends on fields the key leaves out (train, dp): resolved.
    checkpointing = checkpoints_activations(cfg, kind)
    resolved = {"model": dataclasses.replace(key.model, gradient_checkpointing=checkpointing)}
    key = dataclasses.replace(key, **resolved)
    return _cached(key, num_labels, str(resolve_device(cfg.device)), kind)


def model_cache_info() -> functools._CacheInfo:
    """How often :func:`get_model` built a model vs reused one (for benchmarks and tests)."""
    return _cached.cache_info()


def load_saved(path: str | Path, device: str = "cpu") -> FedModel:
    """The model that :meth:`FedModel.save` wrote to ``path``, rebuilt.

    :func:`build_model` with the saved run config, then the saved exchanged tensors,
    loaded strictly (a missing, unexpected or misshapen tensor is an :class:`ExchangeError`).
    """
    path = Path(path)
    meta = json.loads((path / "fedpeft.json").read_text())
    if not meta.get("cfg"):
        raise ExchangeError(f"{path} was saved without its run config (FedModel.save(..., cfg=cfg))")
    cfg = RunConfig.from_run_config(meta["cfg"])
    if cfg.peft.method != meta["method"]:
        raise ExchangeError(f"{path}: method {meta['method']!r} but its run config says {cfg.peft.method!r}")
    model = build_model(cfg, int(meta["num_labels"]), device, meta.get("kind", "sequence-classification"))
    model.load_exchange_state(load_file(str(path / EXCHANGED_FILE)))
    return model
