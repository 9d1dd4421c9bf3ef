"""Models: a frozen pretrained backbone + a PEFT method + a head, cached per process.

:func:`get_model` is what the apps call.  It builds the model once per worker process
(loading the backbone is the expensive part) and afterwards only hands the same object
back: switching a worker from one client to the next swaps the exchanged tensors in
place (:meth:`FedModel.load_exchange_state`), never reloads weights.


The model code is in :mod:`fedpeft.models.fedmodel`; the settings of the backbone and of
each PEFT method in :mod:`fedpeft.models.settings`.  Names load on first use
(:mod:`fedpeft.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.lazy import lazy_exports

if TYPE_CHECKING:
    from fedpeft.models.backbone import (
        MODEL_KINDS as MODEL_KINDS,
    )
    from fedpeft.models.backbone import (
        backbone_dtype as backbone_dtype,
    )
    from fedpeft.models.backbone import (
        load_pretrained as load_pretrained,
    )
    from fedpeft.models.backbone import (
        load_processor as load_processor,
    )
    from fedpeft.models.backbone import (
        quiet_libraries as quiet_libraries,
    )
    from fedpeft.models.backbone import (
        resolve_model_path as resolve_model_path,
    )
    from fedpeft.models.fedmodel import (
        EXCHANGED_FILE as EXCHANGED_FILE,
    )
    from fedpeft.models.fedmodel import (
        ExchangeError as ExchangeError,
    )
    from fedpeft.models.fedmodel import (
        FedModel as FedModel,
    )
    from fedpeft.models.fedmodel import (
        build_model as build_model,
    )
    from fedpeft.models.fedmodel import (
        get_model as get_model,
    )
    from fedpeft.models.fedmodel import (
        load_saved as load_saved,
    )
    from fedpeft.models.fedmodel import (
        model_cache_info as model_cache_info,
    )
    from fedpeft.models.fedmodel import (
        model_key as model_key,
    )
    from fedpeft.models.lora_layout import (
        LoraLayout as LoraLayout,
    )
    from fedpeft.models.methods import (
        METHODS as METHODS,
    )
    from fedpeft.models.methods import (
        canonical_name as canonical_name,
    )
    from fedpeft.models.methods import (
        check_modality as check_modality,
    )
    from fedpeft.models.methods import (
        get_method as get_method,
    )
    from fedpeft.models.methods import (
        methods_for as methods_for,
    )
    from fedpeft.models.methods import (
        register_method as register_method,
    )
    from fedpeft.models.vision import (
        interpolate_always as interpolate_always,
    )

_WHERE = {
    "MODEL_KINDS": ".backbone",
    "backbone_dtype": ".backbone",
    "load_pretrained": ".backbone",
    "load_processor": ".backbone",
    "quiet_libraries": ".backbone",
    "resolve_model_path": ".backbone",
    "LoraLayout": ".lora_layout",
    "METHODS": ".methods",
    "canonical_name": ".methods",
    "check_modality": ".methods",
    "get_method": ".methods",
    "methods_for": ".methods",
    "register_method": ".methods",
    "interpolate_always": ".vision",
    "EXCHANGED_FILE": ".fedmodel",
    "ExchangeError": ".fedmodel",
    "FedModel": ".fedmodel",
    "build_model": ".fedmodel",
    "model_key": ".fedmodel",
    "get_model": ".fedmodel",
    "model_cache_info": ".fedmodel",
    "load_saved": ".fedmodel",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
