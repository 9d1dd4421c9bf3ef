"""Conformance suite: properties a strategy should hold, checked on a LoRA-shaped toy round.

Run it on your own strategy (any ``strategy.name`` value: registered name, ``module:Class``,
``module:function``)::

    python -m strategies.conformance mypkg.mod:MyStrategy   # no argument: every registered one

It prints PASS / FAIL / SKIP per property and exits non-zero on a failure.  From pytest,
:func:`check` returns one :class:`Outcome` and :func:`run_conformance` all of them.

The toy model has two LoRA modules (``lora_A`` [r, in] / ``lora_B`` [out, r], not
square, so a transposition shows) and a classifier head; the server starts from the
peft template (B = 0).  What a strategy is expected to do comes from small declared
:class:`Traits`: Flower's built-ins get theirs from :data:`FLOWER_TRAITS` (by class, so
subclasses inherit them), anything else may declare a ``conformance_traits`` dict
(class attribute, or attribute of an aggregate function) overriding the defaults, and
``supports_heterogeneous_ranks`` is read from the strategy.  A newly registered strategy
gets the whole suite with the FedAvg-like defaults.

Properties (see :data:`PROPERTIES`):

* ``keys-and-shapes``: the result has the global model's keys and shapes (FLoRA's merged
  form: per module a ``base_delta.A``/``.B`` pair of matching shapes or one dense
  ``base_delta.W`` [out, in]), all finite.
* ``identical-updates``: clients that all send the same update aggregate to it (LoRA-exact
  strategies: the same products); server-optimizer strategies must instead move every
  entry from the global toward it (a server learning rate changes the step).
* ``weights``: 3:1 ``num-examples`` give the 3:1 mean (server optimizers: move to the
  side of the weighted mean, opposite to the unweighted one); unweighted strategies skip.
* ``client-order``: permuting the replies gives the same result (to float rounding).
* ``lora-product``: the aggregated ``s * B @ A`` equals the weighted mean of the clients'
  (FLoRA: added to the global's), to 1e-5 relative, when it fits in the global rank.
* ``lora-product-beyond-rank``: the same with clients whose updates span more than the
  global rank: exact for stacking, the best rank-R approximation for ``truncates``.
* ``heterogeneous-ranks``: with clients of different ranks, every node is sent arrays it
  can load (its own rank, or merged form) and the products aggregate as above.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, MultiKrum, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

# The one fedpeft module strategies may import: a leaf that holds Flower's private APIs.
# Flower's strategies build their Messages with ``Message()``, which reads the process's run
# identity; only Flower's runtime sets it, and no public API does.
from fedpeft.flower_compat import Run, empty_run, ensure_task_identity
from strategies.arrays import Tensors, dict_to_record, record_to_dict
from strategies.grid import MessageGrid
from strategies.lora_exact import (
    LORA_A,
    LORA_B,
    base_a_key,
    base_b_key,
    base_w_key,
    merged_modules,
    merged_of,
    ordinary_keys,
    product,
    svd_refactor,
)
from strategies.registry import STRATEGIES, build_strategy
from strategies.traits import declared_traits, hand_client_ranks

ALPHA = 16.0  # lora_alpha of the toy model
RANK = 4  # its global LoRA rank R
MODULES: dict[str, tuple[int, int]] = {  # LoRA module -> (in, out)
    "encoder.layer.0.attention.self.query": (8, 6),
    "encoder.layer.0.attention.self.value": (8, 10),
}
HEAD: dict[str, tuple[int, ...]] = {"classifier.weight": (3, 8), "classifier.bias": (3,)}
NODES = (11, 7, 42, 3)  # node ids, deliberately unsorted
WEIGHTS = (5, 9, 2, 7)  # num-examples of the four clients
HETERO_RANKS = {11: 1, 7: 2, 42: RANK, 3: 3}
RTOL = 1e-5  # relative (Frobenius) tolerance of value comparisons
ORDER_RTOL = 1e-6  # client-order: float rounding only

KINDS = ("mean", "server-optimizer", "robust")
LAYOUTS = ("factors", "b-only")
LORA_MODES = ("none", "product", "merged")


@dataclass(frozen=True)
class Traits:
    """What a strategy promises; the checks follow from these.

    kind: ``"mean"`` (aggregates to the weighted mean), ``"server-optimizer"`` (a server
        step toward it: FedAvgM, FedAdam, ...), ``"robust"`` (median, trimmed mean, Krum).
    weighted: honours ``num-examples``.
    layout: what clients send: ``"factors"`` (lora_A + lora_B + head) or ``"b-only"``
        (lora_B + head; A frozen at a shared init, as FFA-LoRA).
    lora: ``"none"`` (tensor-wise, no promise about ``B @ A``), ``"product"`` (the
        result's ``s * B @ A`` is the weighted mean of the clients'), ``"merged"`` (FLoRA:
        merged form out, the mean added to the global's product).
    truncates: the result is capped at the global rank R (best rank-R approximation), and a
        rank-r node is sent the best rank-r approximation of the global.
    heterogeneous_ranks: serves clients of different ranks (``StrategyTraits.heterogeneous_ranks``).
    """

    kind: str = "mean"
    weighted: bool = True
    layout: str = "factors"
    lora: str = "none"
    truncates: bool = False
    heterogeneous_ranks: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("kind", KINDS), ("layout", LAYOUTS), ("lora", LORA_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"conformance trait {name}={getattr(self, name)!r}; allowed: {allowed}")

    @classmethod
    def of(cls, strategy: Strategy) -> Traits:
        """The traits of a built strategy: Flower defaults by class, then its declared ones
        (:class:`strategies.traits.StrategyTraits`)."""
        fields: dict[str, Any] = {}
        for klass in reversed(type(strategy).__mro__):
            fields.update(FLOWER_TRAITS.get(klass, {}))
        declared = declared_traits(strategy)
        unknown = set(declared.conformance) - {f.name for f in dataclasses.fields(cls)} | (
            {"heterogeneous_ranks"} & set(declared.conformance)
        )
        if unknown:
            raise ValueError(f"unknown conformance traits {sorted(unknown)}")
        fields.update(declared.conformance)
        fields["heterogeneous_ranks"] = declared.heterogeneous_ranks
        return cls(**fields)


# Flower's strategies, by class (a subclass inherits its base's traits).
FLOWER_TRAITS: dict[type, dict[str, Any]] = {
    FedAvg: {},
    FedAvgM: {"kind": "server-optimizer"},
    FedOpt: {"kind": "server-optimizer"},  # FedAdam, FedYogi, FedAdagrad
    FedMedian: {"kind": "robust", "weighted": False},
    FedTrimmedAvg: {"kind": "robust", "weighted": False},
    MultiKrum: {"kind": "robust", "weighted": False},  # Krum
}


class ConformanceFailure(AssertionError):
    """A strategy does not hold a property."""


class Skip(Exception):
    """A property does not apply to a strategy's traits."""


@dataclass(frozen=True)
class Outcome:
    """One property's result: ``status`` is "pass", "fail" or "skip"."""

    prop: str
    status: str
    detail: str = ""


# ---------------------------------------------------------------------- toy federation
class ToyGrid(MessageGrid):
    """A grid that only lists nodes: enough for a strategy's configure calls.

    Flower's ``Message()`` reads the process's run identity, unset outside its runtime;
    this grid sets a placeholder one when none is set (as fedpeft's DirectGrid does).
    """

    def __init__(self, node_ids: Iterable[int]) -> None:
        ensure_task_identity()
        self.node_ids = list(node_ids)

    def set_run(self, run: Run) -> None:
        pass

    @property
    def run(self) -> Run:
        return empty_run(0)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("the conformance grid only samples nodes")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("the conformance grid only samples nodes")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError("the conformance grid only samples nodes")


def make_reply(node_id: int, tensors: Mapping[str, np.ndarray], num_examples: int) -> Message:
    """A train reply from ``node_id`` as a ClientApp sends it (arrays + metrics with num-examples)."""
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {k: Array(np.ascontiguousarray(tensors[k], np.float32)) for k in sorted(tensors)}
            ),
            "metrics": MetricRecord({"num-examples": int(num_examples), "train-loss": 1.0}),
        }
    )
    ensure_task_identity()
    instruction = Message(RecordDict(), node_id, MessageType.TRAIN)
    return Message(content, reply_to=instruction)


