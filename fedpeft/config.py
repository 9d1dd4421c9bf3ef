"""The one typed, validated configuration of a fedpeft run.

Flower hands every app a flat ``run_config`` (``[tool.flwr.app.config]`` in
``pyproject.toml``, nested tables flattened to ``section.key``, then overridden by
``flwr run -c`` or ``fedpeft run --set``).  :meth:`RunConfig.from_run_config` is the
only place in the code base that reads those raw keys: every other module receives
the frozen dataclasses below.

Validation happens before anything is trained: an unknown key names the key, suggests
the closest valid one and lists them all; a bad value names the key and the allowed
values or range.  Every dataclass checks its own fields in ``__post_init__`` (through
:func:`check_fields`), so one built in code (``TrainConfig(learning_rate=-1)``, in a
benchmark or a notebook) fails with the same message as the run config would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import tomllib

from fedpeft.codecs.registry import CODECS, settings_classes

# The settings base, re-exported: most modules import it from here.
from fedpeft.settings import (
    ConfigError as ConfigError,
)
from fedpeft.settings import (
    ConfigValue as ConfigValue,
)
from fedpeft.settings import (
    Section as Section,
)
from fedpeft.settings import (
    check_fields as check_fields,
)
from fedpeft.settings import (
    check_value as check_value,
)
from fedpeft.settings import (
    choices as choices,
)
from fedpeft.settings import (
    did_you_mean as did_you_mean,
)
from fedpeft.settings import (
    unknown_choice as unknown_choice,
)
from fedpeft.settings import (
    value_range as value_range,
)
from fedpeft.tasks.registry import TASKS


# ---------------------------------------------------------------------- ranks
def parse_ranks(spec: tuple[str, ...]) -> list[tuple[int, float]]:
    """``("4", "8")`` -> [(4, 0), (8, 0)] (a list); ``("4:0.5", "8:0.5")`` -> a distribution."""
    out: list[tuple[int, float]] = []
    for item in spec:
        rank, _, weight = item.partition(":")
        try:
            r, w = int(rank), float(weight) if weight else 0.0
        except ValueError:
            raise ConfigError(
                f"config key 'lora.ranks': cannot read {item!r}; give ranks ('4,8,16') "
                "or rank:probability pairs ('4:0.5,8:0.5')"
            ) from None
        if r < 1 or w < 0:
            raise ConfigError(f"config key 'lora.ranks': {item!r} needs a rank >= 1 and a probability >= 0")
        out.append((r, w))
    weighted = {bool(item.partition(":")[2]) for item in spec}
    if len(weighted) > 1:
        raise ConfigError("config key 'lora.ranks': mix of plain ranks and rank:probability pairs")
    if weighted == {True} and not math.isclose(sum(w for _, w in out), 1.0, abs_tol=1e-6):
        raise ConfigError(f"config key 'lora.ranks': probabilities sum to {sum(w for _, w in out)}, not 1")
    return out


def rank_of(spec: tuple[str, ...], default: int, partition_id: int, seed: int) -> int:
    """Client ``partition_id``'s rank under ``spec`` (see :attr:`LoraConfig.ranks`)."""
    parsed = parse_ranks(spec)
    if not parsed:
        return default
    if all(w == 0 for _, w in parsed):
        return parsed[partition_id % len(parsed)][0]
    # A draw that depends on (seed, partition) only, never on call order.
    rng = random.Random(f"fedpeft-lora-rank-{seed}-{partition_id}")
    return rng.choices([r for r, _ in parsed], weights=[w for _, w in parsed])[0]


@dataclass(frozen=True)
class ModelConfig(Section, section="model"):
    """Which pretrained backbone to load and how to tokenize for it."""

    # "minilm" resolves the packaged all-MiniLM-L6-v2 folder; anything else is passed
    # to ``from_pretrained`` as a local folder or a hub name.
    name: str = "minilm"
    # Tokens per example (prompt + response for a causal LM; longer inputs are truncated).
    max_length: int = field(default=64, metadata=value_range(8, 4096))
    # Dtype of the frozen backbone: "auto" is bfloat16 on a GPU that supports it, else
    # float32 (CPUs are slow in bfloat16); the trained tensors stay float32.
    dtype: str = field(default="auto", metadata=choices("auto", "float32", "bfloat16"))
    # Recompute activations in the backward pass instead of keeping them (less memory,
    # about a third more compute): for long sequences on a small machine.
    gradient_checkpointing: bool = False
    # Images (task.name = "image-classification") are resized to image-size x image-size, a
    # multiple of the backbone's patch size; the position embeddings are interpolated to that
    # grid.  DINOv2-S/14 at 224 sees 16 x 16 patches; 56 (4 x 4) runs ~15x faster on a CPU.
    image_size: int = field(default=224, metadata=value_range(8, 2048))


