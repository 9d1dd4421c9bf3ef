"""strategies.replies filters replies exactly as Flower's FedAvg._check_and_log_replies does."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from strategies.conformance import ensure_task_identity, make_reply
from strategies.replies import check_and_log_replies

W = {"a": np.ones(3), "b": np.zeros(2)}


def _error(node_id: int, reason: str) -> Message:
    ensure_task_identity()
    return Message(Error(2, reason), reply_to=Message(RecordDict(), node_id, MessageType.TRAIN))


def _with(node_id: int, content: RecordDict) -> Message:
    ensure_task_identity()
    return Message(content, reply_to=Message(RecordDict(), node_id, MessageType.TRAIN))


def _metrics(**values) -> MetricRecord:
    return MetricRecord({"num-examples": 3, **values})


CASES = {
    "none": [],
    "all fine": [make_reply(1, W, 3), make_reply(2, W, 5)],
    "errors dropped": [make_reply(1, W, 3), _error(2, "boom"), _error(3, "late")],
    "only errors": [_error(2, "boom")],
    "two array records": [_with(1, RecordDict({"x": ArrayRecord(), "y": ArrayRecord(), "m": _metrics()}))],
    "array keys differ": [make_reply(1, W, 3), make_reply(2, {"a": np.ones(3)}, 3)],
    "metric keys differ": [
        make_reply(1, W, 3),
        _with(2, RecordDict({"arrays": ArrayRecord(), "metrics": _metrics()})),
    ],
    "two metric records": [
        _with(
            1, RecordDict({"arrays": ArrayRecord({"a": Array(np.ones(1))}), "m": _metrics(), "n": _metrics()})
        )
    ],
    "no weight key": [
        _with(1, RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"loss": 1.0})}))
    ],
    "weight is a list": [
        _with(1, RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": [1, 2]})}))
    ],
    "no arrays (evaluate)": [_with(1, RecordDict({"metrics": _metrics(), "config": ConfigRecord({"x": 1})}))],
}


def _outcome(call, caplog):
    caplog.clear()
    try:
        valid, errors = call()
        result = ("ok", [id(m) for m in valid], [id(m) for m in errors])
    except Exception as err:  # compared: the same class and reason
        result = ("raised", type(err), str(err))
    return result, [(r.name, r.levelno, r.getMessage()) for r in caplog.records]


@pytest.mark.parametrize("is_train", [True, False])
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_the_same_replies_logs_and_errors_as_fedavg(case, validate, is_train, caplog):
    replies = CASES[case]
    fedavg = FedAvg(fraction_evaluate=0.5)
    caplog.set_level(logging.INFO, logger="flwr")
    theirs = _outcome(
        lambda: fedavg._check_and_log_replies(replies, is_train=is_train, validate=validate), caplog
    )
    ours = _outcome(
        lambda: check_and_log_replies(
            replies, is_train=is_train, weighted_by_key=fedavg.weighted_by_key, validate=validate
        ),
        caplog,
    )
    assert ours == theirs