def _rng(tag: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(tag.encode()))


def _delta(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Entries of magnitude in [0.1, 1] with random signs (never near zero)."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.1, 1.0, size=shape)


def _init_a(rng: np.random.Generator, rank: int, in_dim: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, (rank, in_dim)) / np.sqrt(in_dim)


def toy_global(traits: Traits, *, trained: bool = False) -> tuple[Tensors, dict[str, np.ndarray]]:
    """(the arrays the server starts from, the shared A per module).

    The peft template: A at a seeded init, B = 0 (``trained``: B random too); the
    ``b-only`` layout leaves A out (it never travels).
    """
    rng = _rng("global")
    shared_a = {m: _init_a(rng, RANK, i) for m, (i, _) in MODULES.items()}
    tensors: Tensors = {}
    for m, (_, o) in MODULES.items():
        tensors[m + LORA_B] = rng.normal(0.0, 0.5, (o, RANK)) if trained else np.zeros((o, RANK))
        if traits.layout == "factors":
            tensors[m + LORA_A] = shared_a[m]
    for k, shape in HEAD.items():
        tensors[k] = rng.normal(0.0, 0.1, shape)
    return _f32(tensors), {m: a.astype(np.float32) for m, a in shared_a.items()}


def toy_client(
    tag: str,
    traits: Traits,
    global_: Tensors,
    shared_a: Mapping[str, np.ndarray],
    *,
    rank: int = RANK,
    share_a: bool = True,
) -> Tensors:
    """A client's trained arrays: random B at ``rank``; A the shared one or its own; head moved."""
    rng = _rng(tag)
    out: Tensors = {k: global_[k] + _delta(rng, global_[k].shape) for k in ordinary_keys(global_)}
    for m, (i, o) in MODULES.items():
        out[m + LORA_B] = rng.normal(0.0, 0.5, (o, rank))
        if traits.layout == "factors":
            out[m + LORA_A] = shared_a[m][:rank] + 0.0 if share_a else _init_a(rng, rank, i)
    return _f32(out)


def _perturbed(tag: str, global_: Tensors, scale: float = 1.0) -> Tensors:
    rng = _rng(tag)
    return _f32({k: v + scale * _delta(rng, v.shape) for k, v in global_.items()})


def _f32(tensors: Mapping[str, np.ndarray]) -> Tensors:
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


# ---------------------------------------------------------------------- subject
SETTINGS: dict[str, Any] = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,
    "min_train_nodes": len(NODES),
    "min_evaluate_nodes": len(NODES),
    "min_available_nodes": len(NODES),
    "lora_alpha": ALPHA,
}


