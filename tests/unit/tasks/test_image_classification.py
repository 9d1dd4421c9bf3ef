"""The image-classification task: transforms, its config checks, and whole federations of a
frozen DINOv2-S/14 (the packaged weights) on Fashion-MNIST through the real apps in process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.apps import client_app
from fedpeft.apps.server_app import run_server
from fedpeft.config import ConfigError, RunConfig
from fedpeft.data import image_store
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from fedpeft.tasks import build_task
from fedpeft.tasks.image_classification import Pixels, check_image_size, resize
from strategies.registry import STRATEGIES
from tests.conftest import TINY, TINY_VISION

TASK = build_task("image-classification")


def _cfg(**overrides) -> RunConfig:
    return RunConfig.from_run_config(TINY_VISION | overrides)


def test_resize_keeps_a_flat_image_flat_and_reaches_the_grid():
    flat = np.full((8, 8, 1), 200, np.uint8)
    out = resize([flat, flat], 28, 1)
    assert out.shape == (2, 1, 28, 28) and out.dtype == torch.uint8
    assert torch.all(out == 200)
    mixed = resize([np.zeros((5, 7, 3), np.uint8), np.full((9, 4, 3), 9, np.uint8)], 14, 3)
    assert mixed.shape == (2, 3, 14, 14) and int(mixed[1].min()) == 9


def test_batches_are_the_stored_pixels_normalised_with_the_models_statistics():
    cfg = _cfg()
    data = TASK.client_train_set(cfg, 0, 3)
    assert isinstance(data, Pixels) and data.images.shape[1:] == (1, 28, 28)  # Fashion-MNIST: grayscale
    assert data.mean == pytest.approx((0.485, 0.456, 0.406)) and data.std == pytest.approx(
        (0.229, 0.224, 0.225)
    )
    (inputs, labels), *_ = data.batches(torch.tensor([3, 0]), 8, torch.device("cpu"))
    x = inputs["pixel_values"]
    assert x.shape == (2, 3, 28, 28) and torch.equal(labels, data.labels[[3, 0]])
    raw = data.images[3, 0].float() / 255
    for c in range(3):  # grayscale -> RGB, each channel with its own statistics
        assert torch.allclose(x[0, c], (raw - data.mean[c]) / data.std[c], atol=1e-6)


def test_clients_hold_the_pixels_of_their_partition_resized_once():
    cfg = _cfg()
    sizes = [TASK.client_train_size(cfg, pid, 3) for pid in range(3)]
    assert sum(sizes) == 180  # 240 images, 25% held out
    first = TASK.client_train_set(cfg, 1, 3)
    assert TASK.client_train_set(cfg, 1, 3) is first  # cached per worker
    assert len(first) == sizes[1]
    # The 28 px Fashion-MNIST images at 28 px: the stored pixels exactly.
    store = image_store(cfg.data)
    rows = [int(i) for i in np.flatnonzero(first.labels.numpy() == int(first.labels[0]))[:1]]
    assert any(
        np.array_equal(first.images[rows[0], 0].numpy(), img[..., 0]) for img in store.get(range(len(store)))
    )


def test_image_size_must_fit_the_patch_grid():
    with pytest.raises(
        ConfigError,
        match=r"'model.image-size' \(30\) must be a multiple of the patch size of 'dinov2-small' \(14\): try 28",
    ):
        check_image_size(_cfg(**{"model.image-size": 30}))


def test_a_text_dataset_for_images_and_an_image_dataset_for_text_are_refused_by_key():
    with pytest.raises(ConfigError, match="'data.dataset'.*bbc-news.*fashion-mnist"):
        TASK.client_train_size(_cfg(**{"data.dataset": "bbc-news"}), 0, 3)
    text = build_task("sequence-classification")
    with pytest.raises(ConfigError, match="'data.dataset'.*image.*task.name"):
        text.client_train_size(RunConfig.from_run_config(TINY | {"data.dataset": "digits"}), 0, 3)


def _federate(overrides: dict, tmp_path) -> list[dict]:
    cfg = _cfg(**{"results-dir": str(tmp_path), "run-name": "run", "train.max-steps": 2} | overrides)
    return read_rounds(run_server(DirectGrid(client_app.app, cfg.num_clients, cfg.to_run_config()), cfg))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_aggregates_a_vision_federation(strategy, tmp_path):
    rounds = _federate({"peft.method": "lora", "strategy.name": strategy}, tmp_path)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(c["ok"] and c["bytes_up"] > 0 for r in rounds[1:] for c in r["clients"])
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rounds)


@pytest.mark.parametrize(
    "overrides",
    [
        {"peft.method": "vpt", "vpt.depth": "deep", "codec.name": "compeft", "codec.downlink": "same"},
        {"peft.method": "bitfit", "dp.mode": "local", "dp.noise-multiplier": 0.5},
        {"peft.method": "adapter", "dp.mode": "central", "dp.central-noise-multiplier": 0.1},
    ],
    ids=["vpt-deep-compeft", "bitfit-local-dp", "adapter-central-dp"],
)
def test_vision_methods_federate_with_the_codec_and_dp(overrides, tmp_path):
    rounds = _federate(overrides, tmp_path)
    trained = [c for r in rounds[1:] for c in r["clients"]]
    assert trained and all(c["ok"] for c in trained)
    if "codec.name" in overrides:  # a sparse ternary stream: far below 4 bytes per parameter
        dense = _federate(
            {k: v for k, v in overrides.items() if not k.startswith("codec")}, tmp_path / "dense"
        )
        assert max(c["bytes_up"] for c in trained) * 4 < min(
            c["bytes_up"] for r in dense[1:] for c in r["clients"]
        )
    if overrides.get("dp.mode") == "local":
        assert all(0 < r["max_epsilon"] < float("inf") for r in rounds[1:])