@dataclass(frozen=True)
class LoraConfig(Section, section="lora"):
    """Fields of HF peft's ``LoraConfig`` reachable from the run config."""

    r: int = field(default=8, metadata=value_range(1, 4096))
    alpha: float = field(default=16.0, metadata=value_range(0.0, lo_open=True))
    dropout: float = field(default=0.05, metadata=value_range(0.0, 0.99))
    # Module names LoRA wraps: "auto" is peft's default for the architecture (query,value
    # for BERT; q_proj,v_proj for Llama), "all-linear" every linear layer but the output one.
    target_modules: tuple[str, ...] = ("auto",)
    # FFA-LoRA (Sun et al., 2024): keep A at its shared seeded initialisation; only B trains
    # and travels.  Implied by strategy.name = "ffa-lora".
    freeze_a: bool = False
    # Heterogeneous ranks: "" (every client uses r), a list cycled over partition ids
    # ("4,8,16"; give num-clients entries for one per client), or a distribution
    # ("4:0.5,8:0.3,16:0.2", drawn per partition with the run's seed).  Needs a strategy
    # that serves mixed ranks (flexlora, flora).
    ranks: tuple[str, ...] = ()

    def _check(self) -> None:
        if not self.target_modules:
            raise ConfigError("config key 'lora.target-modules' must name at least one module")
        parse_ranks(self.ranks)  # raises on a malformed list or distribution

    def rank_of(self, partition_id: int, seed: int) -> int:
        """The LoRA rank of client ``partition_id`` (the same on the server and the client)."""
        return rank_of(self.ranks, self.r, partition_id, seed)

    def all_ranks(self, num_clients: int, seed: int) -> list[int]:
        """Every client's rank, by partition id."""
        return [self.rank_of(pid, seed) for pid in range(num_clients)]


def _task_names() -> tuple[str, ...]:
    return tuple(TASKS)


@dataclass(frozen=True)
class TaskConfig(Section, section="task"):
    """Which learning task the run trains (``fedpeft.tasks``): data formatting, loss, metrics."""

    name: str = field(default="sequence-classification", metadata={"registry": _task_names})


@dataclass(frozen=True)
class PeftConfig(Section, section="peft"):
    """Which parameter-efficient method trains (and travels); see ``fedpeft.models.methods``."""

    method: str = "lora"


@dataclass(frozen=True)
class PromptConfig(Section, section="prompt"):
    """Prompt tuning (Lester et al., 2021) through HF peft's ``PromptTuningConfig``."""

    num_virtual_tokens: int = field(default=10, metadata=value_range(1, 512))


@dataclass(frozen=True)
class PrefixConfig(Section, section="prefix"):
    """Prefix tuning (Li & Liang, 2021) through HF peft's ``PrefixTuningConfig``."""

    num_virtual_tokens: int = field(default=10, metadata=value_range(1, 512))
    # Reparameterise the prefix through an MLP while training (more parameters travel).
    projection: bool = False


@dataclass(frozen=True)
class IA3Config(Section, section="ia3"):
    """(IA)^3 (Liu et al., 2022) through HF peft's ``IA3Config``; "" = peft's defaults for the model."""

    target_modules: tuple[str, ...] = ()
    feedforward_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class VptConfig(Section, section="vpt"):
    """Visual prompt tuning (Jia et al., 2022), FedPEFT's "prompt" for vision transformers."""

    # Learnable tokens inserted after the class token.
    num_tokens: int = field(default=10, metadata=value_range(1, 512))
    # "shallow": one set, at the input of the first layer; "deep": a new set at every layer.
    depth: str = field(default="shallow", metadata=choices("shallow", "deep"))


@dataclass(frozen=True)
class AdapterConfig(Section, section="adapter"):
    """Bottleneck adapters (Houlsby et al., 2019), the "adapter" of FedPEFT."""

    # Width of the down-projection.
    bottleneck: int = field(default=32, metadata=value_range(1, 4096))
    # After the attention output projection, the feed-forward output projection, or both.
    placement: str = field(default="both", metadata=choices("both", "attention", "ffn"))
    activation: str = field(default="gelu", metadata=choices("gelu", "relu", "tanh"))