@dataclass(frozen=True)
class Subject:
    """A strategy under test: how to build it fresh, and its traits."""

    label: str
    target: str | Callable[..., Any]
    traits: Traits

    @classmethod
    def of(cls, target: str | Callable[..., Any], traits: Traits | None = None) -> Subject:
        label = target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))
        if traits is None:
            traits = Traits.of(build_strategy(target, **SETTINGS))
        return cls(label, target, traits)

    def build(self, client_ranks: Mapping[int, int] | None = None) -> Strategy:
        """A fresh strategy, handed ``client_ranks`` as the server wing does after discovery."""
        strategy = build_strategy(self.target, **SETTINGS)
        hand_client_ranks(strategy, client_ranks or {})
        return strategy

    def configure(
        self, global_: Tensors, client_ranks: Mapping[int, int] | None = None
    ) -> tuple[Strategy, ToyGrid, list[Message]]:
        """A fresh strategy and its round-1 train messages for ``global_``."""
        strategy = self.build(client_ranks)
        grid = ToyGrid(NODES)
        return (
            strategy,
            grid,
            list(strategy.configure_train(1, dict_to_record(global_), ConfigRecord(), grid)),
        )

    def round(
        self,
        global_: Tensors,
        clients: Sequence[tuple[int, Tensors, int]],
        client_ranks: Mapping[int, int] | None = None,
    ) -> Tensors:
        """Configure on ``global_``, aggregate ``clients`` = [(node, tensors, num_examples)]."""
        strategy, _, _ = self.configure(global_, client_ranks)
        return aggregate(strategy, clients)


