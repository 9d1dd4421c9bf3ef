"""DP-FTRL (Kairouz et al., 2021): user-level DP without sampling amplification, by tree
aggregation of the clipped updates -- the mechanism behind Gboard's production DP models.

DP-FedAvg's bound needs clients sampled at random (Poisson), which a real deployment rarely
controls.  DP-FTRL releases instead the *prefix sums* of the rounds' mean clipped updates,
each noised through a binary tree (Dwork et al., 2010; Chan et al., 2011): the sum of the
first ``t`` rounds is the sum of at most ``log2(t) + 1`` tree nodes, each with independent
Gaussian noise, so the noise of the model grows like ``log t`` rather than ``sqrt t``.  The
model of round ``t`` is ``x_start + noisy_prefix(t)`` (FTRL with a server learning rate of 1;
no server momentum).  Every client takes part at most once per tree; the tree restarts from
the current model every ``restart_rounds`` rounds (Kairouz et al.'s "tree restarts").

Privacy: :class:`fedpeft.privacy.UserLevel` with ``mechanism="tree"`` (Google's
``dp-accounting`` tree-aggregation RDP, composed over the trees started).  The node noise is
drawn from a seeded NumPy generator (reproducible runs; a production deployment would use a
cryptographically secure source).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.runtime import derive_seed
from fedpeft.server.sampling import CohortGrid
from strategies.wrapper import StrategyWrapper

Arrays = dict[str, np.ndarray]


def tree_nodes(t: int) -> list[tuple[int, int]]:
    """The (level, index) tree nodes whose sums make up the prefix of the first ``t`` leaves:
    one per set bit of ``t``, so a leaf lies under ``ceil(log2(T + 1))`` nodes of a tree of
    ``T`` leaves (the depth ``dp-accounting`` charges)."""
    nodes, start = [], 0
    for level in reversed(range(t.bit_length())):
        if t >> level & 1:
            nodes.append((level, start >> level))
            start += 1 << level
    return nodes


class TreeAggregation(StrategyWrapper):
    """DP-FTRL around a strategy that builds the messages and aggregates the metrics; the
    model update is this wrapper's own (the strategy's aggregated arrays are not used).

    Each round trains on ``cohort`` clients, none of whom took part earlier in the same
    tree (a seeded permutation of the clients per tree), clips every update to
    ``clipping_norm``, and divides the sum by ``cohort`` (fixed: a failed client counts as a
    zero update).  Each tree node's noise has standard deviation
    ``noise_multiplier * clipping_norm / cohort`` per coordinate.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        cohort: int,
        restart_rounds: int,
        seed: int,
    ) -> None:
        super().__init__(inner)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.cohort = cohort
        self.restart_rounds = restart_rounds
        self.seed = seed
        self.origin: Arrays = {}  # the model the current tree started from
        self.prefix: Arrays = {}  # sum of the current tree's mean clipped updates (no noise)
        self.sent: Arrays = {}  # the model sent this round

    def _position(self, server_round: int) -> tuple[int, int]:
        """(tree, leaf) of a round: leaves count from 1 within their tree."""
        return (server_round - 1) // self.restart_rounds, (server_round - 1) % self.restart_rounds + 1

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        tree, leaf = self._position(server_round)
        self.sent = {k: v.numpy() for k, v in arrays.items()}
        if leaf == 1 or not self.origin:
            self.origin = {k: v.copy() for k, v in self.sent.items()}
            self.prefix = {k: np.zeros_like(v, dtype=np.float64) for k, v in self.sent.items()}
        nodes = list(grid.get_node_ids())  # partition order: the same cohorts on a resume
        order = random.Random(derive_seed(self.seed, "ftrl-tree", tree)).sample(nodes, len(nodes))
        cohort = order[(leaf - 1) * self.cohort : leaf * self.cohort]
        return self.inner.configure_train(server_round, arrays, config, CohortGrid(grid, cohort))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        _, metrics = self.inner.aggregate_train(server_round, replies)
        for reply in replies:
            if reply.has_error() or not reply.content.array_records:
                continue
            record = next(iter(reply.content.array_records.values()))
            update = {k: record[k].numpy().astype(np.float64) - self.sent[k] for k in self.sent}
            norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in update.values())))
            factor = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            for k, u in update.items():
                self.prefix[k] += u * (factor / self.cohort)
        tree, leaf = self._position(server_round)
        noisy = {k: v.copy() for k, v in self.prefix.items()}
        std = self.noise_multiplier * self.clipping_norm / self.cohort
        for level, index in tree_nodes(leaf):
            rng = np.random.default_rng([derive_seed(self.seed, "ftrl-noise", tree), level, index])
            for k in sorted(noisy):
                noisy[k] += rng.normal(0.0, std, size=noisy[k].shape)
        out = {
            k: Array(np.asarray(self.origin[k] + noisy[k], dtype=self.origin[k].dtype)) for k in self.origin
        }
        return ArrayRecord(out), metrics
