"""A strategy written as a function or as init/apply: adapters, registry paths, conformance."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from strategies import FunctionalStrategy, StrategyError, build_strategy, resolve_strategy
from strategies.conformance import NODES, ToyGrid, make_reply, run_conformance
from strategies.functional import dict_to_record, is_aggregate_fn, record_to_dict
from strategies.traits import StrategyTraits


def median(updates, weights):
    """Coordinate-wise median (ignores the weights)."""
    return {k: np.median(np.stack([u[k] for u in updates]), axis=0) for k in updates[0]}


median.traits = StrategyTraits(conformance={"kind": "robust", "weighted": False})


def weighted_mean(updates, weights, damping=1.0):
    total = sum(weights)
    return {
        k: damping * sum(w / total * u[k] for u, w in zip(updates, weights, strict=True)) for k in updates[0]
    }


def first_reply(updates, weights):
    """The update of the lowest node id (updates arrive sorted by node id)."""
    return dict(updates[0])


class ServerMomentum:
    """FedJAX-style explicit state: the momentum buffer."""

    traits = StrategyTraits(conformance={"kind": "server-optimizer"})

    def __init__(self, momentum: float = 0.9):
        self.momentum = momentum
        self.calls = []

    def init(self, params):
        return {k: np.zeros_like(v) for k, v in params.items()}

    def apply(self, state, params, updates, weights):
        self.calls.append(len(updates))
        total = sum(weights)
        new_params, new_state = {}, {}
        for k, p in params.items():
            mean = sum(w / total * u[k] for u, w in zip(updates, weights, strict=True))
            new_state[k] = self.momentum * state[k] + (mean - p)
            new_params[k] = p + new_state[k]
        return new_params, new_state


HERE = "tests.unit.strategies.test_functional"
SETTINGS = {"min_available_nodes": 2, "min_train_nodes": 2, "lora_alpha": 16.0, "client_ranks": {}}


def _round(strategy, global_, clients, server_round=1):
    list(strategy.configure_train(server_round, dict_to_record(global_), ConfigRecord(), ToyGrid(NODES)))
    replies = [make_reply(node, tensors, n) for node, tensors, n in clients]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return record_to_dict(arrays), metrics


def test_a_function_path_builds_a_functional_strategy_over_sorted_replies():
    s = build_strategy(f"{HERE}:first_reply", **SETTINGS)
    assert isinstance(s, FunctionalStrategy)
    g = {"w": np.zeros(2, np.float32)}
    got, metrics = _round(s, g, [(9, {"w": np.ones(2)}, 1), (3, {"w": -np.ones(2)}, 1)])
    np.testing.assert_array_equal(got["w"], -np.ones(2))  # node 3 comes first, whatever the order
    assert metrics["train-loss"] == pytest.approx(1.0)


def test_median_function_is_coordinatewise_and_ignores_weights():
    s = build_strategy(f"{HERE}:median", **SETTINGS)
    ups = [{"w": np.array([1.0, 5.0])}, {"w": np.array([2.0, -1.0])}, {"w": np.array([9.0, 0.0])}]
    got, _ = _round(
        s, {"w": np.zeros(2)}, [(n, u, w) for n, u, w in zip((4, 2, 8), ups, (1, 100, 1), strict=True)]
    )
    np.testing.assert_allclose(got["w"], [2.0, 0.0])


def test_function_keyword_parameters_are_user_kwargs():
    s = build_strategy(f"{HERE}:weighted_mean", user_kwargs={"damping": 0.5}, **SETTINGS)
    got, _ = _round(s, {"w": np.zeros(1)}, [(1, {"w": np.array([4.0])}, 3), (2, {"w": np.array([8.0])}, 1)])
    np.testing.assert_allclose(got["w"], [0.5 * 5.0])
    with pytest.raises(StrategyError, match=r"strategy\.kwargs.*'dampning'.*did you mean 'damping'"):
        build_strategy(f"{HERE}:weighted_mean", user_kwargs={"dampning": 0.5}, **SETTINGS)


def test_init_apply_class_keeps_state_across_rounds():
    s = build_strategy(f"{HERE}:ServerMomentum", user_kwargs={"momentum": 0.5}, **SETTINGS)
    assert isinstance(s, FunctionalStrategy) and s.impl.momentum == 0.5
    g = {"w": np.zeros(1, np.float32)}
    got, _ = _round(s, g, [(1, {"w": np.array([2.0])}, 1), (2, {"w": np.array([4.0])}, 1)])
    np.testing.assert_allclose(got["w"], [3.0])  # round 1: momentum buffer = the mean step
    got2, _ = _round(s, got, [(1, {"w": np.array([3.0])}, 1), (2, {"w": np.array([3.0])}, 1)], 2)
    np.testing.assert_allclose(got2["w"], [3.0 + 0.5 * 3.0])  # step 0, momentum carries 0.5 * 3
    assert s.impl.calls == [2, 2] and set(s.state) == {"w"}


def test_an_init_apply_instance_or_module_works_directly():
    impl = ServerMomentum(0.0)
    s = FunctionalStrategy(impl, min_available_nodes=2)
    got, _ = _round(s, {"w": np.zeros(1)}, [(1, {"w": np.array([1.0])}, 1), (2, {"w": np.array([3.0])}, 3)])
    np.testing.assert_allclose(got["w"], [2.5])


def test_aggregate_before_configure_is_a_clear_error():
    from flwr.serverapp.exception import AggregationError

    s = FunctionalStrategy(ServerMomentum(), min_available_nodes=2)
    with pytest.raises(AggregationError, match="configure_train must run"):
        s.aggregate_train(1, [make_reply(1, {"w": np.ones(1)}, 1)])


def test_a_function_returning_garbage_is_a_clear_error():
    from flwr.serverapp.exception import AggregationError

    s = FunctionalStrategy(lambda updates, weights: [1, 2], min_available_nodes=2)
    with pytest.raises(AggregationError, match="expected a dict"):
        _round(s, {"w": np.zeros(1)}, [(1, {"w": np.ones(1)}, 1)])


def test_callables_are_told_apart():
    assert is_aggregate_fn(median) and is_aggregate_fn(lambda u, w, beta=0.1: u)
    assert not is_aggregate_fn(FunctionalStrategy) and not is_aggregate_fn(lambda fraction_train=1.0: None)
    # A Strategy class and a factory are left alone.
    from flwr.serverapp.strategy import FedAvg

    assert resolve_strategy("flwr.serverapp.strategy:FedAvg") is FedAvg


def test_user_strategies_get_the_conformance_suite():
    for target in (f"{HERE}:median", f"{HERE}:ServerMomentum", f"{HERE}:weighted_mean"):
        outcomes = run_conformance(target)
        assert all(o.status != "fail" for o in outcomes), (target, outcomes)


def _docstring_examples(doc: str) -> str:
    """The ``::`` code blocks of a docstring, dedented and joined."""
    import textwrap

    blocks, lines, inside = [], doc.splitlines(), False
    for line in lines:
        if line.rstrip().endswith("::"):
            inside, block = True, []
            blocks.append(block)
        elif inside and (not line.strip() or line.startswith("    ")):
            block.append(line)
        elif inside:
            inside = False
    return "\n".join(textwrap.dedent("\n".join(b)) for b in blocks)


def test_the_module_docstring_examples_run_and_conform(tmp_path, monkeypatch):
    import sys

    from strategies import functional

    (tmp_path / "docstring_strategies.py").write_text(_docstring_examples(functional.__doc__))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("docstring_strategies", None)
    for name in ("median", "ServerMomentum"):
        outcomes = run_conformance(f"docstring_strategies:{name}")
        assert [o.status for o in outcomes if o.status == "fail"] == [], outcomes
        assert sum(o.status == "pass" for o in outcomes) >= 3
