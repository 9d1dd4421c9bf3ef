"""Nothing but the exchanged tensors and scalar metrics leaves a client.

Every message a client sends during real runs (dense, ComPEFT-coded, local DP) is
inspected: arrays must be the exchanged float tensors (or the codec's one byte payload),
metrics must be numbers, and there must be nothing else -- no config records, no text,
no token ids, no labels.
"""

import numpy as np
import pytest
from flwr.common.serde import message_from_proto, message_to_proto

from fedpeft.apps import client_app
from fedpeft.apps.server_app import run_server
from fedpeft.codecs.flower import PAYLOAD_KEY
from fedpeft.config import RunConfig
from fedpeft.models import get_model
from fedpeft.running.inprocess import DirectGrid
from fedpeft.tasks import classification, get_task


def _replies(cfg):
    sent = []

    def app(msg, context):
        reply = client_app.app(msg, context)
        # A copy as it left: in-process, the server decodes payloads in the same object.
        sent.append(message_from_proto(message_to_proto(reply)))
        return reply

    run_server(DirectGrid(app, cfg.num_clients, cfg.to_run_config()), cfg)
    return sent


@pytest.mark.parametrize(
    "extra",
    [{}, {"codec.name": "compeft"}, {"dp.mode": "local", "dp.noise-multiplier": 0.5}],
    ids=["dense", "compeft", "local-dp"],
)
def test_replies_hold_only_exchanged_tensors_and_numbers(tiny_overrides, extra):
    cfg = RunConfig.from_run_config(tiny_overrides | extra)
    exchanged = get_model(cfg, get_task(cfg).num_outputs(cfg)).params
    replies = _replies(cfg)
    assert len(replies) == cfg.num_clients * (1 + cfg.num_rounds)  # discovery + every round
    for reply in replies:
        assert not reply.has_error()
        content = reply.content
        assert not content.config_records  # no free-form text or settings travel back
        assert set(content.metric_records) == {"metrics"}
        for key, value in content.metric_records["metrics"].items():
            values = value if isinstance(value, list) else [value]
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), key
        if reply.metadata.message_type == "query.describe":
            assert not content.array_records
            continue
        assert set(content.array_records) == {"arrays"}
        record = content.array_records["arrays"]
        if "codec.name" in extra:
            assert list(record) == [PAYLOAD_KEY] and record[PAYLOAD_KEY].stype == "fedpeft.compeft/2"
            continue
        assert set(record) == set(exchanged)
        for name, array in record.items():
            values = array.numpy()
            assert values.dtype == np.float32 and values.shape == tuple(exchanged[name].shape), name


def test_no_training_text_or_labels_appear_in_any_reply(tiny_overrides):
    cfg = RunConfig.from_run_config(tiny_overrides)
    replies = _replies(cfg)
    data = get_task(cfg).client_train_set(cfg, 0, cfg.num_clients)
    # The raw bytes of the first client's token ids and labels never appear on the wire.
    needles = [data.input_ids[0, :12].numpy().tobytes(), data.labels.numpy().astype(np.int64).tobytes()]
    texts = [t[:40].encode() for t in classification.split(cfg)[0]["text"][:20]]
    for reply in replies:
        wire = message_to_proto(reply).SerializeToString()
        assert not any(n in wire for n in needles + texts)


def test_describe_counts_the_partition_without_tokenizing_it(tiny_overrides):
    from flwr.app import ConfigRecord, Message, RecordDict

    cfg = RunConfig.from_run_config(tiny_overrides)
    grid = DirectGrid(client_app.app, cfg.num_clients, cfg.to_run_config())
    classification.client_train_set.cache_clear()
    node = list(grid.get_node_ids())[1]
    (reply,) = grid.send_and_receive(
        [Message(RecordDict({"config": ConfigRecord()}), node, "query.describe")]
    )
    assert (
        classification.client_train_set.cache_info().currsize == 0
    )  # discovery of 10,000 nodes tokenizes nothing
    metrics = reply.content.metric_records["metrics"]
    pid = int(metrics["partition-id"])
    assert metrics["num-partitions"] == cfg.num_clients
    assert metrics["num-examples"] == len(get_task(cfg).client_train_set(cfg, pid, cfg.num_clients)) > 0
