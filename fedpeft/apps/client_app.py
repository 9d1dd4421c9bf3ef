"""The Flower ClientApp: train the exchanged tensors of a cached model on this node's partition.

Per worker process the backbone is loaded once (``fedpeft.models.get_model``) and each
partition prepared once (by the run's task, ``fedpeft.tasks``); a message only swaps the exchanged tensors
in, trains, and sends them back.  What leaves the client is the exchanged tensors and
scalar metrics, nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from fedpeft import privacy
from fedpeft.codecs.flower import codec_client_mod
from fedpeft.config import ConfigValue, RunConfig
from fedpeft.models import FedModel, model_cache_info, quiet_libraries
from fedpeft.recovery.checkpoint import ClientStateStore
from fedpeft.recovery.crash import crash_point
from fedpeft.recovery.faults import failure_mod
from fedpeft.runtime import derive_seed
from fedpeft.tasks import Evaluation, Examples, get_task
from fedpeft.tasks.model import task_model
from fedpeft.training import train_local
from fedpeft.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, from_record, to_record

app = ClientApp()
LEDGER_STATE = "fedpeft.dp.ledger"


@functools.lru_cache(maxsize=4)
def _config(items: frozenset[tuple[str, ConfigValue]]) -> RunConfig:
    quiet_libraries()
    return RunConfig.from_run_config(dict(items))


def _setup(context: Context) -> tuple[RunConfig, int, int, FedModel, Examples]:
    cfg = _config(frozenset(context.run_config.items()))
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    task = get_task(cfg)
    model = task_model(cfg.for_partition(pid), task)
    return cfg, pid, num, model, task.client_train_set(cfg, pid, num)


def _local_dp(cfg: RunConfig) -> bool:
    return cfg.dp.mode in ("local", "both")


@functools.lru_cache(maxsize=1024)
def _plan(cfg: RunConfig, num_examples: int) -> privacy.RoundPlan:
    return privacy.plan_round(cfg.dp, cfg.train, num_examples, cfg.num_rounds)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Announce this node's partition (and warm the process's model cache).

    Discovery asks every node, so this counts the partition's rows rather than tokenizing
    them: with thousands of virtual clients, tokenizing each partition here was most of
    round 0, and the per-process cache of tokenized partitions keeps only the last 256.
    """
    cfg = _config(frozenset(context.run_config.items()))
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    task = get_task(cfg)
    model = task_model(cfg.for_partition(pid), task)
    num_examples = task.client_train_size(cfg, pid, num)
    metrics = MetricRecord(
        {
            "partition-id": pid,
            "num-partitions": num,
            "num-examples": num_examples,
            "num-trainable": model.num_trainable,
        }
    )
    if cfg.peft.method == "lora":  # strategies that serve mixed ranks send each node its own
        metrics["lora-rank"] = cfg.lora.rank_of(pid, cfg.seed)
    if _local_dp(cfg):  # what one round will cost, so the server can keep the budget
        for key, value in _plan(cfg, num_examples).to_metrics().items():
            metrics[key] = value
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def _initial_state(context: Context) -> dict[str, np.ndarray]:
    """The exchanged tensors as this node builds them from the run seed (the codec's round 1)."""
    cfg = _config(frozenset(context.run_config.items()))
    pid = int(context.node_config["partition-id"])
    return task_model(cfg.for_partition(pid), get_task(cfg)).initial_state


codec_mod = codec_client_mod(
    lambda context: _config(frozenset(context.run_config.items())).codec, _initial_state
)


