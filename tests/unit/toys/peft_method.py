"""A PEFT method with settings of its own: LayerNorm tuning.

Only the LayerNorm gains and biases of the backbone train (and the head), as in "Tuning
LayerNorm in Attention" (Zhao et al., ICLR 2024).  Its section ``toy-norms.*`` is declared
here; the registry line is ``register_method("toy-norms", ..., settings=NormsConfig)(apply)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fedpeft.config import RunConfig
from fedpeft.settings import ConfigError, Section, choices


@dataclass(frozen=True)
class NormsConfig(Section, section="toy-norms"):
    """Which LayerNorms train: every layer's, or the last layer's only."""

    layers: str = field(default="all", metadata=choices("all", "last"))


def apply(model: nn.Module, cfg: RunConfig) -> nn.Module:
    settings = NormsConfig.of(cfg)  # typed: this method's own section
    norms = [name for name, _ in model.named_parameters() if "LayerNorm" in name]
    if not norms:
        raise ConfigError(f"peft.method 'toy-norms': {type(model).__name__} has no LayerNorm")
    last = max(int(part) for name in norms for part in name.split(".") if part.isdigit())
    for name, p in model.named_parameters():
        layer = [int(part) for part in name.split(".") if part.isdigit()]
        norm = "LayerNorm" in name and (settings.layers == "all" or layer == [last])
        p.requires_grad_(norm or name.startswith("classifier."))
    return model
