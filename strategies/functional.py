'''Write a strategy as a function: the round's client updates and weights in, tensors out.

Two shapes are accepted, and ``strategy.name = "mymodule:name"`` wraps either in a
:class:`FunctionalStrategy` (Flower's FedAvg sampling and metric averaging around it):

(a) a pure aggregate function ``aggregate(updates, weights) -> tensors``; ``updates`` is
one ``name -> np.ndarray`` dict per replying client, in ascending node-id order (so the
order replies arrive in never matters), ``weights`` their ``num-examples``::

    # mystrategies.py
    import numpy as np
    from strategies.traits import StrategyTraits

    def median(updates, weights):
        """Coordinate-wise median of the clients' tensors (the weights are ignored)."""
        return {k: np.median(np.stack([u[k] for u in updates]), axis=0) for k in updates[0]}

    # What the conformance suite should expect (python -m strategies.conformance mystrategies:median).
    median.traits = StrategyTraits(conformance={"kind": "robust", "weighted": False})

(b) explicit state, FedJAX-style: an object, class or module with ``init(params) -> state``
and ``apply(state, params, updates, weights) -> (new_params, new_state)``; ``params`` is
the global model the round started from, and the state lives on the server only::

    class ServerMomentum:
        """FedAvg with server momentum (Hsu et al., 2019); the state is the momentum buffer."""

        traits = StrategyTraits(conformance={"kind": "server-optimizer"})

        def __init__(self, momentum: float = 0.9):
            self.momentum = momentum

        def init(self, params):
            return {k: np.zeros_like(v) for k, v in params.items()}

        def apply(self, state, params, updates, weights):
            total = sum(weights)
            new_params, new_state = {}, {}
            for k, p in params.items():
                mean = sum(w / total * u[k] for u, w in zip(updates, weights))
                new_state[k] = self.momentum * state[k] + (mean - p)
                new_params[k] = p + new_state[k]
            return new_params, new_state

Keyword parameters with defaults -- after ``(updates, weights)`` of a function, or of a
class's ``__init__`` -- are settable from the run config: ``strategy.name =
"mystrategies:ServerMomentum"`` with ``strategy.kwargs = "momentum=0.5"``.

How a callable is read: a function (or callable object) whose first two parameters are
required positional ones is an aggregate function; anything else callable is a factory
that must build a ``flwr.serverapp.strategy.Strategy``.

This module also holds the reply helper the LoRA strategies share (:func:`reply_updates`).
'''

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Unpack

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg

from strategies.arrays import Tensors, dict_to_record, record_to_dict
from strategies.fedavg_kwargs import FedAvgKwargs, forwards_fedavg_kwargs
from strategies.replies import check_and_log_replies
from strategies.traits import declared_traits

AggregateFn = Callable[[Sequence[Tensors], Sequence[float]], Mapping[str, np.ndarray]]


# ---------------------------------------------------------------------- reply helpers
def reply_updates(
    replies: Iterable[Message], weighted_by_key: str = "num-examples"
) -> tuple[list[int], list[Tensors], list[float]]:
    """``(node_ids, updates, weights)`` of content-carrying replies, in ascending node-id order.

    Each reply's single ArrayRecord becomes a tensor dict, its weight is the
    ``weighted_by_key`` entry of its single MetricRecord (as FedAvg reads them).
    """
    ordered = sorted(replies, key=lambda m: m.metadata.src_node_id)
    nodes, updates, weights = [], [], []
    for msg in ordered:
        arrays = next(iter(msg.content.array_records.values()))
        metrics = next(iter(msg.content.metric_records.values()))
        nodes.append(msg.metadata.src_node_id)
        updates.append(record_to_dict(arrays))
        weights.append(float(metrics[weighted_by_key]))  # type: ignore[arg-type]
    if weights and sum(weights) <= 0:
        raise AggregationError(
            f"the replies' '{weighted_by_key}' sum to {sum(weights)}; nothing to weight by"
        )
    return nodes, updates, weights


def checked_updates(
    replies: Iterable[Message], weighted_by_key: str = "num-examples"
) -> tuple[list[Message], list[Tensors], list[float]] | None:
    """Flower's checks on train replies (:func:`strategies.replies.check_and_log_replies`),
    then :func:`reply_updates` of the valid ones: ``(valid, updates, weights)``, or None
    when no reply can be aggregated."""
    valid, _ = check_and_log_replies(replies, is_train=True, weighted_by_key=weighted_by_key)
    if not valid:
        return None
    _, updates, weights = reply_updates(valid, weighted_by_key)
    return valid, updates, weights


