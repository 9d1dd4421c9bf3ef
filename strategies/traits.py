"""What a strategy or wrapper declares about itself, in one typed place.

The server wing and the conformance suite ask these questions of every layer of a
strategy stack; before, each read a differently named attribute with ``getattr`` and a
default.  Now:

* :class:`StrategyTraits` -- declared facts: serves heterogeneous LoRA ranks, rewrites the
  arrays it sends per node, and what the conformance suite should expect of it.  A strategy
  class (or a functional strategy's function / init-apply object) sets
  ``traits = StrategyTraits(...)``; :func:`traits_of` reads it, defaults when absent.
* :class:`UsesClientRanks` -- a layer that sends each node its own rank is handed the
  ranks the nodes announced at discovery (:func:`hand_client_ranks`), instead of a dict
  filled in place behind its back.
* :class:`RemapsNodes` -- a layer with per-node state renames node ids after a restart
  (a new engine gives the same partitions new ids).

The questions walk the whole stack with :func:`strategies.wrapper.wrapper_chain`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.wrapper import wrapper_chain

#: Attribute names of the duck-typed declarations this module replaced.
LEGACY_NAMES = ("conformance_traits", "supports_heterogeneous_ranks", "rewrites_arrays")


@dataclass(frozen=True)
class StrategyTraits:
    """What a strategy declares about itself.

    heterogeneous_ranks: aggregates clients whose LoRA factors have different ranks
        (FlexLoRA, FLoRA); other strategies need one shape per tensor.
    rewrites_arrays: sends per-node or merged layouts, so "reply - what was sent" is not an
        update of the global's tensors (the codec and Flower's central DP refuse it; the
        update guard skips its layout checks).
    conformance: what :mod:`strategies.conformance` should expect, as keyword arguments of
        its ``Traits`` (``kind``, ``weighted``, ``layout``, ``lora``, ``truncates``).
    plain_mean: its aggregate is the example-weighted mean of the replies and nothing else
        (no server optimizer, no robust rule), so a mechanism that sets the server update
        itself (DP-FTRL's noisy prefix sums) can stand in for it.
    implies: settings of other run-config sections that choosing it entails,
        ``{section: {field: value}}`` (FFA-LoRA: ``{"lora": {"freeze_a": True}}``).
    """

    heterogeneous_ranks: bool = False
    rewrites_arrays: bool = False
    conformance: Mapping[str, Any] = field(default_factory=dict)
    plain_mean: bool = False
    implies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A copy, plain so that it pickles (a functional strategy keeps its traits, and
        # checkpoints pickle the strategy).
        object.__setattr__(self, "conformance", dict(self.conformance))
        object.__setattr__(self, "implies", {k: dict(v) for k, v in self.implies.items()})


DEFAULT_TRAITS = StrategyTraits()
#: Flower's own strategies cannot declare traits: theirs, by exact class (a subclass
#: changes the aggregate, so it declares its own).
FLOWER_TRAITS: dict[type, StrategyTraits] = {FedAvg: StrategyTraits(plain_mean=True)}


def declared_traits(obj: object) -> StrategyTraits:
    """The ``traits`` ``obj`` declares (a strategy, or what a functional strategy wraps)."""
    legacy = [name for name in LEGACY_NAMES if name in _own_attributes(obj)]
    if legacy:
        raise TypeError(
            f"{_label(obj)} declares {', '.join(legacy)}; declare "
            "`traits = strategies.traits.StrategyTraits(...)` instead (heterogeneous_ranks, "
            "rewrites_arrays, conformance={...})"
        )
    klass = obj if isinstance(obj, type) else type(obj)
    traits = getattr(obj, "traits", FLOWER_TRAITS.get(klass, DEFAULT_TRAITS))
    if not isinstance(traits, StrategyTraits):
        raise TypeError(f"{_label(obj)}.traits is a {type(traits).__name__}, not a StrategyTraits")
    return traits


def traits_of(strategy: Strategy) -> StrategyTraits:
    """The traits of the strategy at the core of ``strategy``'s wrappers (wrappers pass through)."""
    return declared_traits(list(wrapper_chain(strategy))[-1])


@runtime_checkable
class UsesClientRanks(Protocol):
    """A layer that sends each node a LoRA rank of its own."""

    def set_client_ranks(self, ranks: Mapping[int, int]) -> None:
        """``node id -> rank``, as the nodes announced them (a copy: the caller keeps its own)."""


@runtime_checkable
class RemapsNodes(Protocol):
    """A layer that keeps per-node state, renamed when the nodes get new ids on resume."""

    def remap_nodes(self, mapping: Mapping[int, int]) -> None:
        """``old node id -> new node id`` for every node that serves the same partition."""


def hand_client_ranks(strategy: Strategy, ranks: Mapping[int, int]) -> None:
    """Give every layer that sends per-node ranks the ranks announced at discovery."""
    for layer in wrapper_chain(strategy):
        if isinstance(layer, UsesClientRanks):
            layer.set_client_ranks(dict(ranks))


def remap_nodes(strategy: Strategy, mapping: Mapping[int, int]) -> None:
    """Rename node ids in every layer's state after a restart (a new engine, new ids)."""
    for layer in wrapper_chain(strategy):
        if isinstance(layer, RemapsNodes):
            layer.remap_nodes(mapping)


def _own_attributes(obj: object) -> set[str]:
    names = set(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__ if not isinstance(obj, type) else obj.__mro__:
        names |= set(vars(klass))
    return names


def _label(obj: object) -> str:
    return str(getattr(obj, "__qualname__", None) or type(obj).__qualname__)
