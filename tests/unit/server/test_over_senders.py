"""Averaging sparse updates over the clients that sent each coordinate."""

import numpy as np

from fedpeft.server.recorder import time_split
from fedpeft.server.transport import over_senders


def _weighted_mean(deltas, weights):
    return sum(w * d["x"] for d, w in zip(deltas, weights, strict=True)) / sum(weights)


def test_any_weighted_mean_becomes_the_mean_over_senders():
    deltas = [
        {"x": np.asarray([2.0, 0.0, 0.0, 1.0], np.float32)},
        {"x": np.asarray([4.0, 3.0, 0.0, 1.0], np.float32)},
        {"x": np.asarray([0.0, 0.0, 0.0, 1.0], np.float32)},
    ]
    weights = [1.0, 3.0, 4.0]
    got = _weighted_mean(over_senders(deltas, weights), weights)
    # coordinate 0: senders 1 (w=1) and 2 (w=3): (2 + 12) / 4; coordinate 1: client 2 alone;
    # nobody sent coordinate 2; everybody sent coordinate 3 (unchanged, the plain mean).
    np.testing.assert_allclose(got, [3.5, 3.0, 0.0, 1.0], rtol=1e-6)


def test_a_dense_update_is_unchanged():
    rng = np.random.default_rng(0)
    deltas = [{"x": rng.normal(size=50).astype(np.float32)} for _ in range(4)]
    out = over_senders(deltas, [1.0, 2.0, 3.0, 4.0])
    for a, b in zip(deltas, out, strict=True):
        np.testing.assert_allclose(a["x"], b["x"], rtol=1e-6)


def test_time_split_attributes_the_rest_to_the_server():
    split = time_split(10.0, 1.5, {"train": 6.0, "evaluate": 0.5})
    assert split == {"clients-train": 6.0, "clients-evaluate": 0.5, "server-evaluate": 1.5, "server": 2.0}
    assert time_split(1.0, 2.0, {})["server"] == 0.0  # never negative


def test_bounded_keeps_the_mean_no_longer_than_the_clients_mean_length():
    # three clients, disjoint supports: the mean over senders is (1, 1, 1), longer (sqrt 3)
    # than any client's update (1); bounded shortens it to length 1, direction kept
    deltas = [{"x": np.eye(3, dtype=np.float32)[i]} for i in range(3)]
    weights = [1.0, 1.0, 1.0]
    got = _weighted_mean(over_senders(deltas, weights, bounded=True), weights)
    np.testing.assert_allclose(got, np.full(3, 1 / np.sqrt(3)), rtol=1e-6)
    # a dense mean is never longer than the mean length: untouched
    rng = np.random.default_rng(1)
    dense = [{"x": rng.normal(size=20).astype(np.float32)} for _ in range(3)]
    for a, b in zip(dense, over_senders(dense, weights, bounded=True), strict=True):
        np.testing.assert_allclose(a["x"], b["x"], rtol=1e-6)
