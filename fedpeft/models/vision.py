"""What PEFT methods need to know about a vision transformer, whatever its family.

``transformers``' ViT, DeiT and DINOv2 image classifiers share one shape: a backbone under
``model.<base_model_prefix>`` with ``embeddings`` (patch embeddings + class token +
position embeddings), the transformer blocks (``layers``; DINOv2: ``encoder.layer``), each
called with the hidden states first, and a final ``layernorm``, and a ``classifier`` head
reading the class token (DINOv2 also the mean patch token).  Their attention projections
are ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` and their feed-forward output
``mlp.fc2`` (transformers 5; checkpoints with the older BERT-style names are renamed on load).  :func:`vision_parts` finds those parts,
so visual prompts (:mod:`fedpeft.models.vpt`) and the adapters work on any of them.

Image size: DINOv2 always interpolates its position embeddings to the input's patch grid;
ViT and DeiT do so only when asked (``interpolate_pos_encoding=True``) and otherwise
refuse any size but the pretrained one.  :func:`interpolate_always` makes them always ask,
so ``model.image-size`` works the same for every family.  It swaps the class of the
embeddings module for a subclass (as :class:`~fedpeft.models.methods.PerRowPrompt` does
for peft's models) rather than registering a forward hook: the module's parameters, state
dict and hooks stay exactly as they were, which DP-SGD's hook bookkeeping relies on.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedpeft.settings import ConfigError

#: The modality of each model kind (``fedpeft.models.MODEL_KINDS``): which PEFT methods apply.
MODALITIES = {"sequence-classification": "text", "causal-lm": "text", "image-classification": "image"}


def is_image_model(model: nn.Module) -> bool:
    """Whether ``model`` takes images: transformers' vision models read ``pixel_values``."""
    return getattr(model, "main_input_name", None) == "pixel_values"


@dataclass(frozen=True)
class VisionParts:
    """The parts of a vision transformer that PEFT methods reach into."""

    backbone: nn.Module
    embeddings: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    width: int
    patch_size: int


def vision_parts(model: nn.Module) -> VisionParts:
    """The backbone, embeddings, transformer blocks and final norm of a ViT-style image model."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    backbone = backbone if isinstance(backbone, nn.Module) else model
    embeddings = getattr(backbone, "embeddings", None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None) or getattr(backbone, "layers", None)
    norm = getattr(backbone, "layernorm", None)
    if not (
        isinstance(embeddings, nn.Module)
        and isinstance(layers, nn.ModuleList)
        and isinstance(norm, nn.Module)
    ):
        raise ConfigError(
            f"{type(model).__name__} is not a ViT-style image model (embeddings, layers, layernorm); "
            "vision methods support ViT, DeiT and DINOv2"
        )
    config: Any = getattr(model, "config", None)
    return VisionParts(
        backbone, embeddings, layers, norm, int(config.hidden_size), int(getattr(config, "patch_size", 16))
    )


class _AlwaysInterpolate(nn.Module):
    """Mixin: the embeddings' forward always interpolates the position embeddings."""

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        kwargs["interpolate_pos_encoding"] = True
        return super().forward(pixel_values, *args, **kwargs)


_INTERPOLATING: dict[type, type] = {}


def _interpolating(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in _INTERPOLATING:
        _INTERPOLATING[cls] = type(f"Interpolating{cls.__name__}", (_AlwaysInterpolate, cls), {})
    return _INTERPOLATING[cls]


def interpolate_always(model: nn.Module) -> None:
    """Make a ViT / DeiT accept any image size (DINOv2 already does: left as it is)."""
    embeddings = vision_parts(model).embeddings
    if isinstance(embeddings, _AlwaysInterpolate):
        return
    if "interpolate_pos_encoding" in inspect.signature(embeddings.forward).parameters:
        embeddings.__class__ = _interpolating(type(embeddings))