def central_clipping_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Flower's client-side clipping mods, when central DP clips on the clients.

    It runs inside the codec mod: the update is clipped first, then encoded.
    """
    dp = _config(frozenset(context.run_config.items())).dp
    if dp.mode in ("central", "both") and dp.central_side == "client":
        mod = fixedclipping_mod if dp.central_clipping == "fixed" else adaptiveclipping_mod
        return mod(msg, context, call_next)
    return call_next(msg, context)


fault_mod = failure_mod(lambda context: _config(frozenset(context.run_config.items())))
RESTORED_STATE = "fedpeft.state.restored"


def state_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Keep this client's persistent state on disk, so a resumed run continues it.

    On the first message a Context sees, the latest state saved before this round is
    loaded (a fresh run has none); after training, the state (error-feedback residual,
    the codec's copy of the global, the privacy ledger) is saved for this round.
    """
    cfg = _config(frozenset(context.run_config.items()))
    store = ClientStateStore.for_client(
        cfg.results_dir, cfg.run_name, int(context.node_config["partition-id"])
    )
    if store is None:
        return call_next(msg, context)
    server_round = _round(msg)
    if RESTORED_STATE not in context.state.config_records:
        saved = store.load(up_to_round=server_round - 1)
        for key, record in (saved or {}).items():
            context.state[key] = record
        context.state[RESTORED_STATE] = ConfigRecord({"round": server_round})
    reply = call_next(msg, context)
    if not reply.has_error() and len(context.state) > 1:  # something besides the marker
        store.save(server_round, context.state)
    return reply


# Outermost first: client state on disk, injected failures, the codec, central-DP clipping.
@app.train(mods=[state_mod, fault_mod, codec_mod, central_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Load the global tensors (strictly), train locally, reply with the new tensors."""
    cfg, pid, _, model, data = _setup(context)
    model.load_exchange_state(from_record(msg.content.array_records[ARRAYS_KEY]))
    server_round = int(_round(msg))
    seed = derive_seed(cfg.seed, "train", server_round, pid)
    dp_metrics: dict[str, int | float | list[int] | list[float]] = {}
    if _local_dp(cfg):
        plan = _plan(cfg, len(data))
        result = privacy.train_private(
            model, data, cfg.train, plan, cfg.dp, seed, _proximal_mu(msg), task=get_task(cfg)
        )
        ledger = privacy.Ledger.from_columns(context.state.config_records.get(LEDGER_STATE))
        ledger.add(plan.noise_multiplier, plan.sample_rate, result.steps)
        context.state[LEDGER_STATE] = ConfigRecord({**ledger.to_columns()})
        dp_metrics = {
            **plan.to_metrics(),
            privacy.DP_EPSILON: ledger.epsilon(cfg.dp.delta, cfg.dp.accountant),
        }
    else:
        result = train_local(
            model, data, cfg.train, seed=seed, proximal_mu=_proximal_mu(msg), task=get_task(cfg)
        )
    crash_point("train")
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train_loss": result.loss,
            "steps": result.steps,
            # How many times this worker process has built a model: stays 1 across clients/rounds.
            "model-loads": model_cache_info().misses,
        }
        | dp_metrics
    )
    return Message(
        RecordDict({ARRAYS_KEY: to_record(model.exchange_state()), METRICS_KEY: metrics}),
        reply_to=msg,
    )


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Client-side evaluation of the global tensors on the local partition."""
    cfg, _, _, model, data = _setup(context)
    model.load_exchange_state(from_record(msg.content.array_records[ARRAYS_KEY]))
    result = get_task(cfg).evaluate(model, data, cfg.train.eval_batch_size)
    return Message(RecordDict({METRICS_KEY: _eval_metrics(len(data), result)}), reply_to=msg)


def _eval_metrics(num_examples: int, result: Evaluation) -> MetricRecord:
    """``num-examples``, ``eval_loss`` and ``eval_<name>`` per metric of the task (``eval_acc``: accuracy)."""
    names = {"accuracy": "acc"}
    metrics = MetricRecord({"num-examples": num_examples, "eval_loss": result.loss})
    for name, value in result.metrics.items():
        metrics[f"eval_{names.get(name, name)}"] = value
    return metrics


def _proximal_mu(msg: Message) -> float:
    """FedProx's ``mu``, which Flower's FedProx strategy sends in the train config."""
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    return float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]


def _round(msg: Message) -> int:
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    return int(config.get("server-round", 0))  # type: ignore[arg-type]
