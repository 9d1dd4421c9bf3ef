"""A base for grids written outside Flower: ``create_message`` as Flower's own grids have it."""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class MessageGrid(Grid):
    """A ``Grid`` whose ``create_message`` is the ``Message`` constructor.

    ``Grid.create_message`` is abstract (and deprecated in favour of ``Message(...)``);
    Flower's grids build the message themselves, never from the grid's own state, and so
    does this one.  Subclasses implement the rest of the ``Grid`` interface.
    """

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)
