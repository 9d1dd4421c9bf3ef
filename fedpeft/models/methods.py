"""Registry of parameter-efficient fine-tuning methods, keyed by name.

Each method takes a freshly loaded backbone + head and returns the module to train, with
``requires_grad`` set on exactly the tensors that the method trains and that travel
between server and clients.  Modelled on HF peft's tuner registry: one entry per method,
one config dataclass per method in :mod:`fedpeft.config`.

* ``lora``  -- LoRA (Hu et al., 2021) through HF peft's ``LoraConfig`` + the head.
* ``full``  -- every parameter trains and travels: the baseline of FedPEFT (Sun et al.,
  2022) that byte ratios are measured against.
* ``prompt`` -- prompt tuning (Lester et al., 2021): soft prompt tokens prepended to the
  input embeddings, through HF peft's ``PromptTuningConfig``.
* ``prefix`` -- prefix tuning (Li & Liang, 2021): trained keys and values prepended in every
  attention layer, through HF peft's ``PrefixTuningConfig``.
* ``ia3``   -- (IA)^3 (Liu et al., 2022): learned rescaling vectors of keys, values and
  feed-forward activations, through HF peft's ``IA3Config``; brings its own per-sample
  gradients for DP-SGD (:mod:`fedpeft.models.grad_sample`).
* ``adapter`` -- bottleneck adapters (Houlsby et al., 2019), FedPEFT's "adapter"; written
  by hand (:mod:`fedpeft.models.adapters`) since peft has none.
* ``bitfit`` -- BitFit (Ben Zaken et al., 2022): every bias of the backbone.
* ``head``  -- the classification head alone (linear probing).
* ``vpt``   -- visual prompt tuning (Jia et al., 2022), FedPEFT's "prompt" for vision
  transformers; written by hand (:mod:`fedpeft.models.vpt`) since peft has none.

Each method names the modalities it applies to (``text``, ``image``): peft's prompt,
prefix and (IA)^3 tuners act on token sequences (``input_ids``), VPT on a patch sequence;
LoRA, adapters, BitFit, the head and full fine-tuning apply to both.  A method asked for
on a model it does not fit is refused by name, with the methods that do.

Every method trains (and exchanges) the classification head of a sequence classifier
too, under the names ``classifier.weight`` / ``classifier.bias`` (``score.*`` for
decoder classifiers).  A causal LM (``task.name = "causal-lm"``) has no head of its own to
train: its output layer is tied to the token embeddings, so only the method's tensors
train and travel, and ``head`` (nothing to train) and ``bitfit`` on a bias-free decoder
such as Llama (nothing to train either) are refused with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForSequenceClassification,
    PeftType,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from torch import nn
from transformers import PreTrainedModel

from fedpeft.models import settings as sections
from fedpeft.models.adapters import add_adapters
from fedpeft.models.grad_sample import GradSampleHooks, ia3_grad_sample_hooks
from fedpeft.models.vision import MODALITIES, is_image_model
from fedpeft.models.vpt import add_visual_prompts
from fedpeft.settings import ConfigError, Section, unknown_choice

if TYPE_CHECKING:
    from fedpeft.config import RunConfig

ApplyFn = Callable[[PreTrainedModel, "RunConfig"], nn.Module]


@dataclass(frozen=True)
class PeftMethod:
    """One registered method: how to wrap a backbone, and a one-line description."""

    name: str
    apply: ApplyFn
    description: str
    # Whether ``save_pretrained`` writes a peft adapter (else a whole HF model).
    is_peft_adapter: bool
    # Per-sample gradients the method computes itself under DP-SGD (see
    # :mod:`fedpeft.models.grad_sample`); None where Opacus' own hooks reach every tensor.
    grad_sample_hooks: GradSampleHooks | None = None
    # The kinds of model it applies to (``fedpeft.models.vision.MODALITIES`` values).
    modalities: frozenset[str] = frozenset({"text", "image"})
    # Its own run-config section (``<section>.<key>``), declared next to its code.
    settings: type[Section] | None = None
    # Trained tokens put in front of the input, shared by every example of a row (prompt,
    # prefix): such a method cannot train on packed rows (lm.packing).
    row_tokens: bool = False


METHODS: dict[str, PeftMethod] = {}


def register_method(
    name: str,
    description: str,
    *,
    is_peft_adapter: bool,
    grad_sample_hooks: GradSampleHooks | None = None,
    modalities: tuple[str, ...] = ("text", "image"),
    settings: type[Section] | None = None,
    row_tokens: bool = False,
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator: add ``apply`` to the registry under ``name``."""

    def wrap(fn: ApplyFn) -> ApplyFn:
        if name in METHODS:
            raise ValueError(f"PEFT method {name!r} is already registered")
        METHODS[name] = PeftMethod(
            name,
            fn,
            description,
            is_peft_adapter,
            grad_sample_hooks,
            frozenset(modalities),
            settings,
            row_tokens,
        )
        return fn

    return wrap


