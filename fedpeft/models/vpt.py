"""Visual prompt tuning (Jia et al., 2022, "Visual Prompt Tuning"), FedPEFT's "prompt" for ViTs.

``vpt.num-tokens`` learnable tokens are inserted after the class token, before the patch
tokens:

* ``shallow`` -- one set, at the input of the first transformer block; the blocks carry
  them along like any other token;
* ``deep`` -- every block gets its own set: block ``i`` replaces the prompt tokens that
  block ``i-1`` produced with its own before attending.

The prompt tokens are dropped again right after the final layer norm, so the head reads
exactly what it reads without prompts (DINOv2's mean over patch tokens excludes them).
Prompts carry no position embedding, as in the paper; they start from the paper's
Xavier-uniform range ``sqrt(6 / (3 * patch^2 + width))``.

Written here because no well-kept library has it: HF peft's prompt learning prepends
*token embeddings* to ``input_ids`` and cannot reach a vision model's patch sequence, and
the VPT authors' code is a research repository built on their own ViT, not on
``transformers``.  It works on any ViT-style model of ``transformers`` (ViT, DeiT,
DINOv2; :func:`fedpeft.models.vision.vision_parts`).

Each block keeps its prompt table as an ``nn.Embedding`` (``<block>.vpt.weight``) looked up
with one row of ids per example: Opacus' embedding hooks then see a per-example lookup
and compute per-sample gradients for DP-SGD, as for :class:`~fedpeft.models.methods.PerRowPrompt`.
Blocks and the final norm get a subclass of their own class (forward before / after the
original), not forward hooks: parameters, state dict and hooks stay as DP-SGD expects.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedpeft.models.vision import vision_parts

DEPTHS = ("shallow", "deep")


class _PromptedBlock(nn.Module):
    """Mixin for a transformer block: insert (first block) or replace (deep) the prompts."""

    vpt: nn.Embedding
    vpt_insert: bool

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch, tokens = hidden_states.shape[0], self.vpt.num_embeddings
        ids = torch.arange(tokens, device=hidden_states.device).unsqueeze(0).expand(batch, -1).contiguous()
        prompts = self.vpt(ids).to(hidden_states.dtype)
        rest = hidden_states[:, 1:] if self.vpt_insert else hidden_states[:, 1 + tokens :]
        hidden_states = torch.cat([hidden_states[:, :1], prompts, rest], dim=1)
        return super().forward(hidden_states, *args, **kwargs)


class _StripPrompts(nn.Module):
    """Mixin for the final norm: drop the prompt tokens from its output."""

    vpt_tokens: int

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(hidden_states, *args, **kwargs)
        return torch.cat([out[:, :1], out[:, 1 + self.vpt_tokens :]], dim=1)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type[nn.Module], cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with ``mixin``'s forward wrapped around its own (one class per pair)."""
    if (mixin, cls) not in _SUBCLASSES:
        _SUBCLASSES[mixin, cls] = type(f"{mixin.__name__.strip('_')}{cls.__name__}", (mixin, cls), {})
    return _SUBCLASSES[mixin, cls]


def add_visual_prompts(model: nn.Module, num_tokens: int, depth: str) -> list[str]:
    """Give ``model``'s blocks their prompt tables (``depth`` = shallow: the first only);
    returns the names of the new parameters.  ``requires_grad`` is left on for them;
    freezing the rest is the caller's business."""
    if depth not in DEPTHS:
        raise ValueError(f"unknown VPT depth {depth!r} (valid: {', '.join(DEPTHS)})")
    parts = vision_parts(model)
    bound = math.sqrt(6.0 / (3 * parts.patch_size**2 + parts.width))
    blocks = list(parts.layers) if depth == "deep" else [parts.layers[0]]
    device = next(parts.embeddings.parameters()).device
    for i, block in enumerate(blocks):
        table = nn.Embedding(num_tokens, parts.width, device=device)  # float32 whatever the backbone
        nn.init.uniform_(table.weight, -bound, bound)
        block.__class__ = _subclass(_PromptedBlock, type(block))
        block.vpt = table
        setattr(block, "vpt_insert", i == 0)  # noqa: B010  (a plain attribute of the block)
    norm = parts.final_norm
    norm.__class__ = _subclass(_StripPrompts, type(norm))
    setattr(norm, "vpt_tokens", num_tokens)  # noqa: B010
    return [n for n, _ in model.named_parameters() if ".vpt." in f".{n}"]
