"""Image classification: one label per image, a vision transformer, cross-entropy, accuracy
(``task.name = "image-classification"``) -- the setting of FedPEFT (Sun et al., 2022).

The images come from :mod:`fedpeft.data.images` (Fashion-MNIST, the MNIST 5k subset,
scikit-learn's digits, or a local folder of ``class/image`` files); who holds which image
is decided exactly as for text (:mod:`fedpeft.tasks.splits`: the server's stratified
held-out split, then a flwr-datasets partitioner over the rest).

Transforms, cached per worker: each client's images are resized once to
``model.image-size`` (bicubic, antialiased) and kept as uint8, 4x smaller than float32
(a worker serving 10 Fashion-MNIST clients at 112 px holds ~70 MB); each batch is then
scaled, expanded to the model's channels (grayscale -> RGB) and normalised with the
model's image-processor statistics on the fly, which costs a few microseconds per image.
No random augmentation: every client's round stays a function of the seed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from fedpeft.config import RunConfig
from fedpeft.data.images import image_store, load_images
from fedpeft.data.sources import TextDataset, label_array
from fedpeft.models.backbone import load_image_processor, resolve_model_path
from fedpeft.settings import ConfigError
from fedpeft.tasks import splits
from fedpeft.tasks.base import Batch
from fedpeft.tasks.classification import LabelObjective

# Images resized per chunk: bounds the float copy that resizing needs.
_CHUNK = 1024


@dataclass(frozen=True)
class Pixels:
    """Images resized to the model's grid (uint8) and their labels; batches are normalised."""

    images: torch.Tensor  # [N, C, S, S] uint8, C = 1 (grayscale) or 3
    labels: torch.Tensor  # [N] int64
    mean: tuple[float, ...]  # the model's per-channel normalisation
    std: tuple[float, ...]
    channels: int  # what the model takes (3 for every pretrained ViT)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, count: int) -> Pixels:
        """The first ``count`` images (:func:`fedpeft.tasks.base.first_examples`)."""
        return dataclasses.replace(self, images=self.images[:count], labels=self.labels[:count])

    def batches(self, order: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[Batch]:
        """The rows ``order`` as normalised ``pixel_values`` batches on ``device``."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        for start in range(0, len(order), batch_size):
            sel = order[start : start + batch_size]
            x = self.images[sel].to(device).float().div_(255.0)
            if x.shape[1] != self.channels:
                x = x.expand(-1, self.channels, -1, -1)
            yield {"pixel_values": (x - mean) / std}, self.labels[sel].to(device)


class ImageClassification(LabelObjective):
    """The :class:`~fedpeft.tasks.base.Task` of a labelled image collection (``data.*`` keys)."""

    model_kind = "image-classification"

    def label_names(self, cfg: RunConfig) -> tuple[str, ...]:
        return source(cfg).label_names

    def num_outputs(self, cfg: RunConfig) -> int:
        return source(cfg).num_classes

    def client_train_size(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> int:
        check_image_size(cfg)
        return splits.client_partition(load_images, cfg, partition_id, num_partitions).num_rows

    def client_train_set(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> Pixels:
        return client_train_set(cfg, partition_id, num_partitions)

    def server_test_set(self, cfg: RunConfig) -> Pixels:
        return server_sets(cfg)[1]

    def server_validation_set(self, cfg: RunConfig) -> Pixels:
        return server_sets(cfg)[0]

    def partition_stats(self, cfg: RunConfig) -> list[dict[str, Any]]:
        """Size and label histogram of every client's partition."""
        return splits.client_stats(load_images, cfg)


# ---------------------------------------------------------------------- data, cached per process
def source(cfg: RunConfig) -> TextDataset:
    """The whole labelled image collection of the run (an ``image`` index column + labels)."""
    return splits.source(load_images, cfg)


@functools.lru_cache(maxsize=256)
def client_train_set(cfg: RunConfig, partition_id: int, num_partitions: int) -> Pixels:
    """Client ``partition_id``'s images, resized to the model's grid (cached per process)."""
    return pixels(cfg, splits.client_partition(load_images, cfg, partition_id, num_partitions))


@functools.lru_cache(maxsize=2)
def server_sets(cfg: RunConfig) -> tuple[Pixels, Pixels]:
    """(validation, test) images of the server, resized (server only)."""
    validation, test = splits.server_splits(load_images, cfg)
    return pixels(cfg, validation), pixels(cfg, test)


def pixels(cfg: RunConfig, rows: datasets.Dataset) -> Pixels:
    """The images of ``rows`` (a split or partition of :func:`source`), resized, with labels."""
    size = check_image_size(cfg)
    index, labels = label_array(rows, "image"), label_array(rows)
    store = image_store(cfg.data)
    # A store of one size is one array: index it, rather than split it into images and stack them again.
    chosen = store.images[index] if isinstance(store.images, np.ndarray) else store.get(index)
    images = resize(chosen, size, store.channels)
    processor = load_image_processor(cfg.model.name)
    channels = int(_model_config(cfg.model.name).num_channels)
    mean, std = _stats(processor.image_mean, channels), _stats(processor.image_std, channels)
    return Pixels(images, torch.tensor(labels), mean, std, channels)


def resize(images: np.ndarray | Sequence[np.ndarray], size: int, channels: int) -> torch.Tensor:
    """``[N, C, size, size]`` uint8: each ``[H, W, C]`` image (rows of one ``[N, H, W, C]``
    array, or a list of them) resized (bicubic, antialiased)."""
    out = torch.empty((len(images), channels, size, size), dtype=torch.uint8)
    stacked = isinstance(images, np.ndarray)
    step = _CHUNK if stacked or len({im.shape for im in images}) <= 1 else 1  # mixed sizes: one at a time
    for start in range(0, len(images), step):
        part = images[start : start + step]
        chunk = np.ascontiguousarray(part) if isinstance(part, np.ndarray) else np.stack(part)
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float()
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[start : start + len(chunk)] = x.clamp_(0, 255).round_().to(torch.uint8)
    return out


def check_image_size(cfg: RunConfig) -> int:
    """``model.image-size``, checked against the backbone's patch size."""
    patch = int(getattr(_model_config(cfg.model.name), "patch_size", 1))
    size = cfg.model.image_size
    if size % patch:
        raise ConfigError(
            f"config key 'model.image-size' ({size}) must be a multiple of the patch size of "
            f"{cfg.model.name!r} ({patch}): try {max(patch, round(size / patch) * patch)}"
        )
    return size


@functools.lru_cache(maxsize=4)
def _model_config(name: str) -> Any:
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key 'model.name': cannot read the config of {name!r}: {err}") from err


def _stats(values: Any, channels: int) -> tuple[float, ...]:
    """A processor's mean or std as one value per channel (a scalar is broadcast)."""
    seq = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return tuple(seq * channels) if len(seq) == 1 else tuple(seq[:channels])
