"""Shared fixtures: tiny real configurations (real MiniLM, real BBC News, few examples)."""

from __future__ import annotations

import os

import pytest

# Every test that starts Ray keeps it on loopback and quiet (see fedpeft.running.launch).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray workers at the suite's own priority, also where a test starts Ray itself (`flwr run`,
# `ray start`): at Ray's default nice 15 they starve beside any busy process.
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedpeft.config import RunConfig
from fedpeft.models import quiet_libraries

quiet_libraries()

# A run small enough for a unit test: 240 BBC articles, 32 tokens, 3 clients, 2 rounds.
TINY: dict[str, bool | int | float | str] = {
    "num-clients": 3,
    "num-rounds": 2,
    "min-train-clients": 2,
    "device": "cpu",
    "model.max-length": 32,
    "data.max-examples": 240,
    "data.test-fraction": 0.25,
    "data.partitioner": "iid",
    "train.batch-size": 8,
    "train.max-steps": 6,
    "train.learning-rate": 0.003,
}

# The same for the causal-LM task: the packaged SmolLM2-135M-Instruct, BBC News as a
# question, plain prompts (the chat template's system turn alone is ~30 tokens), 48 tokens.
TINY_LLM: dict[str, bool | int | float | str] = TINY | {
    "task.name": "causal-lm",
    "model.name": "smollm2-135m",
    "model.max-length": 48,
    "lm.chat-template": False,
    "lm.generate-examples": 4,
    "lm.max-new-tokens": 4,
    "data.max-test-examples": 16,
    "train.batch-size": 4,
    "train.max-steps": 2,
}


# The same for the image-classification task: the packaged DINOv2-S/14 on 240 Fashion-MNIST
# images at 28 px (a 2 x 2 patch grid: five tokens per image).
TINY_VISION: dict[str, bool | int | float | str] = TINY | {
    "task.name": "image-classification",
    "model.name": "dinov2-small",
    "model.image-size": 28,
    "data.dataset": "fashion-mnist",
}


def tiny_for(model_kind: str) -> dict[str, bool | int | float | str]:
    """The tiny overrides for a task whose model is ``model_kind``."""
    return {"causal-lm": TINY_LLM, "image-classification": TINY_VISION}.get(model_kind, TINY)


@pytest.fixture
def tiny_overrides(tmp_path) -> dict[str, bool | int | float | str]:
    return dict(TINY) | {"results-dir": str(tmp_path / "results"), "run-name": "tiny"}


@pytest.fixture
def tiny_cfg(tiny_overrides) -> RunConfig:
    return RunConfig.from_run_config(tiny_overrides)