@dataclass(frozen=True)
class DataConfig(Section, section="data"):
    """Dataset source, server test split and the non-IID partitioning of the rest."""

    # "bbc-news", "wordnet-nouns", a local .csv/.jsonl/.json/.parquet file, or a hub name.
    dataset: str = "bbc-news"
    text_column: str = "text"
    label_column: str = "label"
    # Keep only the N most frequent classes (0 = all); WordNet has 26 supersenses.
    num_classes: int = field(default=0, metadata=value_range(0))
    # Seeded subsample of the whole dataset before splitting (0 = all); for tiny runs.
    max_examples: int = field(default=0, metadata=value_range(0))
    test_fraction: float = field(default=0.2, metadata=value_range(0.0, 0.9, lo_open=True))
    max_test_examples: int = field(default=0, metadata=value_range(0))
    # Examples cut from the server's held-out split as its validation set, for what the
    # server tunes (server.step-search); the test set is the rest.  0 = 20% of the held-out
    # split when the server tunes something, else none (every example is a test example).
    validation_examples: int = field(default=0, metadata=value_range(0))
    partitioner: str = field(
        default="dirichlet", metadata=choices("iid", "dirichlet", "pathological", "shard", "natural")
    )
    # Natural partitioning: the column whose values name the clients (one client per
    # distinct value; a local file's user id, say, or "label" for one class per client).
    partition_column: str = ""
    # Dirichlet concentration: small = more skewed label distributions.
    alpha: float = field(default=0.5, metadata=value_range(0.0, lo_open=True))
    # Pathological partitioning: classes held by each client.
    classes_per_client: int = field(default=2, metadata=value_range(1))
    # Shard partitioning: label-sorted shards per client.
    shards_per_client: int = field(default=2, metadata=value_range(1))

    def _check(self) -> None:
        if self.partitioner == "natural" and not self.partition_column:
            raise ConfigError(
                "config key 'data.partition-column' must name the column that identifies the clients "
                "when data.partitioner = 'natural'"
            )


@dataclass(frozen=True)
class LMConfig(Section, section="lm"):
    """Causal-LM instruction tuning (``task.name = "causal-lm"``): formatting and generation."""

    # Format prompts with the tokenizer's chat template (when it has one); otherwise, or
    # when false, as "### Instruction:\n...\n\n### Response:\n".
    chat_template: bool = True
    # Held-out prompts answered by greedy generation at every evaluation, for exact match
    # (the round's "accuracy"); 0 = no generation (exact match is then not measured).
    generate_examples: int = field(default=64, metadata=value_range(0))
    max_new_tokens: int = field(default=16, metadata=value_range(1, 1024))
    # Pack several short examples into each row of max-length tokens (each attends only
    # to itself: block-diagonal causal masks, positions restarting per example).
    packing: bool = False