# ---------------------------------------------------------------------- what a user gave
def is_init_apply(obj: object) -> bool:
    """Whether ``obj`` (object, class or module) has callable ``init`` and ``apply``."""
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "apply", None))


def is_aggregate_fn(obj: object) -> bool:
    """Whether ``obj`` is a non-class callable taking exactly two required positional arguments."""
    if isinstance(obj, type) or not callable(obj):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is p.empty]
    return len(required) == 2


class FunctionalStrategy(FedAvg):
    """FedAvg's sampling and metrics around a user's aggregate function or init/apply object.

    Parameters
    ----------
    impl : an aggregate function, or an object, class (instantiated without arguments)
        or module with ``init`` and ``apply`` (see the module docstring).
    The other parameters are FedAvg's.

    Attributes
    ----------
    state : the init/apply state (None for an aggregate function, or before round 1).
    params : the global tensors the current round started from (init/apply only).
    """

    @forwards_fedavg_kwargs
    def __init__(self, impl: Any, **fedavg_kwargs: Unpack[FedAvgKwargs]) -> None:
        super().__init__(**fedavg_kwargs)
        if isinstance(impl, type) and is_init_apply(impl):
            impl = impl()
        if is_init_apply(impl):
            self.aggregate_fn: AggregateFn | None = None
        elif callable(impl):
            self.aggregate_fn = impl
        else:
            raise TypeError(f"{impl!r} is neither an aggregate(updates, weights) function nor has init/apply")
        self.impl = impl
        self.name = getattr(impl, "__qualname__", None) or type(impl).__name__
        self.traits = declared_traits(impl)
        self.state: Any = None
        self.params: Tensors | None = None
        self._initialised = False

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; an init/apply strategy keeps ``arrays`` as the round's ``params``."""
        if self.aggregate_fn is None:
            self.params = record_to_dict(arrays)
            if not self._initialised:
                self.state = self.impl.init({k: v.copy() for k, v in self.params.items()})
                self._initialised = True
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Call the function on the replies in node-id order; metrics as FedAvg."""
        if (checked := checked_updates(replies, self.weighted_by_key)) is None:
            return None, None
        valid, updates, weights = checked
        if self.aggregate_fn is not None:
            out: Any = self.aggregate_fn(updates, weights)
        else:
            if self.params is None:
                raise AggregationError(
                    f"{self.name}: no global params yet; configure_train must run before aggregate_train"
                )
            result = self.impl.apply(self.state, self.params, updates, weights)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise AggregationError(f"{self.name}.apply must return (new_params, new_state)")
            out, self.state = result
        if not isinstance(out, Mapping) or not all(isinstance(k, str) for k in out):
            raise AggregationError(
                f"{self.name} returned {type(out).__name__}; expected a dict of name -> np.ndarray"
            )
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return dict_to_record(out), metrics


# ---------------------------------------------------------------------- registry glue
def _user_params(obj: Any, skip_positional: int) -> dict[str, inspect.Parameter]:
    """Keyword-settable parameters of ``obj`` after its first ``skip_positional`` ones."""
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in params[skip_positional:] if p.kind in kinds}


def functional_factory(obj: Any) -> Callable[..., FunctionalStrategy] | None:
    """A strategy factory wrapping ``obj``, or None if ``obj`` is no aggregate function / init-apply.

    The factory's signature lists FedAvg's settings plus ``obj``'s own keyword
    parameters (a function's after ``(updates, weights)``, a class's ``__init__``), so
    the registry can check ``strategy.kwargs`` against it.
    """
    if isinstance(obj, type) and is_init_apply(obj):
        own = _user_params(obj, 0)
    elif is_init_apply(obj):
        own = {}
    elif is_aggregate_fn(obj):
        own = _user_params(obj, 2)
    else:
        return None
    base = [p for name, p in inspect.signature(FunctionalStrategy).parameters.items() if name != "impl"]
    base_names = {p.name for p in base}
    own = {k: p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for k, p in own.items() if k not in base_names}
    traits = declared_traits(obj)

    def factory(**kwargs: Any) -> FunctionalStrategy:
        mine = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        if isinstance(obj, type):
            impl: Any = obj(**mine)
        elif mine:
            impl = functools.partial(obj, **mine)
        else:
            impl = obj
        strategy = FunctionalStrategy(impl, **kwargs)
        strategy.name = getattr(obj, "__qualname__", None) or type(obj).__name__
        strategy.traits = traits  # a partial of obj does not carry obj's attributes
        return strategy

    factory.__signature__ = inspect.Signature([*base, *own.values()])  # type: ignore[attr-defined]
    factory.__name__ = f"functional({getattr(obj, '__qualname__', type(obj).__name__)})"
    return factory
