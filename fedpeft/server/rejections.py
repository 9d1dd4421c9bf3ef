"""A shared log of updates the server refused, so the round record can say who and why.

Server-side wrappers (the codec decoder, and later norm bounds) reject a client's reply
instead of letting it reach aggregation; they note the node and the reason here, and the
round recorder marks that client as failed with that reason.
"""

from __future__ import annotations


class RejectionLog:
    """node id -> reason, for the round in progress."""

    def __init__(self) -> None:
        self._by_node: dict[int, str] = {}

    def reject(self, node_id: int, reason: str) -> None:
        self._by_node[node_id] = reason

    def drain(self) -> dict[int, str]:
        """The rejections since the last call (and forget them)."""
        out, self._by_node = self._by_node, {}
        return out
