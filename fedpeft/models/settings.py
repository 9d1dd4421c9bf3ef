"""The settings of the backbone (``model.*``) and of each PEFT method (``peft.method``,
``lora.*``, ``prompt.*``, ``prefix.*``, ``ia3.*``, ``vpt.*``, ``adapter.*``).

Light on purpose (no PyTorch): the run config imports it to know every key.  A method's
section is named by its registry entry (:func:`fedpeft.models.methods.register_method`,
``settings=``); a new method with settings declares its own :class:`~fedpeft.settings.Section`
next to its code, and nothing here changes.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

from fedpeft.settings import ConfigError, Section, choices, value_range


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
    # Recompute each layer's activations in the backward pass instead of keeping them
    # (about half again the time of a step with a frozen base, whose backward pass is one
    # forward's worth): "auto" does so for a causal LM whose training batches hold more than
    # CHECKPOINT_TOKENS tokens (train.batch-size x model.max-length), where activations,
    # not the model, would fill the memory (benchmarks/llm_memory), except under local
    # DP-SGD (Opacus' per-sample hooks would see each layer twice); true / false force it.
    gradient_checkpointing: str = field(default="auto", metadata=choices("auto", "true", "false"))
    # Images (task.name = "image-classification") are resized to image-size x image-size, a
    # multiple of the backbone's patch size; the position embeddings are interpolated to that
    # grid.  DINOv2-S/14 at 224 sees 16 x 16 patches; 56 (4 x 4) runs ~15x faster on a CPU.
    image_size: int = field(default=224, metadata=value_range(8, 2048))

    def check_run(self, run: Any) -> None:
        if self.gradient_checkpointing == "true" and run.dp.per_example():
            raise ConfigError(
                "config key 'model.gradient-checkpointing' = true cannot be used with local DP-SGD (dp.mode "
                "local/both): Opacus' per-sample hooks would see each recomputed layer twice; use 'auto' or false"
            )


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

    def check_run(self, run: Any) -> None:
        if run.peft.method != "lora" and (self.ranks or self.freeze_a):
            raise ConfigError(
                f"config keys 'lora.ranks' / 'lora.freeze-a' (or strategy 'ffa-lora') need "
                f"peft.method = 'lora', not {run.peft.method!r}"
            )

    def client_view(self, partition_id: int, run: Any) -> LoraConfig:
        """Client ``partition_id``'s LoRA: its own rank under :attr:`ranks`."""
        rank = self.rank_of(partition_id, run.seed)
        return self if rank == self.r else dataclasses.replace(self, r=rank)

    def server_view(self, run: Any) -> LoraConfig:
        """The server's template: the largest client rank."""
        rank = max(self.all_ranks(run.num_clients, run.seed))
        return self if rank == self.r else dataclasses.replace(self, r=rank)

    def heterogeneous(self, run: Any) -> bool:
        """Whether the clients of ``run`` train LoRA adapters of different ranks."""
        return len(set(self.all_ranks(run.num_clients, run.seed))) > 1

    def rank_of(self, partition_id: int, seed: int) -> int:
        """The LoRA rank of client ``partition_id`` (the same on the server and the client)."""
        return rank_of(self.ranks, self.r, partition_id, seed)

    def all_ranks(self, num_clients: int, seed: int) -> list[int]:
        """Every client's rank, by partition id."""
        return [self.rank_of(pid, seed) for pid in range(num_clients)]


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


# Above this many tokens per training batch, "auto" checkpoints a causal LM's activations:
# SmolLM2 LoRA at 8 x 192 = 1,536 tokens keeps ~2.1 GB of them (4.3 GB peak for the process,
# 2.6 GB checkpointed); at 8 x 96 = 768, ~1 GB (2.8 GB peak), where recomputing costs more
# time than the memory is worth.
CHECKPOINT_TOKENS = 1024


def checkpoints_activations(run: Any, kind: str) -> str:
    """``model.gradient-checkpointing`` of run config ``run`` resolved for a model loaded
    as ``kind``: "true" or "false" (see :data:`CHECKPOINT_TOKENS` for "auto")."""
    setting = run.model.gradient_checkpointing
    if setting != "auto":
        return str(setting)
    long_batches = run.train.batch_size * run.model.max_length > CHECKPOINT_TOKENS
    return "true" if kind == "causal-lm" and long_batches and not run.dp.per_example() else "false"