def aggregate(strategy: Strategy, clients: Sequence[tuple[int, Tensors, int]]) -> Tensors:
    """``strategy.aggregate_train`` on fresh replies built from ``clients``."""
    replies = [make_reply(node, tensors, n) for node, tensors, n in clients]
    arrays, _ = strategy.aggregate_train(1, replies)
    if arrays is None:
        raise ConformanceFailure("aggregate_train returned no arrays for valid replies")
    return record_to_dict(arrays)


# ---------------------------------------------------------------------- views
def effective(
    tensors: Mapping[str, np.ndarray], traits: Traits, shared_a: Mapping[str, np.ndarray]
) -> Tensors:
    """What a strategy with ``traits`` promises about ``tensors``: products for LoRA-exact ones.

    ``lora="none"``: the tensors as they are (float64).  Otherwise the ordinary tensors and,
    per LoRA module, its update of the base weight: ``B @ A`` or ``W`` (merged form),
    ``alpha / r * B @ A`` (factors) or ``alpha / R * B @ A_shared`` (b-only).
    """
    if traits.lora == "none":
        return {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    out = {k: np.asarray(tensors[k], np.float64) for k in ordinary_keys(tensors)}
    merged = set(merged_modules(tensors))
    for m in MODULES:
        if m in merged:
            out[m] = product(*merged_of(tensors, m))
        else:
            a = tensors.get(m + LORA_A, shared_a[m])
            out[m] = product(tensors[m + LORA_B], a, ALPHA / a.shape[0])
    return out


def expected(
    global_: Tensors,
    updates: Sequence[Tensors],
    weights: Sequence[float],
    traits: Traits,
    shared_a: Mapping[str, np.ndarray],
    rank: int = RANK,
) -> Tensors:
    """The weighted mean of the clients' :func:`effective` views, as ``traits`` promise it."""
    p = np.asarray(weights, np.float64) / float(sum(weights))
    views = [effective(u, traits, shared_a) for u in updates]
    out = {k: sum(pk * v[k] for pk, v in zip(p, views, strict=True)) for k in views[0]}
    if traits.lora == "merged":
        start = effective(global_, traits, shared_a)
        for m in MODULES:
            out[m] = out[m] + start[m]
    if traits.truncates:
        for m in MODULES:
            b, a = svd_refactor(out[m], rank)
            out[m] = b @ a
    return out


def assert_close(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], what: str, rtol: float = RTOL
) -> None:
    """Every tensor of ``want`` is in ``got`` and within ``rtol`` (relative Frobenius norm)."""
    missing = sorted(set(want) - set(got))
    if missing:
        raise ConformanceFailure(f"{what}: result lacks {missing}")
    for k in sorted(want):
        g, w = np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)
        if g.shape != w.shape:
            raise ConformanceFailure(f"{what}: '{k}' has shape {g.shape}, expected {w.shape}")
        err, norm = float(np.linalg.norm(g - w)), float(np.linalg.norm(w))
        if not err <= rtol * norm + 1e-6:
            raise ConformanceFailure(
                f"{what}: '{k}' off by {err:.3g} (relative {err / max(norm, 1e-30):.2e})"
            )