def methods_for(modality: str) -> list[str]:
    """The registered methods that apply to models of ``modality`` ("text", "image")."""
    return sorted(name for name, m in METHODS.items() if modality in m.modalities)


def check_modality(method: PeftMethod, kind: str) -> None:
    """Refuse ``method`` on a model of ``kind`` it does not apply to, naming those that do."""
    modality = MODALITIES[kind]
    if modality not in method.modalities:
        raise ConfigError(
            f"config key 'peft.method': {method.name!r} applies to {' and '.join(sorted(method.modalities))} "
            f"models, not to this {kind} model (valid for {modality}: {', '.join(methods_for(modality))})"
        )


def get_method(name: str) -> PeftMethod:
    """The registered method ``name``; an unknown name names the key and the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise unknown_choice("peft.method", name, METHODS) from None


# ``base_model.model.`` for tuners that inject layers (LoRA, IA3), ``base_model.`` for
# prompt learning (prompt, prefix), where ``base_model`` is the transformers model itself.
_PEFT_WRAPPER = re.compile(r"^base_model\.(?:model\.)?")
_ADAPTER_SEGMENTS = re.compile(r"\.(modules_to_save\.default|default)(?=\.|$)")


def canonical_name(param_name: str) -> str:
    """The exchanged name of a parameter: peft's wrapper and adapter segments removed.

    ``base_model.model.bert...query.lora_A.default.weight`` becomes
    ``bert...query.lora_A.weight``, the trained copy of the head
    (``classifier.modules_to_save.default.weight``, under ``base_model.`` or
    ``base_model.model.``) becomes ``classifier.weight``,
    ``prompt_encoder.default.embedding.weight`` becomes ``prompt_encoder.embedding.weight``
    and an (IA)^3 vector ``...key.ia3_l.default`` becomes ``...key.ia3_l`` -- independent of
    the adapter's name.
    """
    return _ADAPTER_SEGMENTS.sub("", _PEFT_WRAPPER.sub("", param_name))


def task_type(model: nn.Module) -> TaskType:
    """peft's task type of ``model``: a causal LM, or a sequence classifier (whose head
    peft then keeps trainable as ``modules_to_save``)."""
    can_generate = getattr(model, "can_generate", None)
    return TaskType.CAUSAL_LM if callable(can_generate) and can_generate() else TaskType.SEQ_CLS


def peft_task(model: nn.Module) -> dict[str, Any]:
    """The task arguments of a peft config for ``model``.

    peft's task models pass ``input_ids`` to the base model, which an image model does not
    take: an image classifier gets peft's generic model (no task type, as in peft's image
    classification guide), its head kept trainable through ``modules_to_save``.
    """
    if is_image_model(model):
        head = _head_prefix(model)
        return {"task_type": None, "modules_to_save": [head.rstrip(".")] if head else None}
    return {"task_type": task_type(model)}


#: LoRA's "auto" targets where peft has no default for the architecture: the query and
#: value projections of ViT, DeiT and DINOv2 (as peft's default for BERT), transformers 5 names.
_VISION_LORA_TARGETS = ["q_proj", "v_proj"]


def lora_targets(spec: tuple[str, ...], model: nn.Module | None = None) -> list[str] | str | None:
    """``lora.target-modules`` as peft takes it: "auto" is None (peft's default for the
    architecture; query and value for a vision transformer), "all-linear" is peft's own
    keyword, else the module names."""
    if spec == ("auto",):
        return list(_VISION_LORA_TARGETS) if model is not None and is_image_model(model) else None
    if spec == ("all-linear",):
        return "all-linear"
    return list(spec)


@register_method(
    "lora",
    "LoRA adapters (HF peft) on the target modules + the head",
    is_peft_adapter=True,
    settings=sections.LoraConfig,
)
def _lora(model: PreTrainedModel, cfg: RunConfig) -> nn.Module:
    """LoRA, Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models"."""
    settings = sections.LoraConfig.of(cfg)
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; a float scale works
        lora_dropout=settings.dropout,
        target_modules=lora_targets(settings.target_modules, model),
        **peft_task(model),
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
    for name, p in model.named_parameters():
        # A ViT's mask token enters only masked-image-modelling pre-training, never a
        # classifier's forward pass: it would travel every round without ever changing
        # (and DP-SGD's ghost clipping refuses a parameter that gets no gradient).
        p.requires_grad_(not (is_image_model(model) and name.endswith("embeddings.mask_token")))
    return model


