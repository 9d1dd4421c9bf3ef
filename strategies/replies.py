"""Which replies a strategy aggregates: errors dropped and logged, the rest checked for consistency.

The same filter as Flower 1.41's ``FedAvg._check_and_log_replies`` (with its
``validate_message_reply_consistency``), written against the public API so that strategies
do not lean on a private method of FedAvg: the same log lines on Flower's ``flwr`` logger,
the same :class:`~flwr.serverapp.exception.InconsistentMessageReplies` with the same
reasons, the same return value.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies

_FLOWER_LOG = logging.getLogger("flwr")  # where Flower's strategies log


def check_and_log_replies(
    replies: Iterable[Message], *, is_train: bool, weighted_by_key: str, validate: bool = True
) -> tuple[list[Message], list[Message]]:
    """(replies with content, replies with an error), logged; with ``validate``, the former checked.

    ``is_train`` names the stage in the log line and, when true, also checks the
    ArrayRecords (:func:`check_reply_consistency`).
    """
    if not replies:
        return [], []
    valid: list[Message] = []
    errors: list[Message] = []
    for msg in replies:
        (errors if msg.has_error() else valid).append(msg)
    _FLOWER_LOG.info(
        "%s: Received %s results and %s failures",
        "aggregate_train" if is_train else "aggregate_evaluate",
        len(valid),
        len(errors),
    )
    for msg in errors:
        _FLOWER_LOG.info(
            "\t> Received error in reply from node %d: %s", msg.metadata.src_node_id, msg.error.reason
        )
    if validate and valid:
        check_reply_consistency(
            [msg.content for msg in valid], weighted_by_key=weighted_by_key, check_arrayrecord=is_train
        )
    return valid, errors


def check_reply_consistency(
    replies: list[RecordDict], *, weighted_by_key: str, check_arrayrecord: bool
) -> None:
    """Raise ``InconsistentMessageReplies`` unless the replies can be averaged together.

    Every reply has exactly one MetricRecord, all with the same keys, among them a single
    number under ``weighted_by_key``; with ``check_arrayrecord``, also exactly one
    ArrayRecord, all with the same keys.
    """
    if check_arrayrecord:
        if any(len(content.array_records) != 1 for content in replies):
            raise InconsistentMessageReplies(
                reason="Expected exactly one ArrayRecord in replies. Skipping aggregation."
            )
        _same_keys(replies, next(iter(replies[0].array_records.keys())), "ArrayRecords")
    if any(len(content.metric_records) != 1 for content in replies):
        raise InconsistentMessageReplies(
            reason="Expected exactly one MetricRecord in replies, but found more. Skipping aggregation."
        )
    record_key = next(iter(replies[0].metric_records.keys()))
    all_keys = _same_keys(replies, record_key, "MetricRecords")
    if weighted_by_key not in all_keys:
        raise InconsistentMessageReplies(
            reason=f"Missing required key `{weighted_by_key}` in the MetricRecord of reply messages. "
            "Cannot average ArrayRecords and MetricRecords. Skipping aggregation."
        )
    if any(isinstance(content[record_key][weighted_by_key], list) for content in replies):
        raise InconsistentMessageReplies(
            reason=f"Key `{weighted_by_key}` in the MetricRecord of reply messages must be a single value "
            "(int or float), but a list was found. Skipping aggregation."
        )


def _same_keys(replies: list[RecordDict], record_key: str, kind: str) -> set[str]:
    """The keys of the first reply's record ``record_key``; raises unless every reply's has them."""
    all_keys = set(replies[0][record_key].keys())
    if any(set(content.get(record_key, {}).keys()) != all_keys for content in replies[1:]):
        raise InconsistentMessageReplies(
            reason=f"All {kind} must have the same keys for aggregation. "
            "This condition wasn't met. Skipping aggregation."
        )
    return all_keys
