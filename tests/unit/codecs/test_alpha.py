"""The alpha search on its own: it keeps the candidate with the lowest validation loss."""

import pickle

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedpeft.server.alpha import AlphaSearch
from fedpeft.wire import from_record, to_record


class Fixed(FedAvg):
    """Aggregates to a fixed global: start + (1, -2)."""

    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        return to_record({"w": np.asarray([1.0, -2.0], np.float32)}), MetricRecord({})


def _search(score, candidates=(1.0, 2.0, 4.0, 8.0)):
    search = AlphaSearch(Fixed(), candidates, score)
    search.configure_train(1, to_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), None)
    return search, from_record(search.aggregate_train(1, [])[0])["w"]


def test_the_lowest_validation_loss_wins_and_is_recorded():
    # validation loss is lowest at w = 4 * (1, -2)
    search, got = _search(lambda a: float(np.sum((a["w"] - np.asarray([4.0, -8.0])) ** 2)))
    assert search.chosen == {1: 4.0}
    np.testing.assert_array_equal(got, [4.0, -8.0])


def test_ties_go_to_the_plainer_step():
    search, got = _search(lambda a: 0.0)
    assert search.chosen == {1: 1.0}
    np.testing.assert_array_equal(got, [1.0, -2.0])


def test_the_scorer_is_not_checkpointed_and_must_be_bound():
    search, _ = _search(lambda a: 0.0)
    restored = pickle.loads(pickle.dumps(search))
    assert restored.score is None and restored.chosen == {1: 1.0}
    restored.configure_train(2, to_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), None)
    with pytest.raises(RuntimeError, match="bind"):
        restored.aggregate_train(2, [])
