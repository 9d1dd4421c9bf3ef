"""The Flower ServerApp: wire config, model, task, server wing and results together.

This module (with the client app and the launcher) is the only place where the pieces
meet; the round loop itself is Flower's ``Strategy.start``.  Reading top-down:
``launch`` -> :func:`run_server` -> the server wing (:mod:`fedpeft.server`: the strategy
stack, discovery, metering, recording) -> the strategy (:mod:`strategies`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import RunConfig
from fedpeft.models import FedModel, quiet_libraries
from fedpeft.recovery.checkpoint import CLIENT_STATE_DIR, Checkpoint, prepare_resume, rng_state, set_rng_state
from fedpeft.results.records import ResultsWriter, run_dir_for, save_adapter
from fedpeft.runtime import seed_everything
from fedpeft.server.discovery import discover_clients
from fedpeft.server.figures import privacy_figures, round_figures, step_figures, strategy_figures
from fedpeft.server.meter import MeteredGrid
from fedpeft.server.recorder import RoundRecorder
from fedpeft.server.resume import RoundOffset, remap_nodes
from fedpeft.server.stack import ServerState
from fedpeft.tasks import Evaluation, Task, get_task
from fedpeft.tasks.base import first_examples
from fedpeft.tasks.model import task_model
from fedpeft.wire import from_record, to_record

app = ServerApp()


@dataclass
class ServerRun:
    """What the server builds before round 1, built once (:func:`build_server_run`).

    The launcher builds it before the engine starts (so a bad strategy, dataset or
    checkpoint fails before Ray does) and hands it to the ServerApp in the same process
    (:func:`hand_over`); a ServerApp that was handed nothing (a deployment's SuperLink)
    builds it itself.  ``rng`` is the random state right after building, so that a run
    built early goes on exactly as one built when the ServerApp starts.
    """

    cfg: RunConfig
    run_dir: Path
    task: Task
    labels: tuple[str, ...]
    model: FedModel
    test_set: Any
    checkpoint: Checkpoint | None
    state: ServerState
    rng: dict[str, Any]

    @property
    def done(self) -> int:
        """Rounds already run (those of the checkpoint it resumes)."""
        return self.checkpoint.round if self.checkpoint else 0


def build_server_run(cfg: RunConfig) -> ServerRun:
    """Seed, then build the task, the server's model and test set, the run folder, the
    checkpoint (with ``resume``) and the strategy stack with its wrappers."""
    quiet_libraries()
    seed_everything(cfg.seed)
    task = get_task(cfg)
    labels = task.label_names(cfg)
    model = task_model(cfg.for_server(), task)
    test_set = task.server_test_set(cfg)
    run_dir = run_dir_for(cfg)
    ckpt = Checkpoint.load(run_dir) if cfg.resume else None
    state: ServerState = ckpt.state["server"] if ckpt else ServerState.fresh(cfg)
    return ServerRun(cfg, run_dir, task, labels, model, test_set, ckpt, state, rng_state())


_HANDED: list[ServerRun] = []  # at most one: the run the launcher built for this process's ServerApp


def hand_over(built: ServerRun) -> None:
    """Give ``built`` to the next ServerApp of this process that runs its config."""
    _HANDED[:] = [built]


def _taken(cfg: RunConfig) -> ServerRun | None:
    built = _HANDED.pop() if _HANDED else None
    return built if built is not None and built.cfg == cfg else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    run_server(grid, cfg, _taken(cfg))


def run_server(grid: Grid, cfg: RunConfig, built: ServerRun | None = None) -> Path:
    """Run the whole federation (or, with ``resume``, the rounds after its checkpoint), from
    ``built`` if the launcher built it, else built here."""
    t0 = time.perf_counter()
    if built is None:
        built = build_server_run(cfg)
    else:
        quiet_libraries()
        set_rng_state(built.rng)  # as if it had been built just now
    task, model, test_set, run_dir = built.task, built.model, built.test_set, built.run_dir
    ckpt, state, done = built.checkpoint, built.state, built.done
    writer = open_results(run_dir, cfg, done if ckpt else None)

    subsample = first_examples(test_set, cfg.evaluate_examples)

    def evaluate_global(arrays: ArrayRecord, whole: bool) -> tuple[Evaluation, int]:
        model.load_exchange_state(from_record(arrays))
        data = test_set if whole else subsample
        return task.evaluate(model, data, cfg.train.eval_batch_size), len(data)

    metered = MeteredGrid(grid)
    partition_of: dict[int, int] = {}

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        Checkpoint(
            server_round, from_record(arrays), {"server": state}, dict(partition_of), rng_state()
        ).save(run_dir)

    step = state.server_step()
    if step is not None and step.searches:  # its scorer holds the model: bound on every start
        step.bind(validation_scorer(model, cfg))

    recorder = RoundRecorder(
        metered,
        writer,
        evaluate_global,
        seed=cfg.seed,
        num_rounds=cfg.num_rounds,
        partition_of=partition_of,
        every=cfg.evaluate_every,
        rejections=state.rejections,
        figures=round_figures(
            privacy_figures(cfg, state.budget, partition_of),
            step_figures(step),
            strategy_figures(state.strategy),
        ),
        after_round=checkpoint,
        offset=done,
        resumed=ckpt is not None,
    )
    print(
        f"fedpeft: {cfg.peft.method} on {cfg.model.name} ({model.num_trainable:,} exchanged parameters), "
        f"{cfg.num_clients} clients, {cfg.data.dataset} ({cfg.data.partitioner}), strategy {cfg.strategy.name}; "
        f"results in {run_dir}" + (f"; resuming after round {done}" if ckpt else ""),
        flush=True,
    )
    partition_of.update(meet_clients(metered, cfg, state, ckpt))
    metered.node_order = partition_of.__getitem__
    _write_partition_stats(writer, cfg)
    initial = to_record(ckpt.arrays) if ckpt else to_record(model.initial_state)
    result = (RoundOffset(state.strategy, done) if done else state.strategy).start(
        grid=metered,
        initial_arrays=initial,
        num_rounds=cfg.num_rounds - done,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({"seed": cfg.seed}),
        evaluate_fn=recorder,
    )
    final = result.arrays if len(result.arrays) else initial
    model.load_exchange_state(from_record(final))
    writer.plot()
    save_adapter(model, run_dir, built.labels, cfg)  # last: its presence marks a finished run
    print(f"fedpeft: done in {time.perf_counter() - t0:.1f} s; results in {run_dir}", flush=True)
    return run_dir


def open_results(run_dir: Path, cfg: RunConfig, resume_after: int | None) -> ResultsWriter:
    """The results folder: continued after round ``resume_after``, or started afresh."""
    writer = ResultsWriter(run_dir)
    if resume_after is not None:
        prepare_resume(run_dir, resume_after)
        writer.resume(resume_after)
        writer.record_length(cfg.num_rounds)  # a resume may run a finished run longer
    else:
        writer.write_config(cfg.to_run_config())
        shutil.rmtree(run_dir / CLIENT_STATE_DIR, ignore_errors=True)  # a reused run name
    writer.write_versions()
    return writer


def meet_clients(
    grid: MeteredGrid, cfg: RunConfig, state: ServerState, ckpt: Checkpoint | None
) -> dict[int, int]:
    """Round 0: discover the nodes (its messages count in round 0), hand what they announced
    to the stack, and on a resume rename the checkpoint's node ids to this engine's.
    Returns node id -> partition id."""
    found = discover_clients(grid, cfg)
    state.hand_discovery(found.ranks, found.plans)
    if ckpt:  # a new engine gave the nodes new ids: the same partitions, renamed
        by_partition = {pid: node for node, pid in found.partition_of.items()}
        remap_nodes(state.strategy, {old: by_partition[pid] for old, pid in ckpt.partition_of.items()})
        set_rng_state(ckpt.rng)
    return found.partition_of


def validation_scorer(model: FedModel, cfg: RunConfig) -> Callable[[dict[str, Any]], float]:
    """arrays -> loss on the server's validation split (server.step-search)."""
    task = get_task(cfg)
    data = task.server_validation_set(cfg)

    def score(arrays: dict[str, Any]) -> float:
        model.load_exchange_state(arrays)
        return task.evaluate(model, data, cfg.train.eval_batch_size).loss

    return score


def _write_partition_stats(writer: ResultsWriter, cfg: RunConfig) -> None:
    stats = get_task(cfg).partition_stats(cfg)
    (writer.run_dir / "partitions.json").write_text(json.dumps(stats, indent=1))
