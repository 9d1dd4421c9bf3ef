"""The Flower ServerApp: wire config, model, strategy, metering and results together.

This module (with the client app and the launcher) is the only place where the pieces
meet; the round loop itself is Flower's ``Strategy.start``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedpeft.checkpoint import (
    CLIENT_STATE_DIR,
    Checkpoint,
    RoundOffset,
    prepare_resume,
    remap_nodes,
    rng_state,
    set_rng_state,
)
from fedpeft.codecs.alpha import AlphaSearch
from fedpeft.codecs.flower import CompressedTransport
from fedpeft.config import ConfigError, RunConfig
from fedpeft.guard import UpdateGuard
from fedpeft.metering import MeteredGrid
from fedpeft.models import FedModel, get_model
from fedpeft.privacy import RoundPlan
from fedpeft.privacy_budget import PrivacyBudget, central_dp, central_epsilon
from fedpeft.recorder import RoundRecorder
from fedpeft.rejections import RejectionLog
from fedpeft.results import ResultsWriter, default_run_name
from fedpeft.runtime import quiet_libraries, seed_everything
from fedpeft.tasks import get_task
from fedpeft.wire import METRICS_KEY, from_record, to_record
from strategies import build_strategy
from strategies.wrapper import wrapper_chain

app = ServerApp()
log = logging.getLogger("fedpeft")


DISCOVERY_BATCH = 500  # nodes asked to describe themselves at once


class ClientDiscoveryError(RuntimeError):
    """The expected clients did not all announce themselves in time."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    run_server(grid, cfg)


def run_dir_for(cfg: RunConfig) -> Path:
    """``results-dir/run-name`` (a timestamped name when none is configured)."""
    name = cfg.run_name or default_run_name(cfg.to_run_config())
    return Path(cfg.results_dir).expanduser().resolve() / name


@dataclass
class ServerState:
    """The strategy stack and the objects it shares with the app; checkpointed as one."""

    strategy: Strategy
    budget: PrivacyBudget | None
    rejections: RejectionLog
    plans: dict[int, RoundPlan]  # node id -> DP cost of a round, filled at discovery
    client_ranks: dict[int, int]  # node id -> LoRA rank, filled at discovery

    @classmethod
    def fresh(cls, cfg: RunConfig) -> ServerState:
        rejections = RejectionLog()
        plans: dict[int, RoundPlan] = {}
        client_ranks: dict[int, int] = {}
        strategy, budget = strategy_stack(cfg, rejections, plans, client_ranks)
        return cls(strategy, budget, rejections, plans, client_ranks)


