"""Bottleneck adapters (Houlsby et al., 2019), the "adapter" that FedPEFT (Sun et al., 2022) compares.

HF peft has no Houlsby adapter, so it is written here: after a projection of each
transformer layer, ``h -> h + up(act(down(h)))`` with a ``bottleneck``-wide ``down``.
``up`` starts at zero, so the adapted model computes exactly what the pretrained one
does until it trains.  ``down`` and ``up`` are plain ``nn.Linear`` layers, which Opacus'
per-sample-gradient hooks handle as they are.

Where: after the attention output projection and/or after the feed-forward output
projection, before the dropout, residual connection and normalisation that follow --
Houlsby's placement.  The projections are found by name, per family (:data:`SITES`):
BERT-style encoders (BERT, RoBERTa, MiniLM: ``attention.output.dense`` / ``output.dense``),
vision transformers (ViT, DeiT, DINOv2: ``attention.o_proj`` / ``mlp.fc2``, before DINOv2's
layer scale) and Llama-style decoders (Llama, SmolLM2, Mistral, Qwen, Gemma: ``self_attn.o_proj`` /
``mlp.down_proj``).
"""

from __future__ import annotations

import torch
from torch import nn

from fedpeft.settings import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}
PLACEMENTS = ("both", "attention", "ffn")


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))``: a residual bottleneck MLP, the identity at initialisation."""

    def __init__(self, width: int, bottleneck: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Computed in the adapter's own dtype (float32), added back in the backbone's.
        x = h.to(self.down.weight.dtype)
        return h + self.up(self.act(self.down(x))).to(h.dtype)


class AdaptedLinear(nn.Linear):
    """A frozen projection followed by its adapter.

    It shares the original layer's ``weight`` and ``bias`` (same names in the state dict,
    so the backbone's keys do not change); the adapter sits under ``.adapter``.
    """

    def __init__(self, base: nn.Linear, adapter: BottleneckAdapter) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(super().forward(x))


#: (attention output projection, feed-forward output projection) name suffixes, per family.
SITES: tuple[tuple[str, str], ...] = (
    (".attention.output.dense", ".output.dense"),  # BERT-style encoders
    (".attention.o_proj", ".mlp.fc2"),  # ViT, DeiT, DINOv2 (transformers 5 names)
    (".attention.o_proj", ".mlp.weights_out"),  # DINOv2 giant (SwiGLU blocks)
    (".self_attn.o_proj", ".mlp.down_proj"),  # Llama-style decoders
)


def _sites(model: nn.Module, placement: str) -> list[str]:
    """Names of the projections that get an adapter, in module order."""
    sites = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, AdaptedLinear):
            continue
        attention = any(name.endswith(att) for att, _ in SITES)
        ffn = not attention and any(name.endswith(out) for _, out in SITES)
        if (attention and placement in ("both", "attention")) or (ffn and placement in ("both", "ffn")):
            sites.append(name)
    return sites


def add_adapters(model: nn.Module, bottleneck: int, placement: str, activation: str) -> list[str]:
    """Insert a :class:`BottleneckAdapter` after each selected projection; returns their names.

    Only the new adapters are created here (``requires_grad`` left on); freezing the rest
    is the caller's business.
    """
    if placement not in PLACEMENTS:
        raise ConfigError(
            f"config key 'adapter.placement': unknown value {placement!r} (valid: both, attention, ffn)"
        )
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"config key 'adapter.activation': unknown value {activation!r} (valid: {', '.join(ACTIVATIONS)})"
        )
    sites = _sites(model, placement)
    if not sites:
        raise ConfigError(
            "peft.method 'adapter' needs BERT-style ('attention.output.dense' / 'output.dense'), ViT-style "
            "('attention.o_proj' / 'mlp.fc2') or Llama-style ('self_attn.o_proj' / 'mlp.down_proj') "
            "projections; this model has none for "
            f"placement {placement!r}"
        )
    for name in sites:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        # float32 whatever the backbone's dtype: its forward casts in and out.
        adapter = BottleneckAdapter(base.out_features, bottleneck, activation).to(base.weight.device)
        setattr(parent, attr, AdaptedLinear(base, adapter))
    return sites