@dataclass(frozen=True)
class TrainConfig(Section, section="train"):
    """Local training on each client (and evaluation batch size on the server)."""

    local_epochs: int = field(default=1, metadata=value_range(1))
    # Cap on optimizer steps per client per round (0 = no cap, run the epochs).
    max_steps: int = field(default=0, metadata=value_range(0))
    batch_size: int = field(default=16, metadata=value_range(1))
    learning_rate: float = field(default=2e-3, metadata=value_range(0.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=value_range(0.0))
    # The clients' optimizer (fresh each round): "adamw", or "sgd" (plain SGD: the update
    # stays proportional to the gradient, which keeps clients' updates aligned under
    # user-level clipping, as in DP-FedAvg; Adam's per-coordinate steps are not).
    optimizer: str = field(default="adamw", metadata=choices("adamw", "sgd"))
    eval_batch_size: int = field(default=64, metadata=value_range(1))


def _codec_names() -> tuple[str, ...]:
    return tuple(CODECS)


def _downlink_names() -> tuple[str, ...]:
    return ("same", *_codec_names())


def _codec_defaults() -> tuple[tuple[str, Any], ...]:
    return tuple((name, cls()) for name, cls in settings_classes().items())


@dataclass(frozen=True)
class CodecConfig(Section, section="codec"):
    """How updates travel (``fedpeft.codecs``): a registered codec each way, error feedback,
    and each codec's own settings (``codec.<name>.<key>``, in :attr:`options`)."""

    # Client -> server: a registered codec ("none" = dense float32, Flower's own arrays).
    name: str = field(default="none", metadata={"registry": _codec_names})
    # Fraction of entries a sparsifying codec keeps: k = round(density * n).
    density: float = field(default=0.1, metadata=value_range(0.0, 1.0, lo_open=True))
    # Keep what compression lost on each client and add it to its next update.
    error_feedback: bool = True
    # Server -> client: a registered codec applied to the change of the global model, or
    # "same" (the uplink's codec: "none" stays dense, "compeft" codes both ways).
    downlink: str = field(default="same", metadata={"registry": _downlink_names})
    # Density of the downlink codec (0 = the uplink's).  The downlink carries the change of
    # the global model: the union of the clients' sparse updates, denser than any one of
    # them.  A sparser downlink leaves most of that change on the server (its error
    # feedback), the clients train from a copy that falls behind, and the server's model
    # drifts from the points the updates were computed at (measured: server test loss
    # rising while the clients' training loss falls, benchmarks/results/frontier_ablation_*).
    # At density 1 ComPEFT is one sign bit per entry and a scale per tensor, no positions.
    downlink_density: float = field(default=1.0, metadata=value_range(0.0, 1.0))
    # The server keeps what its downlink lost and sends it later (else it is dropped).
    downlink_error_feedback: bool = True
    # Denser early rounds: the density falls linearly from warmup-density to density over
    # warmup-rounds rounds (0 = constant density).
    warmup_rounds: int = field(default=0, metadata=value_range(0))
    warmup_density: float = field(default=1.0, metadata=value_range(0.0, 1.0, lo_open=True))
    # Tensors with at most this many entries (a classification head, biases) travel through
    # small-codec instead (0 = every tensor through the codec).
    small_tensors: int = field(default=0, metadata=value_range(0))
    small_codec: str = field(default="fp16", metadata={"registry": _codec_names})
    # Each codec's own settings, name -> frozen dataclass (codec.<name>.<key> run-config keys).
    options: tuple[tuple[str, Any], ...] = field(default_factory=_codec_defaults)

    def _check(self) -> None:
        for name, settings in self.options:  # each codec's own section (codec.<name>.<key>)
            check_fields(settings, f"codec.{name}")

    def settings(self) -> dict[str, Any]:
        """Codec name -> its settings object."""
        return dict(self.options)

    def density_at(self, server_round: int, downlink: bool = False) -> float:
        """The density of round ``server_round`` (1-based) under the warm-up schedule."""
        final = self.downlink_density if downlink and self.downlink_density > 0 else self.density
        if self.warmup_rounds <= 0 or server_round > self.warmup_rounds:
            return final
        frac = (server_round - 1) / self.warmup_rounds
        return max(final, self.warmup_density + frac * (final - self.warmup_density))

    def active(self) -> bool:
        """Whether anything differs from dense float32 both ways."""
        return self.name != "none" or self.downlink_codec != "none"

    @property
    def downlink_codec(self) -> str:
        """The downlink's registered codec (``same`` resolved)."""
        return self.name if self.downlink == "same" else self.downlink


@dataclass(frozen=True)
class ServerConfig(Section, section="server"):
    """The server's step, for every run, coded or dense (:mod:`fedpeft.server.step`).

    The aggregate the strategy returns becomes the update ``u_t = aggregate - global``;
    the server then steps ``global += scale_t * learning-rate * v_t`` with
    ``v_t = momentum * v_{t-1} + u_t`` (server momentum: FedAvgM, Hsu et al. 2019).  These
    are settings of the aggregation, not of a codec, so dense LoRA gets the same help as a
    compressed run (the frontier compares them at equal footing).
    """

    # How a sparse update's coordinates are averaged (fedpeft.server.transport.over_senders):
    # "senders" divides each coordinate by the (example-weighted) clients whose payload
    # carried it; "bounded" (the default, data-free) does the same, then shortens the mean to
    # the clients' mean update length when it is longer; "all" divides by every client, as
    # FedAvg does with the zeros a top-k codec leaves.  All three are the same for a dense
    # codec (every client sends every coordinate, and a dense mean is never longer than the
    # mean length), so a dense run gets the same server setting by construction.  Chosen on
    # BBC News (benchmarks/results/frontier_ablation_bbc-news.md).
    aggregate: str = field(default="bounded", metadata=choices("bounded", "senders", "all"))
    learning_rate: float = field(default=1.0, metadata=value_range(0.0, lo_open=True))
    momentum: float = field(default=0.0, metadata=value_range(0.0, 0.999))
    # Scales of the step tried each round on the server's validation split (needs labelled
    # data on the server: data.validation-examples); the lowest validation loss wins and is
    # recorded as step_scale.  "" = no search (scale 1): the default, which needs no data.
    step_search: tuple[str, ...] = ()

    def _check(self) -> None:
        self.search_candidates()  # raises on a malformed list

    def search_candidates(self) -> tuple[float, ...]:
        """The step scales of server.step-search, as numbers (empty: no search)."""
        try:
            values = tuple(float(v) for v in self.step_search)
        except ValueError:
            raise ConfigError(
                f"config key 'server.step-search': cannot read {','.join(self.step_search)!r}; "
                "give positive numbers, comma-separated ('1,2,4,8')"
            ) from None
        if any(not (v > 0 and math.isfinite(v)) for v in values):
            raise ConfigError("config key 'server.step-search': every candidate must be a positive number")
        return values

    def plain(self) -> bool:
        """Whether the step is the aggregate itself (no scaling, momentum or search)."""
        return self.learning_rate == 1.0 and self.momentum == 0.0 and not self.step_search


@dataclass(frozen=True)
class DPConfig(Section, section="dp"):
    """Differential privacy: sample-level DP-SGD on clients (Opacus) and/or user-level central DP.

    ``local``: every client trains with DP-SGD (Abadi et al., 2016) and keeps a privacy
    ledger; ``central``: Flower's clipping + noising wrappers (McMahan et al., 2018;
    Andrew et al., 2021 for adaptive clipping); ``both``.
    """

    mode: str = field(default="off", metadata=choices("off", "local", "central", "both"))
    # Local DP-SGD noise multiplier; ignored when target-epsilon > 0.
    noise_multiplier: float = field(default=1.0, metadata=value_range(0.0))
    # > 0: choose each client's noise so that all num-rounds rounds spend this epsilon.
    target_epsilon: float = field(default=0.0, metadata=value_range(0.0))
    # Per-sample gradient clipping norm of local DP-SGD.
    max_grad_norm: float = field(default=1.0, metadata=value_range(0.0, lo_open=True))
    delta: float = field(default=1e-5, metadata=value_range(0.0, 1.0, lo_open=True))
    accountant: str = field(default="rdp", metadata=choices("rdp", "prv", "gdp"))
    # > 0: a client whose epsilon would pass this in the next round sits it out (recorded).
    epsilon_budget: float = field(default=0.0, metadata=value_range(0.0))
    # Local DP-SGD: how Opacus gets each example's gradient.  "hooks" (default) and
    # "functorch" materialise every per-sample gradient (memory: batch x trainable params);
    # "ghost" (ghost clipping, Li et al., 2022) computes only their norms and clips through
    # a second backward pass (less memory for wide layers, more compute).  Not every PEFT
    # method runs in every mode: a bad pair is refused naming the modes that work.
    grad_sample_mode: str = field(default="hooks", metadata=choices("hooks", "functorch", "ghost"))
    # Local DP-SGD: > 0 splits each logical batch (Poisson, expected size train.batch-size)
    # into physical batches of at most this many examples (Opacus' BatchMemoryManager):
    # large logical batches in bounded memory; steps, noise and accounting stay logical.
    max_physical_batch_size: int = field(default=0, metadata=value_range(0))
    # Central DP: clipping of each client's update on the server or on the client.
    central_side: str = field(default="server", metadata=choices("server", "client"))
    central_clipping: str = field(default="fixed", metadata=choices("fixed", "adaptive"))
    central_noise_multiplier: float = field(default=1.0, metadata=value_range(0.0))
    # Fixed clipping norm, or the initial one for adaptive clipping.
    central_clipping_norm: float = field(default=1.0, metadata=value_range(0.0, lo_open=True))
    # > 0: choose the central noise multiplier so that num-rounds releases spend this
    # user-level epsilon (under the bound of the run's sampling and mechanism).
    central_target_epsilon: float = field(default=0.0, metadata=value_range(0.0))
    # How the noise is released: "gaussian" (DP-FedAvg, noise on every round's aggregate) or
    # "tree" (DP-FTRL, Kairouz et al., 2021: noisy prefix sums by tree aggregation, no
    # sampling amplification needed).  The server wing's registry holds the same names.
    central_mechanism: str = field(default="gaussian", metadata=choices("gaussian", "tree"))
    # DP-FTRL: rounds per tree before it restarts from the current model (0: one tree for
    # the whole run); every client takes part at most once per tree.
    tree_restart_rounds: int = field(default=0, metadata=value_range(0))


@dataclass(frozen=True)
class FailureConfig(Section, section="failures"):
    """Injected client failures (``fedpeft.recovery.faults``): per sampled client and round, seeded."""

    # The client raises (an error reply).
    raise_probability: float = field(default=0.0, metadata=value_range(0.0, 1.0))
    # The client is stuck past round-timeout and does not train that round (no reply in time).
    hang_probability: float = field(default=0.0, metadata=value_range(0.0, 1.0))
    # The client trains, then crashes before replying (no reply in time; its state as before).
    drop_probability: float = field(default=0.0, metadata=value_range(0.0, 1.0))

    def _check(self) -> None:
        if self.raise_probability + self.hang_probability + self.drop_probability > 1.0:
            raise ConfigError("config keys 'failures.*-probability' must sum to at most 1")

    def active(self) -> bool:
        return self.raise_probability + self.hang_probability + self.drop_probability > 0


@dataclass(frozen=True)
class StrategyConfig(Section, section="strategy"):
    """Server aggregation: a registered name or an importable ``module:Class``.

    ``kwargs`` holds the strategy's own settings as ``name=value`` pairs, comma-separated
    (``strategy.kwargs = "proximal-mu=0.01"`` reaches the constructor as
    ``proximal_mu=0.01``); values are read as TOML scalars (numbers, true/false, else
    text).  One string key, because Flower refuses run-config keys that ``pyproject.toml``
    does not declare.  Which names a strategy accepts is checked when it is built, before
    the run starts.
    """

    name: str = "fedavg"
    kwargs: tuple[str, ...] = ()
    # > 0: a client update (reply - what it was sent) with a larger L2 norm is rejected
    # before aggregation and recorded; NaN / Inf, wrong names or shapes always are.
    max_update_norm: float = field(default=0.0, metadata=value_range(0.0))

    def _check(self) -> None:
        parse_kwargs(self.kwargs)  # raises on a malformed pair

    def kwarg_dict(self) -> dict[str, ConfigValue]:
        """The settings as constructor keyword arguments (dashes become underscores)."""
        return parse_kwargs(self.kwargs)


def parse_kwargs(items: tuple[str, ...]) -> dict[str, ConfigValue]:
    """``("proximal-mu=0.01", "name=x")`` -> ``{"proximal_mu": 0.01, "name": "x"}``."""
    out: dict[str, ConfigValue] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.replace("-", "_").isidentifier():
            raise ConfigError(
                f"config key 'strategy.kwargs': cannot read {item!r}; give name=value pairs, "
                "comma-separated (e.g. 'proximal-mu=0.01,server-learning-rate=0.5')"
            )
        out[_attr(key)] = _scalar(raw.strip())
    return out


def _scalar(raw: str) -> ConfigValue:
    value = toml_value(raw)
    return value if isinstance(value, (bool, int, float, str)) else raw


def toml_value(raw: str) -> object:
    """``raw`` read as a TOML value (``4``, ``0.5``, ``true``, ``"x"``, ``[1, 2]``), else ``raw`` itself.

    The one reader of command-line and ``strategy.kwargs`` values: an unquoted word stays text.
    """
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_set(items: list[str]) -> dict[str, ConfigValue]:
    """``key=value`` pairs (``--set``); values parse as TOML scalars, else as plain strings."""
    out: dict[str, ConfigValue] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        value = toml_value(raw)
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"--set {key}: only scalars are allowed, got {raw!r}")
        out[key.strip()] = value
    return out


