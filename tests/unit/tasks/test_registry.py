"""The task registry: names checked at config time, and a new task is one module + one line.

``FirstClassOrNot`` below is a whole task written outside the package (binary: is an
article of the source's first class?); registered under a name, it runs through the real
client and server apps unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fedpeft.apps import client_app
from fedpeft.apps.server_app import run_server
from fedpeft.config import ConfigError, RunConfig
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from fedpeft.tasks import TASKS, Evaluation, TaskSpec, build_task, get_task
from fedpeft.tasks import classification as seqcls
from fedpeft.tasks.conformance import check_task
from fedpeft.tasks.settings import TaskConfig
from fedpeft.training import Encoded, forward_batches


class FirstClassOrNot:
    """A toy task: the classification data relabelled 1 (first class) / 0 (any other);
    label-smoothed cross-entropy; accuracy and the share of predicted positives."""

    model_kind = "sequence-classification"  # a two-way head on the backbone

    def __init__(self) -> None:
        self.loss_calls = 0
        self.evaluations = 0

    def label_names(self, cfg):
        return ("other", seqcls.source(cfg).label_names[0])

    def num_outputs(self, cfg):
        return 2

    def client_train_size(self, cfg, partition_id, num_partitions):
        return seqcls.client_train_size(cfg, partition_id, num_partitions)

    def client_train_set(self, cfg, partition_id, num_partitions):
        return _binary(seqcls.client_train_set(cfg, partition_id, num_partitions))

    def server_test_set(self, cfg):
        return _binary(seqcls.server_test_set(cfg))

    def server_validation_set(self, cfg):
        return _binary(seqcls.server_validation_set(cfg))

    def partition_stats(self, cfg):
        return seqcls.SequenceClassification().partition_stats(cfg)

    def loss(self, logits, targets):
        self.loss_calls += 1
        return F.cross_entropy(logits, targets, label_smoothing=0.1)

    @torch.no_grad()
    def evaluate(self, model, data, batch_size):
        self.evaluations += 1
        loss_sum, correct, positive = 0.0, 0, 0
        for logits, labels in forward_batches(model, data, batch_size):
            loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            predicted = logits.argmax(dim=-1)
            correct += int((predicted == labels).sum())
            positive += int(predicted.sum())
        n = max(len(data), 1)
        return Evaluation(loss_sum / n, {"accuracy": correct / n, "positive_rate": positive / n})


def _binary(data: Encoded) -> Encoded:
    return Encoded(data.input_ids, data.attention_mask, (data.labels == 0).long())


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(TASKS, "first-class-or-not", TaskSpec(FirstClassOrNot, "toy: first class or not"))
    return "first-class-or-not"


def test_the_default_task_is_sequence_classification():
    cfg = RunConfig()
    assert cfg.task.name == "sequence-classification"
    assert isinstance(get_task(cfg), seqcls.SequenceClassification)
    assert get_task(cfg) is build_task("sequence-classification")  # one object per process


@pytest.mark.parametrize(
    "build",
    [
        lambda name: build_task(name),
        lambda name: RunConfig.from_run_config({"task.name": name}),
        lambda name: TaskConfig(name=name),
    ],
    ids=["build_task", "run-config", "dataclass"],
)
def test_an_unknown_task_names_the_key_and_the_valid_choices(build):
    with pytest.raises(ConfigError) as err:
        build("sequence-clasification")
    msg = str(err.value)
    assert "'task.name'" in msg and "did you mean 'sequence-classification'" in msg
    assert f"(valid: {', '.join(sorted(TASKS))})" in msg


def test_a_task_registered_in_one_module_trains_and_evaluates_through_the_apps(toy, tiny_overrides):
    cfg = RunConfig.from_run_config(tiny_overrides | {"task.name": toy, "fraction-evaluate": 1.0})
    task = build_task(toy)
    assert isinstance(task, FirstClassOrNot)
    check_task(task, cfg)
    calls = task.loss_calls
    run_dir = run_server(DirectGrid(client_app.app, cfg.num_clients, cfg.to_run_config()), cfg)
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(c["ok"] for r in rounds for c in r["clients"])
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rounds)
    # Clients trained with the toy's loss; the server evaluated with its metrics each round.
    assert task.loss_calls - calls == cfg.num_rounds * cfg.num_clients * cfg.train.max_steps
    evaluated = [c["metrics"] for r in rounds for c in r["clients"] if "eval_positive_rate" in c["metrics"]]
    assert evaluated and all(0.0 <= m["eval_acc"] <= 1.0 for m in evaluated)
    saved = json.loads((run_dir / "adapter" / "fedpeft.json").read_text())
    assert saved["num_labels"] == 2
