"""Every registered task keeps the task contract (a new task gets this check for free)."""

import pytest

from fedpeft.config import RunConfig
from fedpeft.tasks import TASKS, build_task
from fedpeft.tasks.conformance import TaskConformanceError, check_task
from tests.conftest import TINY, tiny_for


@pytest.mark.parametrize("name", sorted(TASKS))
def test_registered_task_keeps_the_contract(name):
    task = build_task(name)
    cfg = RunConfig.from_run_config(tiny_for(task.model_kind) | {"task.name": name})
    check_task(task, cfg)


def test_the_check_names_what_a_broken_task_gets_wrong():
    cfg = RunConfig.from_run_config(TINY)
    task = build_task("sequence-classification")

    class Oversized(type(task)):  # announces more examples than it prepares
        def client_train_size(self, cfg, partition_id, num_partitions):
            return super().client_train_size(cfg, partition_id, num_partitions) + 1

    with pytest.raises(TaskConformanceError, match="client_train_size says"):
        check_task(Oversized(), cfg)