@dataclass(frozen=True)
class RunConfig(Section):
    """Everything a run needs, validated; built once by :meth:`from_run_config` (or in code:
    the same checks run, the sections' own and those across sections)."""

    seed: int = 0
    num_rounds: int = field(default=5, metadata=value_range(1))
    num_clients: int = field(default=10, metadata=value_range(1))
    fraction_train: float = field(default=1.0, metadata=value_range(0.0, 1.0, lo_open=True))
    # "fixed": fraction-train x num-clients clients per round (at least min-train-clients),
    # drawn without replacement; "poisson": each client joins each round independently with
    # probability fraction-train (what amplified user-level DP accounting assumes).
    client_sampling: str = field(default="fixed", metadata=choices("fixed", "poisson"))
    min_train_clients: int = field(default=2, metadata=value_range(1))
    # A round with fewer usable replies than this keeps the global model as it was.
    min_replies: int = field(default=1, metadata=value_range(1))
    fraction_evaluate: float = field(default=0.0, metadata=value_range(0.0, 1.0))
    round_timeout: float = field(default=3600.0, metadata=value_range(0.0, lo_open=True))
    # "auto" picks cuda > mps > cpu; or name one ("cpu", "cuda", "cuda:1", "mps").
    device: str = "auto"
    # Parent folder of the per-run results folder; relative paths resolve against
    # the directory the launcher was started from.
    results_dir: str = "results"
    # Name of this run's folder under results_dir ("" = timestamp + config hash).
    run_name: str = ""
    # Continue the run in results-dir/run-name from its last checkpoint (`fedpeft run --resume`).
    resume: bool = False
    # Seconds the server waits for all clients to announce themselves.
    connect_timeout: float = field(default=600.0, metadata=value_range(0.0, lo_open=True))
    task: TaskConfig = field(default_factory=TaskConfig)  # its default reads the task registry
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    lora: LoraConfig = LoraConfig()
    prompt: PromptConfig = PromptConfig()
    prefix: PrefixConfig = PrefixConfig()
    ia3: IA3Config = IA3Config()
    vpt: VptConfig = VptConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    lm: LMConfig = LMConfig()
    train: TrainConfig = TrainConfig()
    codec: CodecConfig = field(default_factory=CodecConfig)  # its default reads the codec registry
    dp: DPConfig = DPConfig()
    strategy: StrategyConfig = StrategyConfig()
    server: ServerConfig = ServerConfig()
    failures: FailureConfig = FailureConfig()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_run_config(cls, raw: Mapping[str, ConfigValue]) -> RunConfig:
        """Build and validate from Flower's flat run config (``section.key`` names).

        Keys not given keep their defaults; an unknown key or a bad value raises
        :class:`ConfigError` naming it.  Each value is checked as it is read (the first bad
        key in the given order is the one reported), with the function the dataclasses'
        ``__post_init__`` use; what spans fields is checked as the objects are built.
        """
        schema = config_schema()
        sections: dict[str, dict[str, Any]] = {}
        nested: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in schema:
                raise ConfigError(
                    f"unknown config key '{key}'{did_you_mean(key, schema)} "
                    f"(valid keys: {', '.join(sorted(schema))})"
                )
            owner, fld = schema[key]
            converted = _convert(key, fld, value)
            if owner is cls:
                top[fld.name] = converted
            elif key.count(".") == 2:  # codec.<name>.<key>: that codec's own section
                nested.setdefault(key.split(".")[1], {})[fld.name] = converted
            else:
                sections.setdefault(_section_of(owner), {})[fld.name] = converted
        if nested:
            options = dict(CodecConfig().options)
            for name, values in nested.items():
                options[name] = dataclasses.replace(options[name], **values)
            sections.setdefault("codec", {})[NESTED_FIELD] = tuple(options.items())
        # FFA-LoRA is LoRA with A frozen: the strategy name implies it (a ``false`` from the
        # pyproject defaults cannot be told apart from one a user wrote, so it does not veto).
        if sections.get("strategy", {}).get("name") == "ffa-lora":
            sections.setdefault("lora", {})["freeze_a"] = True
        for section, values in sections.items():
            top[section] = dataclasses.replace(getattr(cls(), section), **values)
        return cls(**top)

    def _check(self) -> None:
        """Checks across sections (each section checked itself when it was built)."""
        if self.min_train_clients > self.num_clients:
            raise ConfigError(
                f"config key 'min-train-clients' ({self.min_train_clients}) must not exceed "
                f"'num-clients' ({self.num_clients})"
            )
        f = self.failures
        if (f.hang_probability or f.drop_probability) and self.round_timeout > 600:
            raise ConfigError(
                f"config keys 'failures.hang-probability' / 'failures.drop-probability' make clients stay "
                f"away past 'round-timeout' ({self.round_timeout:g} s): set round-timeout to at most 600"
            )
        if self.peft.method != "lora" and (self.lora.ranks or self.lora.freeze_a):
            raise ConfigError(
                f"config keys 'lora.ranks' / 'lora.freeze-a' (or strategy 'ffa-lora') need "
                f"peft.method = 'lora', not {self.peft.method!r}"
            )
        if self.lm.packing:
            self._check_packing()
        self._check_user_dp()
        dev = self.device
        if not (dev in ("auto", "cpu", "mps", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(
                f"config key 'device': unknown value {dev!r} (valid: auto, cpu, cuda, cuda:N, mps)"
            )

    def _check_user_dp(self) -> None:
        dp = self.dp
        central = dp.mode in ("central", "both")
        if not central and (dp.central_target_epsilon > 0 or dp.central_mechanism != "gaussian"):
            raise ConfigError(
                "config keys 'dp.central-target-epsilon' / 'dp.central-mechanism' need dp.mode = 'central' "
                f"or 'both', not {dp.mode!r}"
            )
        if not central or dp.central_mechanism != "tree":
            return
        if self.client_sampling != "fixed":
            raise ConfigError(
                "config key 'dp.central-mechanism' = 'tree' (DP-FTRL) picks each round's clients itself "
                "(each at most once per tree); set client-sampling = 'fixed'"
            )
        if (dp.central_side, dp.central_clipping) != ("server", "fixed"):
            raise ConfigError(
                "config key 'dp.central-mechanism' = 'tree' clips on the server with a fixed norm; set "
                "dp.central-side = 'server' and dp.central-clipping = 'fixed'"
            )
        if self.strategy.name != "fedavg":
            raise ConfigError(
                "config key 'dp.central-mechanism' = 'tree' sets the server update itself (the noisy "
                f"prefix sum of the mean clipped updates); use strategy.name = 'fedavg', not {self.strategy.name!r}"
            )
        cohort = self.fixed_cohort()
        per_tree = dp.tree_restart_rounds or self.num_rounds
        if cohort * per_tree > self.num_clients:
            raise ConfigError(
                f"config key 'dp.tree-restart-rounds': a tree of {per_tree} rounds x {cohort} clients per round "
                f"needs {cohort * per_tree} distinct clients (each takes part once per tree), but num-clients is "
                f"{self.num_clients}; restart the tree every {max(1, self.num_clients // cohort)} rounds or fewer"
            )

    def _check_packing(self) -> None:
        if self.task.name != "causal-lm":
            raise ConfigError(
                f"config key 'lm.packing' needs task.name = 'causal-lm', not {self.task.name!r}"
            )
        if self.peft.method in ("prompt", "prefix"):
            raise ConfigError(
                f"config key 'lm.packing' cannot pack examples for peft.method {self.peft.method!r}: its "
                "virtual tokens would be shared by every example of a row"
            )
        if self.dp.mode in ("local", "both"):
            raise ConfigError(
                "config key 'lm.packing' cannot be used with local DP-SGD (dp.mode local/both): a packed row "
                "holds several examples, and DP-SGD clips per row, so one example's privacy would not be bounded"
            )

    def fixed_cohort(self) -> int:
        """Clients per round under fixed-size sampling (Flower's FedAvg rule)."""
        return max(int(self.num_clients * self.fraction_train), self.min_train_clients)

    def server_tunes(self) -> bool:
        """Whether the server tunes anything on a validation split (server.step-search)."""
        return bool(self.server.step_search)

    def for_partition(self, partition_id: int) -> RunConfig:
        """This config as client ``partition_id`` builds its model (its own LoRA rank)."""
        rank = self.lora.rank_of(partition_id, self.seed)
        return (
            self
            if rank == self.lora.r
            else dataclasses.replace(self, lora=dataclasses.replace(self.lora, r=rank))
        )

    def for_server(self) -> RunConfig:
        """This config as the server builds its template: the largest client rank."""
        rank = max(self.lora.all_ranks(self.num_clients, self.seed))
        return (
            self
            if rank == self.lora.r
            else dataclasses.replace(self, lora=dataclasses.replace(self.lora, r=rank))
        )

    def heterogeneous_ranks(self) -> bool:
        """Whether clients train LoRA adapters of different ranks."""
        return len(set(self.lora.all_ranks(self.num_clients, self.seed))) > 1

    def to_run_config(self) -> dict[str, ConfigValue]:
        """The flat Flower run config that rebuilds this object (round trip)."""
        out: dict[str, ConfigValue] = {}
        codec_options = self.codec.settings()
        for key, (owner, fld) in config_schema().items():
            if key.count(".") == 2:
                obj: Any = codec_options[key.split(".")[1]]
            else:
                obj = self if owner is RunConfig else getattr(self, _section_of(owner))
            value = getattr(obj, fld.name)
            out[key] = ",".join(value) if isinstance(value, tuple) else value
        return out


def with_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A results folder's saved run config with every key it lacks at its default.

    A folder written before a key existed ran with that key's default (a new key never
    changes what the old runs did), so sweeps and reports compare it as such.
    """
    defaults = json.loads(json.dumps(RunConfig().to_run_config(), default=str))
    return defaults | dict(saved)


# ---------------------------------------------------------------------- schema
_SECTIONS: dict[str, type] = {}


def _section_of(owner: type) -> str:
    return next(name for name, cls in _SECTIONS.items() if cls is owner)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _attr(key: str) -> str:
    return key.replace("-", "_")


def config_schema() -> dict[str, tuple[type, dataclasses.Field[Any]]]:
    """Every valid flat key -> (dataclass that owns it, its field)."""
    if not _SECTIONS:
        hints = typing.get_type_hints(RunConfig)
        for f in dataclasses.fields(RunConfig):
            if dataclasses.is_dataclass(hints[f.name]):
                _SECTIONS[f.name] = hints[f.name]
    schema: dict[str, tuple[type, dataclasses.Field[Any]]] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name not in _SECTIONS:
            schema[_key(f.name)] = (RunConfig, f)
    for section, owner in _SECTIONS.items():
        for f in dataclasses.fields(owner):
            if f.name != NESTED_FIELD:
                schema[f"{section}.{_key(f.name)}"] = (owner, f)
    for name, owner in _nested_sections().items():
        for f in dataclasses.fields(owner):
            schema[f"codec.{name}.{_key(f.name)}"] = (owner, f)
    return schema


NESTED_FIELD = "options"  # CodecConfig.options: one settings section per registered codec


def _nested_sections() -> dict[str, type]:
    """Registered codec name -> its settings dataclass (keys ``codec.<name>.<key>``)."""
    return settings_classes()


def _convert(key: str, fld: dataclasses.Field[Any], value: object) -> Any:
    """Read one raw run-config value: a comma-separated string for a tuple field, then the
    checks every construction runs (:func:`check_value`)."""
    if isinstance(fld.default, tuple):
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a comma-separated string, got {value!r}")
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return check_value(key, fld, value)
