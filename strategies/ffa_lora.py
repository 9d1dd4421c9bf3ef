"""FFA-LoRA: federated LoRA with A frozen (Sun et al., ICLR 2024, "Improving LoRA in
Privacy-preserving Federated Learning").

Every client keeps ``lora_A`` at the run's shared seeded initialisation and trains only
``lora_B`` (and the head).  With A the same everywhere, averaging B *is* averaging the
updates: ``mean_k s * B_k @ A = s * (mean_k B_k) @ A`` -- the exact aggregation that plain
FedAvg over both factors misses -- and only B travels, halving the LoRA payload.

The clients freeze A when ``lora.freeze-a = true``, which ``strategy.name = "ffa-lora"``
implies; this strategy is FedAvg over what arrives and refuses arrays that carry A.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg

from strategies.lora_exact import LORA_A, LoraLayoutError
from strategies.traits import StrategyTraits

HINT = (
    "FFA-LoRA keeps lora_A frozen at its shared seeded initialisation and exchanges only lora_B: "
    "set lora.freeze-a = true (strategy.name = 'ffa-lora' implies it)"
)


def _lora_a_key(keys: Iterable[str]) -> str | None:
    return next((k for k in sorted(keys) if k.endswith(LORA_A)), None)


class FFALoRA(FedAvg):
    """FedAvg over ``lora_B`` (+ ordinary tensors) with A frozen on the clients; rejects A factors."""

    # B_k must have one shape to be averaged (no heterogeneous ranks). Conformance: B-only
    # layout; the product s * B @ A_shared is averaged exactly.
    traits = StrategyTraits(
        conformance={"layout": "b-only", "lora": "product"},
        implies={"lora": {"freeze_a": True}},  # only B trains and travels
    )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's; raises :class:`LoraLayoutError` if the global arrays carry ``lora_A``."""
        key = _lora_a_key(arrays.keys())
        if key is not None:
            raise LoraLayoutError(f"ffa-lora: the global arrays carry {key!r}; {HINT}")
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's; raises Flower's ``AggregationError`` if a reply carries ``lora_A``."""
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                continue
            for record in msg.content.array_records.values():
                key = _lora_a_key(record.keys())
                if key is not None:
                    raise AggregationError(
                        f"ffa-lora: the reply of node {msg.metadata.src_node_id} carries {key!r}; {HINT}"
                    )
        return super().aggregate_train(server_round, replies)