def assert_moves_toward(got: Tensors, start: Tensors, target: Tensors, what: str) -> None:
    """Every entry of ``got`` lies on ``target``'s side of ``start`` (moved, not stayed)."""
    for k in sorted(start):
        if k not in got:
            raise ConformanceFailure(f"{what}: result lacks '{k}'")
        step = np.asarray(got[k], np.float64) - start[k]
        want = np.asarray(target[k], np.float64) - start[k]
        mask = np.abs(want) > 1e-6
        wrong = int(np.count_nonzero(np.sign(step[mask]) != np.sign(want[mask])))
        if wrong:
            raise ConformanceFailure(
                f"{what}: {wrong} of {int(mask.sum())} entries of '{k}' do not move from the global toward the update"
            )


# ---------------------------------------------------------------------- properties
def _clients(
    subject: Subject, global_: Tensors, shared_a: Mapping[str, np.ndarray], **kw: Any
) -> list[Tensors]:
    return [toy_client(f"client-{node}", subject.traits, global_, shared_a, **kw) for node in NODES]


def check_keys_and_shapes(subject: Subject) -> None:
    t = subject.traits
    global_, shared_a = toy_global(t)
    updates = _clients(subject, global_, shared_a, share_a=False)
    got = subject.round(global_, list(zip(NODES, updates, WEIGHTS, strict=True)))
    if t.lora == "merged":
        # Per module either the pair base_delta.A/.B or one dense base_delta.W.
        want_keys = set(ordinary_keys(global_)).union(*(_merged_keys(m, got) for m in MODULES))
    else:
        want_keys = set(global_)
    if set(got) != want_keys:
        raise ConformanceFailure(
            f"keys: got {sorted(set(got) - want_keys)} extra, {sorted(want_keys - set(got))} missing"
        )
    for k, v in got.items():
        if not np.all(np.isfinite(v)):
            raise ConformanceFailure(f"'{k}' is not finite")
        if k in global_ and v.shape != global_[k].shape:
            raise ConformanceFailure(f"'{k}' has shape {v.shape}, the global's is {global_[k].shape}")
    if t.lora == "merged":
        for m, (i, o) in MODULES.items():
            if base_w_key(m) in got:
                if got[base_w_key(m)].shape != (o, i):
                    raise ConformanceFailure(
                        f"merged form of '{m}': W {got[base_w_key(m)].shape} is not [{o}, {i}]"
                    )
                continue
            a, b = got[base_a_key(m)], got[base_b_key(m)]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != i or b.shape[0] != o or a.shape[0] != b.shape[1]:
                raise ConformanceFailure(
                    f"merged form of '{m}': B {b.shape} @ A {a.shape} is not [{o}, R] @ [R, {i}]"
                )


def _merged_keys(module: str, got: Mapping[str, np.ndarray]) -> set[str]:
    """The keys ``module``'s merged form should have in ``got``: ``{W}`` if it sent W, else ``{A, B}``."""
    return {base_w_key(module)} if base_w_key(module) in got else {base_a_key(module), base_b_key(module)}


def check_identical_updates(subject: Subject) -> None:
    t = subject.traits
    global_, shared_a = toy_global(t)
    update = _perturbed("identical", global_)
    got = subject.round(global_, [(n, update, w) for n, w in zip(NODES, WEIGHTS, strict=True)])
    if t.kind == "server-optimizer":
        assert_moves_toward(got, global_, update, "identical updates")
        return
    want = expected(global_, [update], [1.0], t, shared_a)
    assert_close(effective(got, t, shared_a), want, "identical updates")


