"""FedAvg's constructor settings, for the strategies that are FedAvg plus another aggregation.

:class:`~strategies.flexlora.FlexLoRA`, :class:`~strategies.flora.FLoRA` and
:class:`~strategies.functional.FunctionalStrategy` take FedAvg's keyword settings as
they are and hand them on: ``**fedavg_kwargs: Unpack[FedAvgKwargs]``, typed here once,
with FedAvg's own defaults.  :func:`forwards_fedavg_kwargs` gives such a constructor the
signature it accepts -- FedAvg's names and defaults in place of ``**fedavg_kwargs`` -- so
``inspect.signature``, ``help()`` and :func:`strategies.registry.build_strategy` (which
routes the run's settings and checks ``strategy.kwargs`` by name) see every name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypedDict, TypeVar

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]
InitT = TypeVar("InitT", bound=Callable[..., None])


class FedAvgKwargs(TypedDict, total=False):
    """The keyword settings of ``FedAvg.__init__`` (each optional: FedAvg's default applies)."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    weighted_by_key: str
    arrayrecord_key: str
    configrecord_key: str
    train_metrics_aggr_fn: MetricsAggrFn | None
    evaluate_metrics_aggr_fn: MetricsAggrFn | None


def fedavg_parameters() -> list[inspect.Parameter]:
    """``FedAvg.__init__``'s settings as keyword-only parameters, with FedAvg's defaults."""
    params = list(inspect.signature(FedAvg.__init__).parameters.values())[1:]  # without self
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]


def forwards_fedavg_kwargs(init: InitT) -> InitT:
    """Decorator for an ``__init__`` ending in ``**fedavg_kwargs``: its signature lists FedAvg's
    settings by name instead (after its positional parameters, before its own keyword-only ones)."""
    *own, var = inspect.signature(init).parameters.values()
    if var.kind is not inspect.Parameter.VAR_KEYWORD:
        raise TypeError(f"{init.__qualname__} must end in **fedavg_kwargs")
    keyword_only = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
    positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    signature = inspect.Signature([*positional, *fedavg_parameters(), *keyword_only])
    init.__signature__ = signature  # type: ignore[attr-defined]
    return init