def run_server(grid: Grid, cfg: RunConfig) -> Path:
    """Run the whole federation (or, with ``resume``, the rounds after its checkpoint)."""
    quiet_libraries()
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    task = get_task(cfg)
    labels = task.label_names(cfg)
    model = get_model(cfg.for_server(), task.num_outputs(cfg))
    test_set = task.server_test_set(cfg)
    run_dir = run_dir_for(cfg)
    ckpt = Checkpoint.load(run_dir) if cfg.resume else None
    state: ServerState = ckpt.state["server"] if ckpt else ServerState.fresh(cfg)
    done = ckpt.round if ckpt else 0
    writer = ResultsWriter(run_dir)
    if ckpt:
        prepare_resume(run_dir, done)
        writer.resume(done)
    else:
        writer.write_config(cfg.to_run_config())
        shutil.rmtree(run_dir / CLIENT_STATE_DIR, ignore_errors=True)  # a reused run name
    writer.write_versions()

    def evaluate_global(arrays: ArrayRecord) -> tuple[float, float]:
        model.load_exchange_state(from_record(arrays))
        result = task.evaluate(model, test_set, cfg.train.eval_batch_size)
        return result.loss, result.metrics["accuracy"]

    metered = MeteredGrid(grid)
    partition_of: dict[int, int] = {}

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        Checkpoint(
            server_round, from_record(arrays), {"server": state}, dict(partition_of), rng_state()
        ).save(run_dir)

    for layer in wrapper_chain(state.strategy):
        if isinstance(layer, AlphaSearch):  # its scorer holds the model: bound on every start
            layer.bind(validation_scorer(model, cfg))

    recorder = RoundRecorder(
        metered,
        writer,
        evaluate_global,
        seed=cfg.seed,
        num_rounds=cfg.num_rounds,
        partition_of=partition_of,
        rejections=state.rejections,
        privacy=round_figures(
            privacy_figures(cfg, state.budget, partition_of), alpha_figures(state.strategy)
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
    described = discover_clients(metered, cfg)  # its messages count in round 0
    partition_of.update({node: int(m["partition-id"]) for node, m in described.items()})
    _absorb_discovery(state, described)
    if ckpt:  # a new engine gave the nodes new ids: the same partitions, renamed
        by_partition = {pid: node for node, pid in partition_of.items()}
        remap_nodes(state.strategy, {old: by_partition[pid] for old, pid in ckpt.partition_of.items()})
        set_rng_state(ckpt.rng)
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
    save_adapter(model, run_dir, labels, cfg)  # last: its presence marks a finished run
    print(f"fedpeft: done in {time.perf_counter() - t0:.1f} s; results in {run_dir}", flush=True)
    return run_dir


def save_adapter(model: FedModel, run_dir: Path, labels: tuple[str, ...], cfg: RunConfig) -> Path:
    """Write ``run_dir/adapter`` whole or not at all (a crash mid-save leaves no adapter).

    A resumed run whose checkpoint is the last round writes it again.
    """
    final, tmp = run_dir / "adapter", run_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp, labels, cfg=cfg.for_server())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _absorb_discovery(state: ServerState, described: dict[int, dict[str, float]]) -> None:
    """What the nodes announced: their LoRA ranks and DP costs (node ids are this engine's)."""
    state.client_ranks.clear()
    state.client_ranks.update({n: int(m["lora-rank"]) for n, m in described.items() if "lora-rank" in m})
    state.plans.clear()
    state.plans.update(
        {
            node: RoundPlan(m["dp-noise-multiplier"], m["dp-sample-rate"], int(m["dp-steps"]))
            for node, m in described.items()
            if "dp-steps" in m
        }
    )


def sampled_per_round(cfg: RunConfig) -> int:
    """How many clients FedAvg-style sampling picks per round."""
    return max(int(cfg.num_clients * cfg.fraction_train), cfg.min_train_clients)


def strategy_stack(
    cfg: RunConfig,
    rejections: RejectionLog,
    plans: dict[int, RoundPlan],
    client_ranks: dict[int, int] | None = None,
) -> tuple[Strategy, PrivacyBudget | None]:
    """The configured strategy inside its wrappers, innermost first: central DP, the update
    guard, the alpha search on validation data, codec, budget.

    Central DP clips decoded dense updates, so it sits inside the codec; the guard drops
    broken updates (NaN, wrong names or shapes, norms past the bound) before DP or the
    strategy sees them; the budget sits outside everything so it sees every reply, also
    one the codec then rejects.
    ``client_ranks`` (node id -> LoRA rank) is filled at discovery, for strategies that
    send each node its own rank.
    """
    strategy = build_strategy(
        cfg.strategy.name,
        user_kwargs=cfg.strategy.kwarg_dict(),
        fraction_train=cfg.fraction_train,
        min_train_nodes=cfg.min_train_clients,
        min_available_nodes=cfg.num_clients,
        fraction_evaluate=cfg.fraction_evaluate,
        min_evaluate_nodes=1,
        lora_alpha=cfg.lora.alpha,
        client_ranks=client_ranks if client_ranks is not None else {},
    )
    check_compatible(cfg, strategy)
    if cfg.dp.mode in ("central", "both"):
        strategy = central_dp(strategy, cfg.dp, sampled_per_round(cfg))
    strategy = UpdateGuard(strategy, rejections, cfg.strategy.max_update_norm, cfg.min_replies)
    if cfg.server_tunes():
        strategy = AlphaSearch(strategy, cfg.codec.alpha_candidates())
    if cfg.codec.active():
        strategy = CompressedTransport(strategy, cfg.codec, rejections)
    budget = None
    if cfg.dp.mode in ("local", "both"):
        strategy = budget = PrivacyBudget(strategy, cfg.dp, plans, rejections)
    return strategy, budget


def check_compatible(cfg: RunConfig, strategy: Strategy) -> None:
    """Refuse combinations the strategy cannot serve, before anything starts."""
    name = cfg.strategy.name
    if cfg.heterogeneous_ranks() and not getattr(strategy, "supports_heterogeneous_ranks", False):
        raise ConfigError(
            f"config key 'lora.ranks' gives clients different ranks, which strategy {name!r} cannot "
            "aggregate (shapes differ); use strategy.name = 'flexlora' or 'flora'"
        )
    if getattr(strategy, "rewrites_arrays", False):
        # The codec and Flower's central-DP wrappers compute updates as reply - what was sent,
        # which needs the same tensors both ways; these strategies change the layout per node.
        if cfg.codec.active():
            raise ConfigError(
                f"strategy {name!r} sends per-node / merged LoRA layouts, which the codec does not "
                "handle yet; set codec.name = 'none' and codec.downlink = 'none'"
            )
        if cfg.dp.mode in ("central", "both"):
            raise ConfigError(
                f"strategy {name!r} changes the tensor layout between rounds, which Flower's central "
                "DP wrappers cannot clip; use dp.mode = 'local'"
            )


def validation_scorer(model: FedModel, cfg: RunConfig) -> Callable[[dict[str, Any]], float]:
    """arrays -> loss on the server's validation split (codec.alpha-search)."""
    task = get_task(cfg)
    data = task.server_validation_set(cfg)

    def score(arrays: dict[str, Any]) -> float:
        model.load_exchange_state(arrays)
        return task.evaluate(model, data, cfg.train.eval_batch_size).loss

    return score


def alpha_figures(strategy: Strategy) -> Callable[[int], dict[str, Any]] | None:
    """The alpha chosen on validation data in each round (None without codec.alpha-search)."""
    search = next((s for s in wrapper_chain(strategy) if isinstance(s, AlphaSearch)), None)
    if search is None:
        return None
    return lambda server_round: (
        {"codec_alpha": search.chosen[server_round]} if server_round in search.chosen else {}
    )


def round_figures(
    *parts: Callable[[int], dict[str, Any]] | None,
) -> Callable[[int], dict[str, Any]] | None:
    """Several per-round figure functions as one (None when there are none)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    return lambda server_round: {k: v for p in present for k, v in p(server_round).items()}


def privacy_figures(
    cfg: RunConfig, budget: PrivacyBudget | None, partition_of: dict[int, int]
) -> Callable[[int], dict[str, Any]] | None:
    """Per-round privacy fields of the round record (None when DP is off)."""
    if cfg.dp.mode == "off":
        return None

    def figures(server_round: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if budget is not None:
            eps = {str(partition_of.get(n, n)): e for n, e in sorted(budget.epsilons().items())}
            out["epsilon_by_partition"] = eps
            out["max_epsilon"] = max(eps.values(), default=0.0)
        if cfg.dp.mode in ("central", "both"):
            out["central_epsilon"] = central_epsilon(cfg.dp, server_round)
        return out

    return figures


def discover_clients(grid: MeteredGrid, cfg: RunConfig) -> dict[int, dict[str, float]]:
    """Wait for ``num-clients`` nodes and ask each to describe itself (partition, DP plan)."""
    deadline = time.monotonic() + cfg.connect_timeout
    while len(nodes := sorted(grid.get_node_ids())) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise ClientDiscoveryError(
                f"only {len(nodes)} of num-clients={cfg.num_clients} nodes connected within "
                f"connect-timeout={cfg.connect_timeout} s"
            )
        time.sleep(0.2)
    # In batches: with 10,000 virtual nodes, all queries and replies in flight at once set the
    # server's peak memory (benchmarks/scale.py), which the allocator then keeps.
    replies: list[Message] = []
    for start in range(0, len(nodes), DISCOVERY_BATCH):
        ask = [
            Message(RecordDict({"config": ConfigRecord()}), node, "query.describe")
            for node in nodes[start : start + DISCOVERY_BATCH]
        ]
        replies += grid.send_and_receive(ask, timeout=max(deadline - time.monotonic(), 1.0))
    described: dict[int, dict[str, float]] = {}
    for reply in replies:
        if reply.has_error():
            raise ClientDiscoveryError(
                f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}"
            )
        metrics = reply.content.metric_records[METRICS_KEY]
        if _int(metrics, "num-partitions") != cfg.num_clients:
            raise ClientDiscoveryError(
                f"nodes were started with num-partitions={metrics['num-partitions']} but the run config "
                f"says num-clients={cfg.num_clients}; start as many SuperNodes as num-clients"
            )
        described[reply.metadata.src_node_id] = {
            k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))
        }
    if len(described) < cfg.num_clients:
        raise ClientDiscoveryError(f"only {len(described)} of {cfg.num_clients} nodes answered discovery")
    return described


def _int(metrics: MetricRecord, key: str) -> int:
    value = metrics[key]
    if not isinstance(value, (int, float)):
        raise ClientDiscoveryError(f"discovery reply has a non-scalar {key!r}: {value!r}")
    return int(value)


def _write_partition_stats(writer: ResultsWriter, cfg: RunConfig) -> None:
    import json

    stats = get_task(cfg).partition_stats(cfg)
    (writer.run_dir / "partitions.json").write_text(json.dumps(stats, indent=1))
