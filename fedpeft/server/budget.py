"""Server-side privacy bookkeeping: per-client ledgers, the epsilon budget, central DP.

:class:`PrivacyBudget` wraps a strategy (outermost, so it sees every message sent and
every reply, also those a codec later rejects).  It mirrors each client's ledger from the
DP figures in its replies and, before a round, drops the train message of any client
whose epsilon would pass ``dp.epsilon-budget`` after that round -- the client sits the
round out and the round record says so -- instead of silently overspending.  User-level
(central) DP is :mod:`fedpeft.server.user_dp`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Strategy,
)

from fedpeft.privacy.accounting import Ledger, RoundPlan
from fedpeft.privacy.settings import DPConfig
from fedpeft.server.rejections import RejectionLog
from fedpeft.wire import METRICS_KEY
from strategies.wrapper import StrategyWrapper


class PrivacyBudget(StrategyWrapper):
    """Keep every client's epsilon within ``dp.epsilon-budget``; mirror their ledgers."""

    def __init__(self, inner: Strategy, dp: DPConfig, rejections: RejectionLog) -> None:
        super().__init__(inner)
        self.dp = dp
        self.plans: dict[int, RoundPlan] = {}  # node id -> cost of one round (see set_plans)
        self.rejections = rejections
        self.ledgers: dict[int, Ledger] = {}

    def set_plans(self, plans: Mapping[int, RoundPlan]) -> None:
        """What one round costs each node, as the nodes announced it at discovery (this
        engine's node ids: handed over again on every start)."""
        self.plans = dict(plans)

    def remap_nodes(self, mapping: Mapping[int, int]) -> None:
        """New node ids after a resume (:func:`strategies.traits.remap_nodes`): the mirrored ledgers follow."""
        self.ledgers = {mapping[n]: led for n, led in self.ledgers.items() if n in mapping}

    def epsilons(self) -> dict[int, float]:
        """Epsilon spent so far by every client that trained (node id -> epsilon)."""
        return {node: led.epsilon(self.dp.delta, self.dp.accountant) for node, led in self.ledgers.items()}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.dp.epsilon_budget <= 0:
            return messages
        kept = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            plan = self.plans.get(node)
            if plan is None:
                kept.append(msg)
                continue
            after = self.ledgers.setdefault(node, Ledger()).projected(plan, self.dp.delta, self.dp.accountant)
            if after > self.dp.epsilon_budget:
                self.rejections.reject(
                    node, f"sat out: epsilon would reach {after:.3f} > budget {self.dp.epsilon_budget:g}"
                )
            else:
                kept.append(msg)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            m = reply.content.metric_records.get(METRICS_KEY)
            spent = RoundPlan.from_metrics(m) if m is not None else None
            if spent is not None:
                self.ledgers.setdefault(reply.metadata.src_node_id, Ledger()).add(
                    spent.noise_multiplier, spent.sample_rate, spent.steps
                )
        return self.inner.aggregate_train(server_round, replies)