class PerRowPrompt(PeftModel):
    """A peft prompt-learning model whose soft prompt is looked up once per example.

    peft embeds the prompt tokens for one row and repeats the result over the batch, so
    Opacus sees a batch of 1 for the prompt table (one "per-sample" gradient for the whole
    batch: with the head frozen, the batch would be clipped as one example).  Looking the
    prompt up with (batch, tokens) ids, contiguous, gives every example its own row; the
    forward values are the same.
    """

    def get_prompt(
        self, batch_size: int, task_ids: torch.Tensor | None = None, max_cache_len: int | None = None
    ) -> torch.Tensor:
        if self.active_peft_config.peft_type != PeftType.PROMPT_TUNING:
            return super().get_prompt(batch_size, task_ids, max_cache_len)
        encoder: Any = self.prompt_encoder[self.active_adapter]
        tokens = self.prompt_tokens[self.active_adapter].to(encoder.embedding.weight.device)
        return encoder(tokens.unsqueeze(0).expand(batch_size, -1).contiguous())


class PerRowPromptModel(PerRowPrompt, PeftModelForSequenceClassification):
    """peft's sequence classifier with a per-example prompt lookup."""


class PerRowPromptCausalLM(PerRowPrompt, PeftModelForCausalLM):
    """peft's causal LM with a per-example prompt lookup."""


_PER_ROW: dict[type, type] = {
    PeftModelForSequenceClassification: PerRowPromptModel,
    PeftModelForCausalLM: PerRowPromptCausalLM,
}


@register_method(
    "prompt",
    "prompt tuning (HF peft): soft prompt tokens + the head",
    is_peft_adapter=True,
    modalities=("text",),
    settings=sections.PromptConfig,
    row_tokens=True,
)
def _prompt(model: PreTrainedModel, cfg: RunConfig) -> nn.Module:
    """Prompt tuning, Lester et al. (2021), "The Power of Scale for Parameter-Efficient Prompt Tuning".

    ``prompt.num-virtual-tokens`` trained embeddings are prepended to every input (peft's
    random initialisation, seeded by ``build_model``); the backbone stays frozen.
    """
    config = PromptTuningConfig(task_type=task_type(model), num_virtual_tokens=cfg.prompt.num_virtual_tokens)
    wrapped = get_peft_model(model, config)
    per_row = _PER_ROW.get(type(wrapped))
    if per_row is None:  # pragma: no cover - peft's classes for these two task types
        raise TypeError(f"peft returned {type(wrapped).__name__} for a prompt")
    wrapped.__class__ = per_row  # adds behaviour only, no state
    return wrapped


@register_method(
    "prefix",
    "prefix tuning (HF peft): trained keys/values in every layer + the head",
    is_peft_adapter=True,
    modalities=("text",),
    settings=sections.PrefixConfig,
    row_tokens=True,
)
def _prefix(model: PreTrainedModel, cfg: RunConfig) -> nn.Module:
    """Prefix tuning, Li & Liang (2021), "Prefix-Tuning: Optimizing Continuous Prompts for Generation".

    ``prefix.num-virtual-tokens`` trained key/value pairs per attention layer;
    ``prefix.projection`` reparameterises them through peft's two-layer MLP (which then
    trains and travels too).
    """
    config = PrefixTuningConfig(
        task_type=task_type(model),
        num_virtual_tokens=cfg.prefix.num_virtual_tokens,
        prefix_projection=cfg.prefix.projection,
    )
    return get_peft_model(model, config)


@register_method(
    "ia3",
    "(IA)^3 (HF peft): rescaling vectors of keys, values, FFN + the head",
    is_peft_adapter=True,
    grad_sample_hooks=ia3_grad_sample_hooks,  # peft's vectors sit where Opacus cannot hook them
    settings=sections.IA3Config,
    modalities=("text",),
)
def _ia3(model: PreTrainedModel, cfg: RunConfig) -> nn.Module:
    """(IA)^3, Liu et al. (2022), "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
    than In-Context Learning".

    Learned vectors rescale the outputs of ``ia3.target-modules`` (the inputs of those also
    in ``ia3.feedforward-modules``); an empty list means peft's defaults for the model type
    (for BERT: key, value, output.dense; output.dense as feed-forward).  The vectors start
    at one, so the model starts as the pretrained one.
    """
    target = list(cfg.ia3.target_modules) or None
    feedforward = list(cfg.ia3.feedforward_modules) or None
    if target and feedforward and not set(feedforward) <= set(target):
        raise ConfigError(
            f"config key 'ia3.feedforward-modules' ({','.join(feedforward)}) must be a subset of "
            f"'ia3.target-modules' ({','.join(target)})"
        )
    config = IA3Config(task_type=task_type(model), target_modules=target, feedforward_modules=feedforward)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        if target is None:
            raise ConfigError(
                f"peft.method 'ia3': peft has no default target modules for this model ({err}); "
                "set 'ia3.target-modules' and 'ia3.feedforward-modules'"
            ) from err
        raise unknown_choice("ia3.target-modules", ",".join(target), _leaf_module_names(model)) from err