def check_weights(subject: Subject) -> None:
    t = subject.traits
    if not t.weighted or t.kind == "robust":
        raise Skip("declared unweighted")
    global_, shared_a = toy_global(t)
    nodes, weights = NODES[:2], (300, 100)
    if t.kind == "server-optimizer":
        # 3:1 of (g + d) and (g - 2d): the weighted mean is g + d/4, the unweighted g - d/2.
        d = _perturbed("weights", {k: np.zeros_like(v) for k, v in global_.items()})
        ups = [
            _f32({k: global_[k] + d[k] for k in global_}),
            _f32({k: global_[k] - 2 * d[k] for k in global_}),
        ]
        got = subject.round(global_, list(zip(nodes, ups, weights, strict=True)))
        target = {k: global_[k] + d[k] for k in global_}
        assert_moves_toward(got, global_, target, "3:1 weights (toward the weighted mean)")
        return
    # Two clients sharing A (so a LoRA-exact mean fits in rank R), different B and head.
    ups = [toy_client(f"weights-{n}", t, global_, shared_a) for n in nodes]
    got = subject.round(global_, list(zip(nodes, ups, weights, strict=True)))
    assert_close(effective(got, t, shared_a), expected(global_, ups, weights, t, shared_a), "3:1 weights")


def check_client_order(subject: Subject) -> None:
    t = subject.traits
    global_, shared_a = toy_global(t)
    updates = _clients(subject, global_, shared_a, share_a=False)
    clients = list(zip(NODES, updates, WEIGHTS, strict=True))
    first = subject.round(global_, clients)
    second = subject.round(global_, [clients[i] for i in (2, 0, 3, 1)])
    if set(first) != set(second):
        raise ConformanceFailure("permuting the replies changes the result's keys")
    for k in sorted(first):
        if first[k].shape != second[k].shape or not np.allclose(
            first[k], second[k], rtol=ORDER_RTOL, atol=1e-7
        ):
            raise ConformanceFailure(f"permuting the replies changes '{k}'")


def _lora_exact(subject: Subject, *, share_a: bool) -> None:
    t = subject.traits
    if t.lora == "none":
        raise Skip("declares no LoRA-exact aggregation (lora='none')")
    if not share_a and t.layout == "b-only":
        raise Skip("b-only layout: A is shared, so the mean always fits in rank R")
    global_, shared_a = toy_global(t)
    updates = _clients(subject, global_, shared_a, share_a=share_a)
    got = subject.round(global_, list(zip(NODES, updates, WEIGHTS, strict=True)))
    want = expected(global_, updates, WEIGHTS, t, shared_a)
    assert_close(effective(got, t, shared_a), want, "LoRA products")


def check_lora_product(subject: Subject) -> None:
    _lora_exact(subject, share_a=True)


def check_lora_product_beyond_rank(subject: Subject) -> None:
    _lora_exact(subject, share_a=False)


def check_heterogeneous_ranks(subject: Subject) -> None:
    t = subject.traits
    if not t.heterogeneous_ranks:
        raise Skip("does not support heterogeneous ranks (supports_heterogeneous_ranks is False)")
    global_, shared_a = toy_global(t, trained=True)
    updates = [
        toy_client(f"hetero-{node}", t, global_, shared_a, rank=HETERO_RANKS[node], share_a=False)
        for node in NODES
    ]
    strategy, grid, train = subject.configure(global_, HETERO_RANKS)
    _check_downlinks(t, train, effective(global_, t, shared_a), shared_a, "train")
    got = aggregate(strategy, list(zip(NODES, updates, WEIGHTS, strict=True)))
    evaluate = list(strategy.configure_evaluate(1, dict_to_record(got), ConfigRecord(), grid))
    _check_downlinks(t, evaluate, effective(got, t, shared_a), shared_a, "evaluate")
    want = expected(global_, updates, WEIGHTS, t, shared_a)
    assert_close(effective(got, t, shared_a), want, "heterogeneous-rank products")


