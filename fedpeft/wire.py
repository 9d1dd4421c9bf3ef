"""What crosses the wire: name -> tensor mappings <-> Flower ``ArrayRecord``, and byte sizes.

Exchanged tensors travel as one ``ArrayRecord`` with keys in canonical sorted order, so a
reply's key set can be compared with the global model's by equality.  Byte counts are
taken from the serialized message, never from parameter counts: ``message_size`` is the
protobuf size of the message as Flower serializes it (its serializer is reached through
:mod:`fedpeft.flower_compat`), and ``payload_size`` the bytes of its arrays as
``ArrayRecord.count_bytes`` reports them.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Message

from fedpeft.flower_compat import MESSAGE_CONTENT_FIELD, message_head_size, recorddict_proto_size
from strategies.arrays import dict_to_record, record_to_dict

ARRAYS_KEY = "arrays"  # the key Flower's strategies use for the ArrayRecord
METRICS_KEY = "metrics"
CONFIG_KEY = "config"


# The wire's names for the one conversion (:mod:`strategies.arrays`): an ``ArrayRecord``
# holding a tensor dict in sorted-name order, and the sorted tensor dict it carries.
to_record = dict_to_record
from_record = record_to_dict


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _embedded_field_size(field_number: int, payload: int) -> int:
    """Size of a length-delimited protobuf field (tag + length + payload)."""
    return _varint_size(field_number << 3 | 2) + _varint_size(payload) + payload


def content_size(msg: Message) -> int:
    """Protobuf size of the message's content (its RecordDict), 0 without content."""
    return recorddict_proto_size(msg.content) if msg.has_content() else 0


def message_size(msg: Message, content_bytes: int | None = None) -> int:
    """Exact protobuf-serialized size of ``msg`` (metadata + content + error).

    ``content_bytes`` lets a caller that sends one content to many nodes serialize it
    once; the result equals ``len(message_to_proto(msg).SerializeToString())``.
    """
    head = message_head_size(msg)
    if not msg.has_content():
        return head
    body = content_size(msg) if content_bytes is None else content_bytes
    return head + _embedded_field_size(MESSAGE_CONTENT_FIELD, body)


def message_sizes(messages: Sequence[Message]) -> list[int]:
    """:func:`message_size` of each message, serializing each distinct content once."""
    by_content: dict[int, int] = {}
    sizes = []
    for msg in messages:
        if msg.has_content():
            key = id(msg.content)  # all messages are alive here, so ids are unique
            if key not in by_content:
                by_content[key] = content_size(msg)
            sizes.append(message_size(msg, by_content[key]))
        else:
            sizes.append(message_size(msg))
    return sizes


def payload_size(msg: Message) -> int:
    """Bytes of the array payloads in ``msg`` (``ArrayRecord.count_bytes`` summed)."""
    if not msg.has_content():
        return 0
    return sum(rec.count_bytes() for rec in msg.content.array_records.values())