@register_method(
    "adapter",
    "bottleneck adapters (Houlsby) after attention/FFN outputs + the head",
    is_peft_adapter=False,
    settings=sections.AdapterConfig,
)
def _adapter(model: PreTrainedModel, cfg: RunConfig) -> nn.Module:
    """Bottleneck adapters, Houlsby et al. (2019), "Parameter-Efficient Transfer Learning for
    NLP" -- the "adapter" of FedPEFT (Sun et al., 2022).  See :mod:`fedpeft.models.adapters`.
    """
    add_adapters(model, cfg.adapter.bottleneck, cfg.adapter.placement, cfg.adapter.activation)
    return _train_only(model, lambda name: ".adapter." in name)


@register_method("bitfit", "BitFit: every bias of the backbone + the head", is_peft_adapter=False)
def _bitfit(model: PreTrainedModel, cfg: RunConfig) -> nn.Module:
    """BitFit, Ben Zaken et al. (2022), "BitFit: Simple Parameter-efficient Fine-tuning for
    Transformer-based Masked Language-models": only the bias terms train.
    """
    head = _head_prefix(model)
    if not any(
        n.endswith(".bias") and not (head and n.startswith(head)) for n, _ in model.named_parameters()
    ):
        raise ConfigError(
            f"peft.method 'bitfit' trains the backbone's bias terms, and {type(model).__name__} has none "
            "(Llama-style decoders are bias-free); choose lora, ia3, prompt, prefix or adapter"
        )
    return _train_only(model, lambda name: name.endswith(".bias"))


@register_method("head", "the classification head only (linear probing)", is_peft_adapter=False)
def _head(model: PreTrainedModel, cfg: RunConfig) -> nn.Module:
    """Linear probing: the frozen backbone's features, only the classification head trains."""
    if _head_prefix(model) is None:
        raise ConfigError(
            f"peft.method 'head' trains a classification head, and the causal LM {type(model).__name__} "
            "has none (its output layer is the tied token embedding); choose lora, ia3, prompt, prefix or adapter"
        )
    return _train_only(model, lambda name: False)


@register_method(
    "vpt",
    "visual prompt tuning: learnable tokens after the class token, first or every layer + the head",
    is_peft_adapter=False,
    modalities=("image",),
    settings=sections.VptConfig,
)
def _vpt(model: PreTrainedModel, cfg: RunConfig) -> nn.Module:
    """Visual prompt tuning, Jia et al. (2022), "Visual Prompt Tuning" -- shallow or deep
    (``vpt.depth``), ``vpt.num-tokens`` per set.  See :mod:`fedpeft.models.vpt`."""
    add_visual_prompts(model, cfg.vpt.num_tokens, cfg.vpt.depth)
    return _train_only(model, lambda name: ".vpt." in f".{name}")


# The classification head of transformers' sequence classifiers (the names peft's SEQ_CLS
# task keeps trainable as ``modules_to_save``).
_HEADS = ("classifier", "score")


def _head_prefix(model: nn.Module) -> str | None:
    """``"classifier."`` / ``"score."``: the prefix of the task head's parameters; None for a
    causal LM, whose output layer is the (tied) token embedding, not a task head."""
    if task_type(model) == TaskType.CAUSAL_LM:
        return None
    head = next((h for h in _HEADS if isinstance(getattr(model, h, None), nn.Module)), None)
    if head is None:
        raise ConfigError(
            f"model {type(model).__name__} has no classification head named {' or '.join(_HEADS)}"
        )
    return head + "."


def _train_only(model: nn.Module, trains: Callable[[str], bool]) -> nn.Module:
    """``requires_grad`` on the parameters ``trains`` names and on the task head, off elsewhere."""
    head = _head_prefix(model)
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name) or (head is not None and name.startswith(head)))
    return model


def _leaf_module_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if not list(mod.children())}