def _check_downlinks(
    t: Traits, messages: Sequence[Message], reference: Tensors, shared_a: Mapping[str, np.ndarray], kind: str
) -> None:
    for msg in messages:
        node = msg.metadata.dst_node_id
        sent = record_to_dict(next(iter(msg.content.array_records.values())))
        _check_downlink(t, sent, node, reference, shared_a, f"{kind} message to node {node}")


def _check_downlink(
    t: Traits, sent: Tensors, node: int, reference: Tensors, shared_a: Mapping[str, np.ndarray], what: str
) -> None:
    rank = HETERO_RANKS[node]
    merged = set(merged_modules(sent))
    for m in MODULES:
        if m in merged:
            continue
        a, b = sent.get(m + LORA_A), sent.get(m + LORA_B)
        if a is None or b is None or a.shape[0] != rank or b.shape[1] != rank:
            raise ConformanceFailure(
                f"{what} (rank {rank}): '{m}' is sent as B {None if b is None else b.shape} @ "
                f"A {None if a is None else a.shape}, neither rank {rank} nor merged form"
            )
    view = effective(sent, t, shared_a)
    if t.lora == "merged" or merged:
        assert_close(view, reference, f"{what}: the merged form is the global model")
    elif t.truncates:
        want = dict(reference)
        for m in MODULES:
            b, a = svd_refactor(reference[m], rank)
            want[m] = b @ a
        assert_close(view, want, f"{what}: best rank-{rank} approximation of the global")


PROPERTIES: dict[str, Callable[[Subject], None]] = {
    "keys-and-shapes": check_keys_and_shapes,
    "identical-updates": check_identical_updates,
    "weights": check_weights,
    "client-order": check_client_order,
    "lora-product": check_lora_product,
    "lora-product-beyond-rank": check_lora_product_beyond_rank,
    "heterogeneous-ranks": check_heterogeneous_ranks,
}


# ---------------------------------------------------------------------- running
def check(target: str | Callable[..., Any] | Subject, prop: str) -> Outcome:
    """Check one property of a strategy (a ``strategy.name`` value, a factory, or a :class:`Subject`)."""
    subject = target if isinstance(target, Subject) else Subject.of(target)
    try:
        PROPERTIES[prop](subject)
    except Skip as why:
        return Outcome(prop, "skip", str(why))
    except ConformanceFailure as err:
        return Outcome(prop, "fail", str(err))
    except Exception as err:  # a strategy that crashes on the toy round fails the property
        return Outcome(prop, "fail", f"raised {type(err).__name__}: {err}")
    return Outcome(prop, "pass")


def run_conformance(
    target: str | Callable[..., Any], properties: Iterable[str] | None = None
) -> list[Outcome]:
    """Every property (or the named ones) of one strategy."""
    subject = Subject.of(target)
    return [check(subject, prop) for prop in (properties or PROPERTIES)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m strategies.conformance",
        description="Check strategies against the conformance properties on a LoRA-shaped toy round.",
    )
    parser.add_argument(
        "targets", nargs="*", help="registered names or module:Name (default: every registered one)"
    )
    parser.add_argument("-p", "--property", action="append", choices=sorted(PROPERTIES), help="only these")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    failed = 0
    for target in args.targets or sorted(STRATEGIES):
        try:
            subject = Subject.of(target)
        except Exception as err:
            print(f"{target}: cannot build: {type(err).__name__}: {err}")
            failed += 1
            continue
        traits = ", ".join(f"{f.name}={getattr(subject.traits, f.name)}" for f in dataclasses.fields(Traits))
        print(f"{target} ({traits})")
        for outcome in run_conformance(target, args.property):
            detail = f": {outcome.detail}" if outcome.detail else ""
            print(f"  {outcome.status.upper():4}  {outcome.prop}{detail}")
            failed += outcome.status == "fail"
    print("conformance: " + (f"{failed} failure(s)" if failed else "all passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
