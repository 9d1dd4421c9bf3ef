import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.wire import from_record, message_size, message_sizes, payload_size, to_record


@pytest.fixture(autouse=True)
def _identity():
    if TaskIdentity._run_id is None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _msg(n: int, node: int = 42) -> Message:
    rng = np.random.default_rng(n)
    arrays = to_record(
        {"b.weight": rng.normal(size=(n, 3)).astype(np.float32), "a.bias": np.zeros(n, np.float32)}
    )
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 3})}), node, "train")
    msg.metadata.__dict__["_message_id"] = f"{node:064x}"
    return msg


def test_records_are_sorted_and_round_trip():
    state = {"z": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, np.float32)}
    record = to_record(state)
    assert list(record.keys()) == ["a", "z"]
    back = from_record(record)
    assert list(back) == ["a", "z"] and all(np.array_equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("n", [0, 1, 17, 300, 40_000])
def test_message_size_is_the_serialized_size_to_the_byte(n):
    msg = _msg(n)
    assert message_size(msg) == len(message_to_proto(msg).SerializeToString())


def test_reply_and_error_messages_are_sized_exactly():
    ins = _msg(50)
    reply = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 5, "train_loss": 0.25})}), reply_to=ins
    )
    failed = Message(Error(code=3, reason="boom"), reply_to=ins)
    for msg in (reply, failed):
        assert message_size(msg) == len(message_to_proto(msg).SerializeToString())


def test_shared_content_is_serialized_once_but_sized_per_message():
    base = _msg(1000)
    content = base.content
    msgs = [Message(content, node, "train") for node in (1, 2**40, 2**62)]
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"{i:064x}"
    assert message_sizes(msgs) == [len(message_to_proto(m).SerializeToString()) for m in msgs]


def test_payload_size_is_flowers_count_bytes():
    msg = _msg(123)
    assert payload_size(msg) == msg.content["arrays"].count_bytes()
    assert payload_size(msg) > 123 * 4 * 4  # both arrays' float32 bytes plus npy headers
