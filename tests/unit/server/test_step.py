"""The server step on its own: learning rate, momentum, and the validation search."""

import pickle

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedpeft.server.step import ServerStep, best_scale, momentum_update
from fedpeft.wire import from_record, to_record


class Fixed(FedAvg):
    """Aggregates to the global it was given plus (1, -2)."""

    def configure_train(self, server_round, arrays, config, grid):
        self.last = from_record(arrays)["w"]
        return []

    def aggregate_train(self, server_round, replies):
        return to_record({"w": self.last + np.asarray([1.0, -2.0], np.float32)}), MetricRecord({})


def _round(step, server_round, w):
    step.configure_train(server_round, to_record({"w": np.asarray(w, np.float32)}), ConfigRecord(), None)
    return from_record(step.aggregate_train(server_round, [])[0])["w"]


def _search(score, candidates=(1.0, 2.0, 4.0, 8.0)):
    step = ServerStep(Fixed(), candidates=candidates, score=score)
    return step, _round(step, 1, [0.0, 0.0])


def test_the_lowest_validation_loss_wins_and_is_recorded():
    # validation loss is lowest at w = 4 * (1, -2)
    step, got = _search(lambda a: float(np.sum((a["w"] - np.asarray([4.0, -8.0])) ** 2)))
    assert step.chosen == {1: 4.0}
    np.testing.assert_array_equal(got, [4.0, -8.0])


def test_ties_go_to_the_plainer_step():
    step, got = _search(lambda a: 0.0)
    assert step.chosen == {1: 1.0}
    np.testing.assert_array_equal(got, [1.0, -2.0])
    assert best_scale((0.5, 2.0), lambda c: 1.0)[0] == 0.5  # equally far from 1: the first


def test_learning_rate_and_momentum_are_fedavgm():
    # v_t = 0.5 v_{t-1} + u_t; w += 0.1 v_t, with u_t = (1, -2) every round
    step = ServerStep(Fixed(), learning_rate=0.1, momentum=0.5)
    w = np.zeros(2, np.float32)
    expected, v = w.copy(), np.zeros(2, np.float32)
    for r in (1, 2, 3):
        w = _round(step, r, w)
        v = 0.5 * v + np.asarray([1.0, -2.0], np.float32)
        expected = expected + np.float32(0.1) * v
        np.testing.assert_allclose(w, expected, rtol=1e-6)
    np.testing.assert_allclose(momentum_update(None, {"w": np.ones(2)}, 0.9)["w"], [1.0, 1.0])


def test_velocity_is_checkpointed_the_scorer_is_not():
    step = ServerStep(Fixed(), momentum=0.9, candidates=(1.0,), score=lambda a: 0.0)
    _round(step, 1, [0.0, 0.0])
    restored = pickle.loads(pickle.dumps(step))
    np.testing.assert_array_equal(restored.velocity["w"], [1.0, -2.0])
    assert restored.score is None and restored.chosen == {1: 1.0}
    with pytest.raises(RuntimeError, match="bind"):
        _round(restored, 2, [1.0, -2.0])
