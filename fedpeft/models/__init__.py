"""Models: a frozen pretrained backbone + a PEFT method + a head, cached per process.

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

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedpeft.config import RunConfig
from fedpeft.models.backbone import load_classifier, load_tokenizer, resolve_model_path
from fedpeft.models.methods import METHODS, canonical_name, get_method, register_method
from fedpeft.runtime import resolve_device

__all__ = [
    "METHODS",
    "ExchangeError",
    "FedModel",
    "build_model",
    "canonical_name",
    "get_method",
    "get_model",
    "register_method",
    "resolve_model_path",
]


class ExchangeError(ValueError):
    """Exchanged tensors do not match the model: missing / unexpected keys, shapes, dtypes."""


@dataclass
class FedModel:
    """A trainable model and the canonical, sorted set of tensors it exchanges."""

    module: nn.Module
    tokenizer: PreTrainedTokenizerBase
    method: str
    device: torch.device
    # canonical name -> the live parameter (sorted by name); exactly what trains and travels
    params: dict[str, nn.Parameter]
    # The exchanged tensors as built (seeded init): where every run starts, even when a
    # cached model was trained by an earlier run in the same process.
    initial_state: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def exchange_state(self) -> dict[str, np.ndarray]:
        """Copies of the exchanged tensors as float32 NumPy arrays, sorted by name."""
        return {k: p.detach().to("cpu", torch.float32).numpy().copy() for k, p in self.params.items()}

    def load_exchange_state(self, tensors: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Copy ``tensors`` into the live parameters; strict about names and shapes.

        Unlike peft's ``set_peft_model_state_dict`` (which loads with ``strict=False`` and
        silently drops renamed keys) a missing or unexpected key is an error.
        """
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

    def save(self, path: str | Path, label_names: tuple[str, ...] = ()) -> Path:
        """Write the model the HF way: a peft adapter folder (or a full model) + tokenizer.

        A peft adapter loads back with ``PeftModel.from_pretrained(base, path)`` where
        ``base`` is ``AutoModelForSequenceClassification.from_pretrained(<model>,
        num_labels=<K>)``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.module.save_pretrained(str(path))  # type: ignore[operator]
        self.tokenizer.save_pretrained(str(path))
        meta = {
            "method": self.method,
            "label_names": list(label_names),
            "exchanged": list(self.params),
        }
        (path / "fedpeft.json").write_text(json.dumps(meta, indent=2))
        return path


def build_model(cfg: RunConfig, num_labels: int, device: str | None = None) -> FedModel:
    """Load the backbone, apply ``cfg.peft.method`` and freeze everything else."""
    method = get_method(cfg.peft.method)
    base = load_classifier(cfg.model.name, num_labels, seed=cfg.seed)
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # adapter initialisation
    module = method.apply(base, cfg)
    dev = resolve_device(device or cfg.device)
    module.to(dev)
    params: dict[str, nn.Parameter] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            key = canonical_name(name)
            if key in params:
                raise ExchangeError(f"two trainable parameters share the exchanged name {key!r}")
            params[key] = p
    model = FedModel(module, load_tokenizer(cfg.model.name), method.name, dev, dict(sorted(params.items())))
    model.initial_state = model.exchange_state()
    return model


@functools.lru_cache(maxsize=2)
def _cached(cfg_key: RunConfig, num_labels: int, device: str) -> FedModel:
    return build_model(cfg_key, num_labels, device)


def get_model(cfg: RunConfig, num_labels: int) -> FedModel:
    """The per-process model for ``cfg`` (built on first use, then reused)."""
    # Only the fields that shape the model are part of the cache key.
    key = RunConfig(seed=cfg.seed, model=cfg.model, peft=cfg.peft, lora=cfg.lora)
    return _cached(key, num_labels, str(resolve_device(cfg.device)))


def model_cache_info() -> functools._CacheInfo:
    """How often :func:`get_model` built a model vs reused one (for benchmarks and tests)."""
    return _cached.cache_info()
